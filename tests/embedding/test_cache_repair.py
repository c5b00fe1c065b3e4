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
    with EmbeddingCache.open_v1(root, ident()) as c:
        c.add_posters(["a"], unit(1), [(PosterRecord(id="pa"), "a")])
        _refuse_inserts(root, "posters")
        with pytest.raises(sqlite3.IntegrityError, match="disk full"):
            c.add_posters(["b"], unit(1, seed=1), [(PosterRecord(id="pb"), "b")])
        assert c.num_posters == 1 and [r.id for r in c.records()] == ["pa"]  # the record went too
        _allow_inserts(root)
        assert c.add_posters(["b"], unit(1, seed=2), [(PosterRecord(id="pb"), "b")]) == 1
        np.testing.assert_array_equal(c.image_matrix()[1], unit(1, seed=2)[0].astype(np.float16))
    with EmbeddingCache.open_v1(root) as c:
        assert c.num_posters == 2 and np.load(root / "images.npy").shape == (2, 4)


def test_a_failed_text_index_write_rolls_back_and_the_cache_keeps_working(tmp_path):
    root = tmp_path / "c"
    with EmbeddingCache.open_v1(root, ident()) as c:
        enc = Encoder(ident())
        _refuse_inserts(root, "texts")
        with pytest.raises(sqlite3.IntegrityError, match="disk full"):
            c.text_embeddings(["a horror poster"], backbone=enc)
        assert c.num_texts == 0
        _allow_inserts(root)
        got = c.text_embeddings(["a horror poster", "a comedy poster"], backbone=enc)
        assert c.num_texts == 2 and got.shape == (2, 4)
    with EmbeddingCache.open_v1(root) as c:
        np.testing.assert_array_equal(c.text_embeddings(["a horror poster", "a comedy poster"]), got)


def test_a_matrix_shorter_than_its_index_is_refused_not_cut(tmp_path):
    root = tmp_path / "c"
    with EmbeddingCache.open_v1(root, ident()) as c:
        c.add_posters(["a", "b"], unit(2))
    with open(root / "images.npy", "r+b") as f:
        f.truncate(128 + 4 * 2 + 3)  # one committed row and part of the next lost
    size = (root / "images.npy").stat().st_size
    with pytest.raises(ClipposterError, match=r"images\.npy: holds fewer rows than its index records "
                                              r"\(139 bytes, 2 rows expected\); the cache is damaged"):
        EmbeddingCache.open_v1(root)
    assert (root / "images.npy").stat().st_size == size  # nothing was cut


def test_text_encoding_passes_its_batch_size(tmp_path):
    with EmbeddingCache.open_v1(tmp_path / "c", ident()) as c:
        enc = Encoder(ident())
        c.text_embeddings(["a"], backbone=enc)
        c.text_embeddings(["b"], backbone=enc, batch_size=7)
        assert enc.batch_sizes == [256, 7]


def test_text_encoder_of_another_backbone_names_the_cache(tmp_path):
    with EmbeddingCache.open_v1(tmp_path / "c", ident()) as c:
        with pytest.raises(ClipposterError, match=f"the cache {tmp_path / 'c'}"):
            c.text_embeddings(["x"], backbone=Encoder(ident(weights="other")))


def test_hashes_and_embeddings_must_pair_up(tmp_path):
    with EmbeddingCache.open_v1(tmp_path / "c", ident()) as c:
        with pytest.raises(ValueError, match="^one embedding per hash$"):
            c.add_posters(["a", "b"], unit(1))
        assert c.num_posters == 0 and (tmp_path / "c" / "images.npy").stat().st_size == 128


def test_embeddings_of_another_width_are_refused_before_anything_is_written(tmp_path):
    with EmbeddingCache.open_v1(tmp_path / "c", ident()) as c:
        with pytest.raises(ValueError, match=r"^expected rows of width 4, got shape \(2, 3\)$"):
            c.add_posters(["a", "b"], np.ones((2, 3), np.float32))
        assert c.num_posters == 0 and (tmp_path / "c" / "images.npy").stat().st_size == 128


def test_text_embeddings_are_float32_whatever_the_stored_dtype(tmp_path):
    with EmbeddingCache.open_v1(tmp_path / "c", ident()) as c:  # float16 on disk
        got = c.text_embeddings(["a", "b"], backbone=Encoder(ident()))
        assert got.dtype == np.float32 and got.shape == (2, 4)
        none = c.text_embeddings([])
        assert none.dtype == np.float32 and none.shape == (0, 4)


# ------------------------------------------------------------------------------------------------
# a damaged or incomplete cache: refused in one line, and nothing on disk changes
# ------------------------------------------------------------------------------------------------
def snapshot(root):
    """Every file under `root` with its bytes and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def filled(root, n=50, texts=3):
    with EmbeddingCache.open_v1(root, ident()) as c:
        for start in range(0, n, 10):
            hashes = [f"h{i}" for i in range(start, min(n, start + 10))]
            c.add_posters(hashes, unit(len(hashes), seed=start), [(PosterRecord(id=f"p{h}"), h) for h in hashes])
        if texts:
            c.text_embeddings([f"text {i}" for i in range(texts)], backbone=Encoder(ident()))
    return root


@pytest.mark.parametrize("mode", ["r", "a"])
def test_a_deleted_index_is_refused_and_the_embeddings_are_kept(tmp_path, mode):
    root = filled(tmp_path / "c")
    (root / "index.sqlite").unlink()
    (root / ".lock").unlink()  # as in a copy: refusing creates no lock file either
    before = snapshot(root)
    with pytest.raises(ClipposterError, match=r"^index\.sqlite is missing or older than images\.npy: .*images\.npy "
                                              r"holds 50 rows, the index 0; .*re-embed into a new cache"):
        EmbeddingCache.open_v1(root, mode=mode)
    assert snapshot(root) == before  # nothing cut, nothing created (no index, no lock)


@pytest.mark.parametrize("mode", ["r", "a"])
def test_an_index_older_than_the_matrix_is_refused(tmp_path, mode):
    """A copy of the cache taken without its -wal file: the index lost its last commits."""
    root = filled(tmp_path / "c", n=20)
    old_index = (root / "index.sqlite").read_bytes()
    with EmbeddingCache.open_v1(root, ident()) as c:
        c.add_posters([f"n{i}" for i in range(30)], unit(30, seed=9))
    (root / "index.sqlite").write_bytes(old_index)
    before = snapshot(root)
    with pytest.raises(ClipposterError, match=r"index\.sqlite is missing or older than images\.npy: .* holds 50 "
                                              r"rows, the index 20"):
        EmbeddingCache.open_v1(root, mode=mode)
    assert snapshot(root) == before


def test_a_tail_longer_than_one_append_is_not_cut(tmp_path):
    from clipposter.embedding.cache_v1 import APPEND_ROWS

    root = filled(tmp_path / "c", n=2, texts=0)
    with open(root / "images.npy", "ab") as f:  # header and index agree on 2 rows; far more bytes follow
        f.write(b"\x01" * (APPEND_ROWS * 4 * 2 + 2))
    before = snapshot(root)
    with pytest.raises(ClipposterError, match=r"images\.npy holds .* bytes past its 2 committed rows"):
        EmbeddingCache.open_v1(root, ident())
    assert snapshot(root) == before


def test_a_tail_of_one_append_is_cut(tmp_path):
    from clipposter.embedding.cache_v1 import APPEND_ROWS

    root = filled(tmp_path / "c", n=2, texts=0)
    with open(root / "images.npy", "ab") as f:
        f.write(b"\x01" * (APPEND_ROWS * 4 * 2))
    with EmbeddingCache.open_v1(root, ident()) as c:
        assert c.num_posters == 2
    assert (root / "images.npy").stat().st_size == 128 + 2 * 4 * 2


def test_big_appends_are_committed_in_steps_of_at_most_one_append(tmp_path, monkeypatch):
    import clipposter.embedding.cache_v1 as cache_module

    monkeypatch.setattr(cache_module, "APPEND_ROWS", 4)
    with EmbeddingCache.open_v1(tmp_path / "c", ident()) as c:
        emb = unit(11, seed=3)
        hashes = [f"h{i}" for i in range(11)]
        assert c.add_posters(hashes + ["h3"], np.concatenate([emb, emb[3:4]]),
                             [(PosterRecord(id=f"p{i}"), h) for i, h in enumerate(hashes)]) == 11
        assert c.rows_for_hashes(hashes) == {h: i for i, h in enumerate(hashes)}
        np.testing.assert_array_equal(c.image_matrix(), emb.astype(np.float16))
        assert sorted(r.id for r in c.records()) == sorted(f"p{i}" for i in range(11))
        texts = [f"t{i}" for i in range(9)]
        got = c.text_embeddings(texts, backbone=Encoder(ident()))
        assert c.num_texts == 9
        np.testing.assert_array_equal(c.text_embeddings(texts), got)


@pytest.mark.parametrize("mode", ["r", "a"])
def test_a_matrix_header_ahead_of_its_rows_is_refused(tmp_path, mode):
    root = filled(tmp_path / "c", n=5, texts=0)
    with open(root / "images.npy", "r+b") as f:
        f.truncate(128 + 4 * 2 * 5 - 3)
    before = snapshot(root)
    with pytest.raises(ClipposterError, match="holds fewer rows than its index records"):
        EmbeddingCache.open_v1(root, mode=mode)
    assert snapshot(root) == before


@pytest.mark.parametrize("mode", ["r", "a"])
def test_a_garbled_matrix_header_is_one_line(tmp_path, mode):
    root = filled(tmp_path / "c", n=5, texts=0)
    with open(root / "images.npy", "r+b") as f:
        f.write(b"not a numpy file")
    before = snapshot(root)
    with pytest.raises(ClipposterError, match=r"images\.npy: not a readable \.npy matrix"):
        EmbeddingCache.open_v1(root, mode=mode)
    assert snapshot(root) == before


# ------------------------------------------------------------------------------------------------
# a cache without its description is not adopted by another backbone
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", ["index.sqlite", "images.npy", "texts.npy"])
def test_a_cache_without_cache_json_is_not_adopted(tmp_path, keep):
    root = filled(tmp_path / "c", n=5)
    (root / "cache.json").unlink()
    for name in ("index.sqlite", "images.npy", "texts.npy"):
        if name != keep:
            (root / name).unlink()
    before = snapshot(root)
    with pytest.raises(ClipposterError, match=rf"^{root}: holds cache files \({keep}\) but no cache\.json, so the "
                                              r"backbone they were made with is unknown; .*new `cache` directory"):
        EmbeddingCache.open(root, ident(weights="other"))
    with pytest.raises(ClipposterError, match="but no cache.json"):
        EmbeddingCache.open(root, mode="r")
    assert snapshot(root) == before


# ------------------------------------------------------------------------------------------------
# an unreadable index, a full disk: one line, and the cache keeps what it had
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["r", "a"])
def test_an_index_with_a_garbage_header_is_one_line(tmp_path, mode):
    root = filled(tmp_path / "c", n=5)
    with open(root / "index.sqlite", "r+b") as f:
        f.write(b"garbage garbage garbage garbage!")
    with pytest.raises(ClipposterError, match=rf"^index\.sqlite in {root} is not a readable SQLite database "
                                              r"\(file is not a database\): restore it or re-embed into a new cache$"):
        EmbeddingCache.open_v1(root, mode=mode)


def _damage_table_pages(path):
    """Overwrite the pages of the posters table (not the schema page) with noise."""
    db = sqlite3.connect(path)
    pages = [p for (p,) in db.execute("SELECT rootpage FROM sqlite_master WHERE name IN ('posters', 'records')")]
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with open(path, "r+b") as f:
        for page in pages:
            f.seek((page - 1) * page_size)
            f.write(np.random.default_rng(0).integers(0, 256, page_size, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("mode", ["r", "a"])
def test_an_index_with_a_damaged_page_is_one_line(tmp_path, mode):
    root = filled(tmp_path / "c", n=5)
    _damage_table_pages(root / "index.sqlite")
    with pytest.raises(ClipposterError, match=rf"^index\.sqlite in {root} is not a readable SQLite database "
                                              r"\(.*\): restore it or re-embed into a new cache$"):
        with EmbeddingCache.open_v1(root, mode=mode) as c:
            c.records()


def _fill_the_index(c):
    """Let the index grow by no page: the next insert that needs one fails as on a full disk."""
    c._db.execute(f"PRAGMA max_page_count = {c._db.execute('PRAGMA page_count').fetchone()[0]}")


def test_a_full_disk_while_committing_posters_is_one_line_and_the_cache_keeps_its_rows(tmp_path):
    root = filled(tmp_path / "c", n=5, texts=0)
    with EmbeddingCache.open_v1(root, ident()) as c:
        before = np.array(c.image_matrix())
        _fill_the_index(c)
        many = [f"{i:064x}" for i in range(400)]
        with pytest.raises(ClipposterError, match=rf"^disk full while writing {root}: .*database or disk is full"):
            c.add_posters(many, unit(400, seed=1), [(PosterRecord(id=h), h) for h in many])
        assert c.num_posters == 5
        np.testing.assert_array_equal(c.image_matrix(), before)
    with EmbeddingCache.open_v1(root, mode="r") as c:
        assert c.num_posters == 5 and sorted(r.id for r in c.records()) == [f"ph{i}" for i in range(5)]
        np.testing.assert_array_equal(c.image_matrix(), before)
    assert (root / "images.npy").stat().st_size == 128 + 5 * 4 * 2


def test_a_full_disk_while_committing_texts_is_one_line(tmp_path):
    root = filled(tmp_path / "c", n=2, texts=2)
    with EmbeddingCache.open_v1(root, ident()) as c:
        _fill_the_index(c)
        with pytest.raises(ClipposterError, match=rf"^disk full while writing {root}"):
            c.text_embeddings([f"a long text number {i} " * 10 for i in range(300)], backbone=Encoder(ident()))
        assert c.num_texts == 2
    with EmbeddingCache.open_v1(root, mode="r") as c:
        assert c.text_embeddings(["text 0", "text 1"]).shape == (2, 4)


@pytest.mark.parametrize("matrix", ["images", "texts"])
def test_a_full_disk_while_writing_rows_is_one_line_and_leaves_no_tail(tmp_path, monkeypatch, matrix):
    import errno
    import os

    root = filled(tmp_path / "c", n=5, texts=2)
    sizes = {n: (root / f"{n}.npy").stat().st_size for n in ("images", "texts")}
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with EmbeddingCache.open_v1(root, ident()) as c:
        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(ClipposterError, match=rf"^disk full while writing {root}: .*No space left on device"):
            if matrix == "images":
                c.add_posters(["new"], unit(1, seed=5), [(PosterRecord(id="new"), "new")])
            else:
                c.text_embeddings(["a new text"], backbone=Encoder(ident()))
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert {n: (root / f"{n}.npy").stat().st_size for n in ("images", "texts")} == sizes
        assert c.num_posters == 5 and c.num_texts == 2 and "new" not in {r.id for r in c.records()}
        assert c.add_posters(["new"], unit(1, seed=6)) == 1  # the cache keeps working once there is room
    with EmbeddingCache.open_v1(root, mode="r") as c:
        assert c.num_posters == 6
