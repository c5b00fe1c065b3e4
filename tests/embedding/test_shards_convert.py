"""migrate (v1 → sharded), merge and compact: every id, vector (bit for bit) and record survives."""
import json

import numpy as np
import pytest

from clipposter.embedding import cache_convert
from clipposter.embedding import shard_files as sf
from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.shards import ShardedCache
from clipposter.errors import ClipposterError, ConfigError
from test_shards import ident, new_cache, rec, unit


class Encoder:
    identity = ident()

    def encode_texts(self, texts, batch_size=256):
        return np.stack([unit(1, seed=len(t) * 7 + ord(t[0]))[0] for t in texts])


def v1_cache(root, n=7):
    with EmbeddingCache.open_v1(root, ident(), backbone_spec={"kind": "v1"}) as c:
        c.add_posters([f"h{i}" for i in range(n)], unit(n), [(rec(i, tagline=f"t{i}"), f"h{i}") for i in range(n)])
        c.upsert_records([(rec(0, "test", title="Zero"), "h0")])
        c.text_embeddings(["a poster", "another"], backbone=Encoder())


def content(cache):
    """Everything a cache answers, as bytes and values."""
    ids = [r.id for r in cache.records()]
    return {"records": cache.records(), "rows": cache.id_rows(),
            "vectors": cache.embeddings_for_ids(ids, dtype=np.float16).tobytes(),
            "hash_rows": cache.rows_for_hashes([f"h{i}" for i in range(20)]),
            "texts": cache.text_embeddings(["a poster", "another"]).tobytes(),
            "identity": cache.identity, "dtype": cache.dtype, "spec": cache.backbone_spec}


@pytest.mark.parametrize("in_place", [True, False])
def test_migrate_keeps_every_id_vector_record_and_text(tmp_path, in_place):
    v1_cache(tmp_path / "v1")
    with EmbeddingCache.open(tmp_path / "v1", mode="r") as old:
        expected = content(old)
        matrix = np.asarray(old.image_matrix()).tobytes()
    out = None if in_place else tmp_path / "v2"
    summary = cache_convert.migrate(tmp_path / "v1", out, shard_rows=3)
    assert summary["migrated"] and summary["posters"] == 7 and summary["shards"] == 3
    target = tmp_path / ("v1" if in_place else "v2")
    with EmbeddingCache.open(target, mode="r") as new:
        assert isinstance(new, ShardedCache)
        assert content(new) == expected
        assert np.asarray(new.image_matrix()).tobytes() == matrix  # row numbers too
    names = {p.name for p in (tmp_path / "v1").iterdir()}
    if in_place:
        assert not names & {"index.sqlite", "images.npy", "texts.npy"}
    else:
        assert {"index.sqlite", "images.npy", "texts.npy"} <= names
        assert json.loads((tmp_path / "v1" / "cache.json").read_text())["format_version"] == 1


def test_a_migration_killed_before_its_switch_leaves_the_v1_cache_and_reruns(tmp_path, monkeypatch):
    v1_cache(tmp_path / "c")
    with EmbeddingCache.open(tmp_path / "c", mode="r") as old:
        expected = content(old)

    def killed(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(cache_convert, "create_meta", killed)
    with pytest.raises(KeyboardInterrupt):
        cache_convert.migrate(tmp_path / "c")
    assert (tmp_path / "c" / sf.INDEX).exists()  # its shards were written and listed, the switch not made
    with EmbeddingCache.open(tmp_path / "c", mode="r") as still:
        assert not isinstance(still, ShardedCache) and content(still) == expected
    monkeypatch.undo()
    cache_convert.migrate(tmp_path / "c")
    with EmbeddingCache.open(tmp_path / "c", mode="r") as new:
        assert content(new) == expected and len(new.shard_names) == 1
    assert len(list((tmp_path / "c" / sf.SHARDS).iterdir())) == 1  # the killed run's shards are gone


def test_migrating_a_sharded_cache_removes_stray_v1_files_only(tmp_path):
    v1_cache(tmp_path / "c")
    cache_convert.migrate(tmp_path / "c")
    (tmp_path / "c" / "images.npy").write_bytes(b"left by a migration killed after its switch")
    summary = cache_convert.migrate(tmp_path / "c")
    assert summary["migrated"] is False and summary["removed_v1_files"] == ["images.npy"]
    assert summary["posters"] == 7
    with pytest.raises(ClipposterError, match="already a sharded cache"):
        cache_convert.migrate(tmp_path / "c", tmp_path / "elsewhere")


def test_migrate_refuses_a_damaged_v1_cache_and_an_occupied_out(tmp_path):
    v1_cache(tmp_path / "c")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        cache_convert.migrate(tmp_path / "c", tmp_path / "taken")
    (tmp_path / "c" / "index.sqlite").unlink()
    with pytest.raises(ClipposterError, match="index.sqlite is missing or older"):
        cache_convert.migrate(tmp_path / "c")
    assert (tmp_path / "c" / "images.npy").exists() and not (tmp_path / "c" / sf.SHARDS).exists()


def test_merge_lists_both_caches_first_row_and_last_record_win(tmp_path):
    a, b = new_cache(tmp_path / "a"), new_cache(tmp_path / "b")
    a.add_posters(["h0", "h1"], unit(2), [(rec(0), "h0"), (rec(1), "h1")])
    b.add_posters(["h1", "h2"], unit(2, seed=3), [(rec(1, "test"), "h1"), (rec(2), "h2")])
    summary = cache_convert.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert summary["posters"] == 3 and summary["shards"] == 2
    with EmbeddingCache.open(tmp_path / "m", mode="r") as m:
        got = m.embeddings_for_ids(["p0", "p1", "p2"], dtype=np.float16)
        want = np.concatenate([unit(2), unit(2, seed=3)[1:]]).astype(np.float16)
        assert got.tobytes() == want.tobytes()
        assert m.records(split="test") == [rec(1, "test")]
        assert m.backbone_spec == {"kind": "test"}
    # The sources are unchanged, and the merged shards are the sources' bytes.
    assert ShardedCache.open(tmp_path / "a", mode="r").num_posters == 2
    src = tmp_path / "a" / sf.SHARDS / a.shard_names[0] / "images.npy"
    dst = tmp_path / "m" / sf.SHARDS / ShardedCache.open(tmp_path / "m", mode="r").shard_names[0] / "images.npy"
    assert src.read_bytes() == dst.read_bytes()


def test_merge_refuses_other_backbones_dtypes_v1_caches_and_an_existing_out(tmp_path):
    new_cache(tmp_path / "a").add_posters(["x"], unit(1))
    new_cache(tmp_path / "other", identity=ident(weights="openai"))
    new_cache(tmp_path / "f32", dtype="float32")
    v1_cache(tmp_path / "v1")
    with pytest.raises(ClipposterError, match="was made with backbone"):
        cache_convert.merge([tmp_path / "a", tmp_path / "other"], tmp_path / "m")
    with pytest.raises(ClipposterError, match="merge caches of one dtype"):
        cache_convert.merge([tmp_path / "a", tmp_path / "f32"], tmp_path / "m")
    with pytest.raises(ClipposterError, match="cache migrate"):
        cache_convert.merge([tmp_path / "a", tmp_path / "v1"], tmp_path / "m")
    with pytest.raises(ConfigError, match="not an empty folder"):
        cache_convert.merge([tmp_path / "a", tmp_path / "a"], tmp_path / "v1")
    assert not (tmp_path / "m").exists()


def test_compact_rewrites_many_shards_as_few_with_the_same_answers(tmp_path):
    root = tmp_path / "c"
    c = new_cache(root)
    tokens = np.random.default_rng(2).normal(size=(9, 3, 4)).astype(np.float16)
    for n in range(9):
        c.add_posters([f"h{n}"], unit(1, seed=n), [(rec(n), f"h{n}")], tokens=tokens[n:n + 1])
    c.upsert_records([(rec(4, "test", title="Four"), "h4")])
    sf.append_shard(root, 8, np.float16, poster_hashes=["h2"], images=unit(1, seed=99).astype(np.float16),
                    tokens=tokens[:1])  # a duplicate row: the first one stays
    c.text_embeddings(["a poster"], backbone=Encoder())
    c.text_embeddings(["another", "a poster"], backbone=Encoder())
    with ShardedCache.open(root, mode="r") as before:
        expected = content(before)
        old_tokens = before.tokens_for_ids([f"p{n}" for n in range(9)])
        old_names = before.shard_names
    summary = cache_convert.compact(root, shard_rows=4)
    assert summary["shards_before"] == 13 and summary["shards"] == 3
    with ShardedCache.open(root, mode="r") as after:
        assert content(after) == expected
        assert after.tokens_for_ids([f"p{n}" for n in range(9)]).tobytes() == old_tokens.tobytes()
        assert len(after.image_matrix()) == 9  # the duplicate row is gone
        assert sorted(p.name for p in (root / sf.SHARDS).iterdir()) == sorted(after.shard_names)
        assert not set(after.shard_names) & set(old_names)


def test_compact_keeps_shards_listed_after_it_began_and_refuses_to_drop_tokens(tmp_path, monkeypatch):
    root = tmp_path / "c"
    c = new_cache(root)
    c.add_posters(["a"], unit(1), [(rec(0), "a")])
    c.add_posters(["b"], unit(1, seed=1), [(rec(1), "b")])
    real = sf.commit

    def commit_after_another_writer(root_, added, replaced=()):
        if replaced:  # another writer lists its shard while the compaction writes
            sf.append_shard(root, 8, np.float16, poster_hashes=["late"], images=unit(1, seed=7).astype(np.float16),
                            records=[("p9", "late", None, [], None, None, None, None, None)])
        return real(root_, added, replaced)
    monkeypatch.setattr(sf, "commit", commit_after_another_writer)
    cache_convert.compact(root)
    with ShardedCache.open(root, mode="r") as r:
        assert len(r.shard_names) == 2 and r.id_rows() == {"p0": 0, "p1": 1, "p9": 2}
    monkeypatch.undo()
    ShardedCache.open(root).add_posters(["t"], unit(1, seed=3), tokens=np.zeros((1, 2, 2), np.float16))
    with pytest.raises(ClipposterError, match="would drop tokens"):
        cache_convert.compact(root)
    assert len(ShardedCache.open(root, mode="r").shard_names) == 3
