import json

import numpy as np
import pytest

from clipposter.embedding.backbone import BackboneIdentity
from clipposter.embedding.cache import EmbeddingCache
from clipposter.errors import ClipposterError
from clipposter.records import PosterRecord


def ident(weights="sha256:aa", dim=8):
    return BackboneIdentity(model="m", weights=weights, image_size=32, mean=(0.5, 0.5, 0.5),
                            std=(0.2, 0.2, 0.2), interpolation="bicubic", resize_mode="shortest", embed_dim=dim)


def unit(n, d=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rec(i, **kw):
    return PosterRecord(id=f"p{i}", image=f"/x/p{i}.jpg", genres=["Drama"], split="train", **kw)


def test_append_and_read_back_as_memmap(tmp_path):
    emb = unit(5)
    with EmbeddingCache.open_v1(tmp_path / "c", ident()) as c:
        assert c.add_posters([f"h{i}" for i in range(5)], emb, [(rec(i), f"h{i}") for i in range(5)]) == 5
        m = c.image_matrix()
        assert isinstance(m, np.memmap) and m.dtype == np.float16 and m.shape == (5, 8)
        np.testing.assert_allclose(c.embeddings_for_ids(["p3", "p0"]), emb[[3, 0]], atol=1e-3)
    # The file is an ordinary .npy: numpy reads it without clipposter.
    np.testing.assert_allclose(np.load(tmp_path / "c" / "images.npy"), emb, atol=1e-3)


def test_same_hash_is_stored_once(tmp_path):
    with EmbeddingCache.open(tmp_path / "c", ident()) as c:
        c.add_posters(["a", "b"], unit(2))
        assert c.add_posters(["b", "c", "c"], unit(3, seed=1)) == 1
        assert c.num_posters == 3


def test_float32_option(tmp_path):
    with EmbeddingCache.open(tmp_path / "c", ident(), dtype="float32") as c:
        c.add_posters(["a"], unit(1))
        assert c.image_matrix().dtype == np.float32
    assert EmbeddingCache.open(tmp_path / "c").dtype == "float32"


def test_other_backbone_is_refused(tmp_path):
    EmbeddingCache.open(tmp_path / "c", ident()).close()
    with pytest.raises(ClipposterError, match="was made with backbone"):
        EmbeddingCache.open(tmp_path / "c", ident(weights="openai"))


def test_opening_a_non_cache_is_clear_error(tmp_path):
    with pytest.raises(ClipposterError, match="no clipposter cache here"):
        EmbeddingCache.open(tmp_path)


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("damage", ["not json", "no dtype", "unknown dtype", "no backbone"])
def test_an_unusable_cache_json_is_one_line_whichever_way_the_cache_is_opened(tmp_path, fmt, damage):
    from clipposter.embedding.shards import ShardedCache

    root = tmp_path / "c"
    (EmbeddingCache.open_v1 if fmt == 1 else EmbeddingCache.open)(root, ident()).close()
    meta = json.loads((root / "cache.json").read_text())
    if damage == "not json":
        text = "{" + json.dumps(meta)
    else:
        key, value = {"no dtype": ("dtype", None), "unknown dtype": ("dtype", "float64"),
                      "no backbone": ("backbone", None)}[damage]
        meta = {k: v for k, v in meta.items() if k != key} if value is None else {**meta, key: value}
        text = json.dumps(meta)
    (root / "cache.json").write_text(text)
    openers = [lambda: EmbeddingCache.open(root, mode="r"), lambda: EmbeddingCache.open(root, ident()),
               lambda: EmbeddingCache.open_v1(root, mode="r") if fmt == 1 else ShardedCache.open(root, mode="r")]
    for opener in openers:
        with pytest.raises(ClipposterError, match=rf"^{root / 'cache.json'}: unreadable cache description \("):
            opener()


def test_uncommitted_tail_from_a_killed_write_is_cut(tmp_path):
    root = tmp_path / "c"
    with EmbeddingCache.open_v1(root, ident()) as c:
        c.add_posters(["a", "b"], unit(2))
    # A run killed after writing rows but before committing their index leaves bytes past the end.
    with open(root / "images.npy", "ab") as f:
        f.write(b"\x01" * (8 * 2 * 3 + 5))
    with EmbeddingCache.open_v1(root, ident()) as c:
        assert c.num_posters == 2
        assert np.load(root / "images.npy").shape == (2, 8)
        c.add_posters(["c"], unit(1, seed=4))
        np.testing.assert_allclose(c.image_matrix()[2], unit(1, seed=4)[0], atol=1e-3)


def test_stale_header_after_commit_is_repaired(tmp_path):
    root = tmp_path / "c"
    with EmbeddingCache.open_v1(root, ident()) as c:
        c.add_posters(["a", "b", "c"], unit(3))
        c._images.set_header(1)  # as if killed between the commit and the header rewrite
    with EmbeddingCache.open_v1(root, ident()) as c:
        assert np.load(root / "images.npy").shape == (3, 8)


def test_records_and_splits_round_trip(tmp_path):
    with EmbeddingCache.open(tmp_path / "c", ident()) as c:
        r = PosterRecord(id="x", image="/a.jpg", genres=["Horror", "Comedy"], tagline="Run.", overview=None,
                         split="test", title="T")
        c.add_posters(["h"], unit(1), [(r, "h")])
        r.genres = ["Horror"]
        c.upsert_records([(r, "h")])
        (got,) = c.records(split="test")
        assert got.genres == ["Horror"] and got.tagline == "Run." and got.title == "T"
        assert c.records(split="train") == []
        info = c.info()
        assert info.posters == 1 and info.records == 1 and info.splits == {"test": 1}


def test_unknown_id_is_clear_error(tmp_path):
    with EmbeddingCache.open(tmp_path / "c", ident()) as c:
        with pytest.raises(ClipposterError, match="'nope' is not in the cache"):
            c.embeddings_for_ids(["nope"])


class CountingTextEncoder:
    def __init__(self, identity):
        self.identity = identity
        self.calls = 0

    def encode_texts(self, texts, batch_size=256):
        self.calls += 1
        return unit(len(texts), seed=len(texts))


def test_text_embeddings_encoded_once(tmp_path):
    with EmbeddingCache.open(tmp_path / "c", ident()) as c:
        enc = CountingTextEncoder(ident())
        a = c.text_embeddings(["a horror poster", "a comedy poster", "a horror poster"], backbone=enc)
        b = c.text_embeddings(["a comedy poster", "a horror poster"], backbone=enc)
        assert enc.calls == 1 and c.num_texts == 2
        np.testing.assert_allclose(a[0], a[2])
        np.testing.assert_allclose(b, a[[1, 0]])
        with pytest.raises(ClipposterError, match="not in the cache"):
            c.text_embeddings(["never seen"])


def test_text_encoder_of_other_backbone_refused(tmp_path):
    with EmbeddingCache.open(tmp_path / "c", ident()) as c:
        with pytest.raises(ClipposterError, match="was made with backbone"):
            c.text_embeddings(["x"], backbone=CountingTextEncoder(ident(weights="other")))


def test_cache_json_records_backbone(tmp_path):
    EmbeddingCache.open(tmp_path / "c", ident()).close()
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert meta["backbone"]["weights"] == "sha256:aa" and meta["dtype"] == "float16"


def test_lookups_by_content_hash_and_by_id(tmp_path):
    """The lookups other stages use instead of reading the cache's tables themselves."""
    emb = unit(4)
    with EmbeddingCache.open(tmp_path / "c", ident()) as c:
        c.add_posters(["h0", "h1", "h2"], emb[:3],
                      [(rec(0, title="Zero"), "h0"), (rec(1), "h1"), (rec(2), "h2"),
                       (PosterRecord(id="p1-copy", genres=["Comedy", "Drama"]), "h1")])
        c.add_posters(["h3"], emb[3:], [(rec(3), "h3")])
        assert [c.row_for_hash(h) for h in ("h0", "h2", "h3", "nope")] == [0, 2, 3, None]
        assert c.rows_for_hashes(["h3", "nope", "h1", "h3"]) == {"h3": 3, "h1": 1}
        # every id (ids sharing content share a row), in id order; optionally only rows below a bound
        assert list(c.id_rows().items()) == [("p0", 0), ("p1", 1), ("p1-copy", 1), ("p2", 2), ("p3", 3)]
        assert c.id_rows(below=2) == {"p0": 0, "p1": 1, "p1-copy": 1}
        assert c.id_rows(["p3", "ghost", "p1-copy"]) == {"p1-copy": 1, "p3": 3}
        assert c.id_rows(["p3", "p0"], below=3) == {"p0": 0}
        summaries = c.record_summaries(["p0", "p1-copy", "ghost"])
        assert summaries == {"p0": (["Drama"], "Zero", "/x/p0.jpg"), "p1-copy": (["Comedy", "Drama"], None, None)}
        assert summaries["p0"].title == "Zero"
        assert c.labelled_genres()["p1-copy"] == ["Comedy", "Drama"] and len(c.labelled_genres()) == 5
        np.testing.assert_array_equal(c.embeddings_for_rows([3, 1]), np.asarray(c.image_matrix()[[3, 1]], np.float32))
        assert c.embeddings_for_rows([]).shape == (0, 8)
        np.testing.assert_array_equal(c.embedding_for_hash("h2"), c.embeddings_for_rows([2])[0])
        assert c.embedding_for_hash("nope") is None
        # many keys: the lookups chunk under SQLite's bound-parameter limit
        assert len(c.rows_for_hashes([f"x{i}" for i in range(2000)] + ["h0"])) == 1


def test_reading_a_cache_loads_no_model_code(tmp_path, tiny_backbone):
    """`cache info` and readers of embeddings open the cache without importing torch or open_clip."""
    import subprocess
    import sys

    with EmbeddingCache.open(tmp_path / "c", tiny_backbone.identity, backbone_spec=tiny_backbone.spec):
        pass
    code = ("import sys\nfrom clipposter.cli.main import main\n"
            f"assert main(['cache', 'info', '--cache', {str(tmp_path / 'c')!r}, '--json']) == 0\n"
            "heavy = sorted({'torch', 'open_clip', 'transformers'} & set(sys.modules))\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"posters": 0' in proc.stdout
