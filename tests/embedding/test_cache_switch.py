"""Format 2 is the format new caches get; a v1 cache opens read-only and says how to migrate it; a
sharded cache's rows read like one memory-mapped matrix without being concatenated; `embed` writes a
shard per flush, not per batch."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from clipposter.cli.common import EXIT_ERROR
from clipposter.embedding import embed as embed_module
from clipposter.embedding import shard_files as sf
from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.shard_rows import ShardedRows
from clipposter.embedding.shards import ShardedCache
from clipposter.errors import ClipposterError
from clipposter.search.budget import RERANK_FROM_CACHE
from clipposter.search.index import PosterIndex
from helpers import run_cli, tiny_args
from test_shards import ident, new_cache, rec, unit
from test_shards_convert import v1_cache




def snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_new_cache_is_sharded(tmp_path):
    with EmbeddingCache.open(tmp_path / "c", ident()) as c:
        assert isinstance(c, ShardedCache)
        c.add_posters(["a", "b"], unit(2), [(rec(0), "a")])
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["format_version"] == sf.FORMAT_VERSION
    assert not (tmp_path / "c" / "index.sqlite").exists()
    with EmbeddingCache.open(tmp_path / "c", mode="r") as c:
        assert c.num_posters == 2 and c.shard_names and c.id_rows() == {"p0": 0}


def test_a_sharded_cache_without_cache_json_is_not_adopted(tmp_path):
    root = tmp_path / "c"
    with EmbeddingCache.open(root, ident()) as c:
        c.add_posters(["a", "b"], unit(2), [(rec(0), "a")])
    (root / "cache.json").unlink()
    before = snapshot(root)
    # another backbone must not take these shards over, and a reader must not guess
    with pytest.raises(ClipposterError, match=rf"^{root}: holds cache files \(shards.json, shards\) but no "
                                              r"cache\.json, so the backbone they were made with is unknown"):
        EmbeddingCache.open(root, ident(weights="other"))
    with pytest.raises(ClipposterError, match="but no cache.json"):
        EmbeddingCache.open(root, mode="r")
    assert snapshot(root) == before


def test_a_v1_cache_opens_read_only_and_names_the_migration(tmp_path):
    root = tmp_path / "c"
    v1_cache(root)
    before = snapshot(root)
    with EmbeddingCache.open(root, ident()) as c:  # mode "a" asked for: still read only
        assert not isinstance(c, ShardedCache) and not c.writable
        assert c.num_posters == 7 and c.records()[0].title == "Zero"
        assert c.text_embeddings(["a poster"]).shape == (1, 8)
        message = rf"^the cache {root} is of format 1, which is read-only: convert it with " \
                  rf"`clipposter cache migrate --cache {root}` to add posters$"
        with pytest.raises(ClipposterError, match=message):
            c.add_posters(["new"], unit(1))
        with pytest.raises(ClipposterError, match="cache migrate --cache"):
            c.upsert_records([(rec(1), "h1")])
    assert snapshot(root) == before


def test_embed_into_a_v1_cache_is_one_line_then_works_after_migrate(tmp_path, capsys, tiny_checkpoint,
                                                                     synthetic_set):
    src, _ = synthetic_set
    with open(src / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:6]
    for row in rows:
        row["image"] = str(src / row["image"])
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    v2 = tmp_path / "v2"
    code, _, err = run_cli(capsys, "embed", manifest, "--cache", v2, "--json", *tiny_args(tiny_checkpoint))
    assert code == 0, err
    from v1_cache import v1_copy

    root = v1_copy(v2, tmp_path / "v1")
    before = snapshot(root)
    code, out, err = run_cli(capsys, "embed", manifest, "--cache", root, "--json", *tiny_args(tiny_checkpoint))
    assert code == EXIT_ERROR and out == "" and err.count("\n") == 1, err
    assert err == (f"error: the cache {root} is of format 1, which is read-only: convert it with "
                   f"`clipposter cache migrate --cache {root}` to embed into it\n")
    assert snapshot(root) == before
    code, _, err = run_cli(capsys, "cache", "migrate", "--cache", root, "--json")
    assert code == 0, err
    code, out, err = run_cli(capsys, "embed", manifest, "--cache", root, "--json", *tiny_args(tiny_checkpoint))
    assert code == 0, err
    assert json.loads(out)["summary"]["encoded"] == 0  # every poster was migrated


def test_embed_writes_one_shard_per_flush(tmp_path, capsys, tiny_checkpoint, synthetic_set, monkeypatch):
    src, _ = synthetic_set
    args = ["--batch-size", "4", "--workers", "0", "--no-texts", "--json", *tiny_args(tiny_checkpoint)]
    code, out, err = run_cli(capsys, "embed", src / "manifest.csv", "--cache", tmp_path / "one", *args)
    assert code == 0, err
    posters = json.loads(out)["cache"]["posters"]
    with EmbeddingCache.open(tmp_path / "one", mode="r") as c:
        assert len(c.shard_names) == 1 and c.num_posters == posters
        one = np.asarray(c.image_matrix()).tobytes(), c.poster_hashes(), c.records()
    monkeypatch.setattr(embed_module, "FLUSH_ROWS", 40)
    code, out, err = run_cli(capsys, "embed", src / "manifest.csv", "--cache", tmp_path / "many", *args)
    assert code == 0, err
    with EmbeddingCache.open(tmp_path / "many", mode="r") as c:
        assert [e.posters for e in c.shard_entries] == [40] * (posters // 40) + ([posters % 40] if posters % 40 else [])
        assert (np.asarray(c.image_matrix()).tobytes(), c.poster_hashes(), c.records()) == one


# ------------------------------------------------------------------------------------------------
# the rows of several shards, read like one matrix
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def split_rows():
    full = unit(10).astype(np.float16)
    return full, ShardedRows([full[:3], full[3:3], full[3:7], full[7:]], 8, np.float16)


@pytest.mark.parametrize("key", [0, 3, 6, 9, -1, -10, np.int64(7)])
def test_sharded_rows_give_single_rows(split_rows, key):
    full, rows = split_rows
    assert rows[key].tobytes() == full[key].tobytes()


@pytest.mark.parametrize("key", [slice(None), slice(1, 3), slice(2, 8), slice(4, 5), slice(3, 7), slice(5, 2),
                                 slice(None, -2), slice(1, 9, 3), slice(None, None, -1), slice(0, 100)])
def test_sharded_rows_give_slices(split_rows, key):
    full, rows = split_rows
    got = rows[key]
    assert np.asarray(got).shape == full[key].shape and np.asarray(got).tobytes() == full[key].tobytes()
    assert len(got) == len(full[key])


def test_sharded_rows_slice_inside_one_shard_is_that_shards_map_and_across_is_a_view(split_rows):
    full, rows = split_rows
    assert isinstance(rows[4:6], np.ndarray) and np.shares_memory(rows[4:6], rows.parts[1])
    across = rows[:8]
    assert isinstance(across, ShardedRows) and across.shape == (8, 8) and across.dtype == np.float16
    assert np.asarray(across[6:8], dtype=np.float32).tobytes() == full[6:8].astype(np.float32).tobytes()


@pytest.mark.parametrize("key", [[9, 0, 4, 4], np.array([[1, 8], [3, 2]]), np.arange(10) % 3 == 0, [],
                                 [-1, 2]])
def test_sharded_rows_give_gathered_rows(split_rows, key):
    full, rows = split_rows
    expect = full[np.asarray(key, dtype=bool if isinstance(key, np.ndarray) and key.dtype == bool else np.int64)]
    assert rows[key].shape == expect.shape and rows[key].tobytes() == expect.tobytes()


def test_sharded_rows_refuse_rows_out_of_range(split_rows):
    _, rows = split_rows
    for key in (10, -11, [0, 10]):
        with pytest.raises(IndexError):
            rows[key]
    assert rows[2, 3] == split_rows[0][2, 3] and rows[[1, 2], 0].tolist() == split_rows[0][[1, 2], 0].tolist()


def test_a_cache_of_many_shards_is_searched_like_one(tmp_path):
    x = unit(3000, d=16, seed=5)
    c = new_cache(tmp_path / "many", identity=ident(dim=16))
    one = new_cache(tmp_path / "one", identity=ident(dim=16))
    recs = [(rec(i), f"h{i}") for i in range(3000)]
    one.add_posters([f"h{i}" for i in range(3000)], x, recs)
    for s in range(0, 3000, 700):
        c.add_posters([f"h{i}" for i in range(s, s + 700)][:3000 - s], x[s:s + 700], recs[s:s + 700])
    assert len(c.shard_names) == 5 and isinstance(c.image_matrix(), ShardedRows)
    chunks = list(c.iter_embeddings(chunk_rows=512))
    assert [s for s, _ in chunks] == list(range(0, 3000, 512))
    assert np.concatenate([r for _, r in chunks]).tobytes() == np.asarray(one.image_matrix()).tobytes()
    queries = unit(5, d=16, seed=9)
    for kind in ("exact", "hnsw", "ivfpq"):
        got = PosterIndex.build(c, kind, progress=False, nlist=8).search(queries, 5)
        want = PosterIndex.build(one, kind, progress=False, nlist=8).search(queries, 5)
        assert [[h.id for h in hs] for hs in got] == [[h.id for h in hs] for hs in want], kind


def test_a_budgeted_index_of_many_shards_reads_rows_from_the_shards(tmp_path):
    n = 30_000
    x = unit(n, d=64, seed=2)
    c = new_cache(tmp_path / "many", identity=ident(dim=64))
    one = new_cache(tmp_path / "one", identity=ident(dim=64))
    hashes, recs = [f"h{i}" for i in range(n)], [(rec(i), f"h{i}") for i in range(n)]
    one.add_posters(hashes, x, recs)
    for s in range(0, n, 7_000):
        c.add_posters(hashes[s:s + 7_000], x[s:s + 7_000], recs[s:s + 7_000])
    queries = unit(5, d=64, seed=9)
    got = PosterIndex.build(c, memory_budget="3MB", progress=False)
    want = PosterIndex.build(one, memory_budget="3MB", progress=False)
    assert got.engine.params["rerank"] == want.engine.params["rerank"] == RERANK_FROM_CACHE
    assert [[(h.id, h.score) for h in hs] for hs in got.search(queries, 5)] == \
        [[(h.id, h.score) for h in hs] for hs in want.search(queries, 5)]
