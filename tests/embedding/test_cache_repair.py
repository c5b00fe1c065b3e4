"""The cache's append and repair paths that the kill/reopen property does not reach: a failed index
write rolls back and leaves the cache usable, a cache whose matrix lost committed rows is refused,
and text encoding passes its batch size and names the cache on a backbone mismatch."""
import sqlite3

import numpy as np
import pytest

from clipposter.embedding.backbone import BackboneIdentity
from clipposter.embedding.cache import EmbeddingCache
from clipposter.errors import ClipposterError
from clipposter.records import PosterRecord


def ident(weights="sha256:aa", dim=4):
    return BackboneIdentity(model="m", weights=weights, image_size=32, mean=(0.5, 0.5, 0.5),
                            std=(0.2, 0.2, 0.2), interpolation="bicubic", resize_mode="shortest", embed_dim=dim)


def unit(n, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Encoder:
    def __init__(self, identity):
        self.identity = identity
        self.batch_sizes = []

    def encode_texts(self, texts, batch_size=256):
        self.batch_sizes.append(batch_size)
        return unit(len(texts), seed=len(texts))


def _refuse_inserts(root, table):
    """Make the index refuse new rows of `table`, as a full disk or a broken file would."""
    db = sqlite3.connect(root / "index.sqlite")
    db.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    db.commit()
    db.close()


def _allow_inserts(root):
    db = sqlite3.connect(root / "index.sqlite")
    db.execute("DROP TRIGGER refuse")
    db.commit()
    db.close()


def test_a_failed_poster_index_write_rolls_back_and_the_cache_keeps_working(tmp_path):
    root = tmp_path / "c"
    with EmbeddingCache.open(root, ident()) as c:
        c.add_posters(["a"], unit(1), [(PosterRecord(id="pa"), "a")])
        _refuse_inserts(root, "posters")
        with pytest.raises(sqlite3.IntegrityError, match="disk full"):
            c.add_posters(["b"], unit(1, seed=1), [(PosterRecord(id="pb"), "b")])
        assert c.num_posters == 1 and [r.id for r in c.records()] == ["pa"]  # the record went too
        _allow_inserts(root)
        assert c.add_posters(["b"], unit(1, seed=2), [(PosterRecord(id="pb"), "b")]) == 1
        np.testing.assert_array_equal(c.image_matrix()[1], unit(1, seed=2)[0].astype(np.float16))
    with EmbeddingCache.open(root) as c:
        assert c.num_posters == 2 and np.load(root / "images.npy").shape == (2, 4)


def test_a_failed_text_index_write_rolls_back_and_the_cache_keeps_working(tmp_path):
    root = tmp_path / "c"
    with EmbeddingCache.open(root, ident()) as c:
        enc = Encoder(ident())
        _refuse_inserts(root, "texts")
        with pytest.raises(sqlite3.IntegrityError, match="disk full"):
            c.text_embeddings(["a horror poster"], backbone=enc)
        assert c.num_texts == 0
        _allow_inserts(root)
        got = c.text_embeddings(["a horror poster", "a comedy poster"], backbone=enc)
        assert c.num_texts == 2 and got.shape == (2, 4)
    with EmbeddingCache.open(root) as c:
        np.testing.assert_array_equal(c.text_embeddings(["a horror poster", "a comedy poster"]), got)


def test_a_matrix_shorter_than_its_index_is_refused_not_cut(tmp_path):
    root = tmp_path / "c"
    with EmbeddingCache.open(root, ident()) as c:
        c.add_posters(["a", "b"], unit(2))
    with open(root / "images.npy", "r+b") as f:
        f.truncate(128 + 4 * 2 + 3)  # one committed row and part of the next lost
    size = (root / "images.npy").stat().st_size
    with pytest.raises(ClipposterError, match=r"images\.npy: holds fewer rows than its index records "
                                              r"\(139 bytes, 2 rows expected\); the cache is damaged"):
        EmbeddingCache.open(root)
    assert (root / "images.npy").stat().st_size == size  # nothing was cut


def test_text_encoding_passes_its_batch_size(tmp_path):
    with EmbeddingCache.open(tmp_path / "c", ident()) as c:
        enc = Encoder(ident())
        c.text_embeddings(["a"], backbone=enc)
        c.text_embeddings(["b"], backbone=enc, batch_size=7)
        assert enc.batch_sizes == [256, 7]


def test_text_encoder_of_another_backbone_names_the_cache(tmp_path):
    with EmbeddingCache.open(tmp_path / "c", ident()) as c:
        with pytest.raises(ClipposterError, match=f"the cache {tmp_path / 'c'}"):
            c.text_embeddings(["x"], backbone=Encoder(ident(weights="other")))


def test_hashes_and_embeddings_must_pair_up(tmp_path):
    with EmbeddingCache.open(tmp_path / "c", ident()) as c:
        with pytest.raises(ValueError, match="^one embedding per hash$"):
            c.add_posters(["a", "b"], unit(1))
        assert c.num_posters == 0 and (tmp_path / "c" / "images.npy").stat().st_size == 128


def test_embeddings_of_another_width_are_refused_before_anything_is_written(tmp_path):
    with EmbeddingCache.open(tmp_path / "c", ident()) as c:
        with pytest.raises(ValueError, match=r"^expected rows of width 4, got shape \(2, 3\)$"):
            c.add_posters(["a", "b"], np.ones((2, 3), np.float32))
        assert c.num_posters == 0 and (tmp_path / "c" / "images.npy").stat().st_size == 128


def test_text_embeddings_are_float32_whatever_the_stored_dtype(tmp_path):
    with EmbeddingCache.open(tmp_path / "c", ident()) as c:  # float16 on disk
        got = c.text_embeddings(["a", "b"], backbone=Encoder(ident()))
        assert got.dtype == np.float32 and got.shape == (2, 4)
        none = c.text_embeddings([])
        assert none.dtype == np.float32 and none.shape == (0, 4)
