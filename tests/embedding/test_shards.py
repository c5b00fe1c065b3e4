"""The sharded cache (format 2): write-once shards, the atomic shard index, what a killed writer leaves."""
import multiprocessing
import os
import signal

import numpy as np
import pytest

from clipposter.embedding import shard_files as sf
from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.identity import BackboneIdentity
from clipposter.embedding.shards import ShardedCache, create_meta
from clipposter.errors import ClipposterError
from clipposter.records import PosterRecord


def ident(weights="sha256:aa", dim=8):
    return BackboneIdentity(model="m", weights=weights, image_size=32, mean=(0.5, 0.5, 0.5),
                            std=(0.2, 0.2, 0.2), interpolation="bicubic", resize_mode="shortest", embed_dim=dim)


def unit(n, d=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rec(i, split="train", **kw):
    return PosterRecord(id=f"p{i}", image=f"x/p{i}.jpg", genres=["Drama", f"g{i}"], split=split, **kw)


def new_cache(root, dtype="float16", identity=None):
    create_meta(root, identity or ident(), dtype, {"kind": "test"})
    return ShardedCache(root, identity or ident(), dtype, {"kind": "test"})


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_posters_read_back_by_id_split_and_hash_bit_exact(tmp_path):
    emb = unit(6)
    c = new_cache(tmp_path / "c")
    assert c.add_posters([f"h{i}" for i in range(4)], emb[:4],
                         [(rec(i, "train" if i % 2 else "test"), f"h{i}") for i in range(4)]) == 4
    assert c.add_posters(["h3", "h4", "h5", "h5"], emb[[3, 4, 5, 5]], [(rec(5, "validation"), "h5")]) == 2
    assert len(c.shard_names) == 2 and c.num_posters == 6 and c.num_records == 5
    for reader in (c, ShardedCache.open(tmp_path / "c", mode="r"), EmbeddingCache.open(tmp_path / "c", mode="r")):
        assert isinstance(reader, ShardedCache)
        stored = emb.astype(np.float16)
        got = reader.embeddings_for_ids(["p5", "p0", "p3"], dtype=np.float16)
        assert got.tobytes() == stored[[5, 0, 3]].tobytes()
        assert np.asarray(reader.image_matrix()).tobytes() == stored.tobytes()
        assert reader.embedding_for_hash("h4").astype(np.float16).tobytes() == stored[4].tobytes()
        assert reader.embedding_for_hash("nope") is None
        assert reader.rows_for_hashes(["h5", "h1", "zz"]) == {"h5": 5, "h1": 1}
        assert [r.id for r in reader.records(split="train")] == ["p1", "p3"]
        assert reader.records(split="validation") == [rec(5, "validation")]
        assert reader.id_rows() == {"p0": 0, "p1": 1, "p2": 2, "p3": 3, "p5": 5}
        assert reader.id_rows(["p5", "p1", "zz"], below=5) == {"p1": 1}
        assert reader.record_summaries(["p2"])["p2"] == (["Drama", "g2"], None, "x/p2.jpg")
        assert reader.info().splits == {"test": 2, "train": 2, "validation": 1}
        with pytest.raises(ClipposterError, match="poster id 'p4' is not in the cache"):
            reader.embeddings_for_ids(["p0", "p4"])
    # Every shard matrix is an ordinary .npy file: numpy reads it without clipposter.
    first = np.load(tmp_path / "c" / sf.SHARDS / c.shard_names[0] / "images.npy")
    assert first.tobytes() == emb[:4].astype(np.float16).tobytes()


def test_a_later_record_of_an_id_wins_and_a_hash_keeps_its_first_row(tmp_path):
    c = new_cache(tmp_path / "c")
    c.add_posters(["a"], unit(1), [(rec(0), "a")])
    c.upsert_records([(rec(0, "test", title="New"), "a")])
    with ShardedCache.open(tmp_path / "c", mode="r") as r:
        assert r.records() == [rec(0, "test", title="New")]
    # Two writers that embedded the same poster: the row listed first is the one read.
    sf.append_shard(tmp_path / "c", 8, np.float16, poster_hashes=["a"], images=unit(1, seed=9).astype(np.float16))
    with ShardedCache.open(tmp_path / "c", mode="r") as r:
        assert r.row_for_hash("a") == 0 and r.num_posters == 1 and len(r.image_matrix()) == 2
        assert r.embeddings_for_ids(["p0"]).astype(np.float16).tobytes() == unit(1).astype(np.float16).tobytes()


def test_records_of_many_shards_answer_as_the_last_record_of_each_id(tmp_path):
    """Ids upserted again and again across shards, records whose poster comes in a later shard or never:
    every lookup agrees with plain dicts of the last record of each id, for a reader and for the writer,
    which sees each shard it adds at once."""
    rng = np.random.default_rng(3)
    c = new_cache(tmp_path / "c")
    last: dict[str, tuple[PosterRecord, str]] = {}  # the reference: id → (last record, its hash)
    rows: dict[str, int] = {}  # content hash → first row
    splits = ("train", "test", "validation", None)
    for shard in range(6):
        recs = []
        for _ in range(15):
            i = int(rng.integers(40))
            r = PosterRecord(id=f"p{i:02d}", image=f"x/{shard}/{i}.jpg", genres=[f"g{shard}", f"g{i % 3}"],
                             split=splits[int(rng.integers(4))], title=f"t{shard}-{i}")
            recs.append((r, f"h{int(rng.integers(30))}"))
        hashes = [f"h{int(h)}" for h in rng.integers(30, size=5)]
        c.add_posters(hashes, unit(5, seed=shard), recs)
        for h in hashes:
            rows.setdefault(h, len(rows))
        last.update((r.id, (r, h)) for r, h in recs)
        want_rows = {pid: rows[h] for pid, (_, h) in sorted(last.items()) if h in rows}
        for cache in (c, ShardedCache.open(tmp_path / "c", mode="r")):
            assert cache.records() == [r for _, (r, _) in sorted(last.items())]
            assert cache.records_with_hashes() == [rh for _, rh in sorted(last.items())]
            assert cache.records(split="test") == [r for _, (r, _) in sorted(last.items()) if r.split == "test"]
            assert cache.num_records == len(last)
            assert cache.id_rows() == want_rows
            assert cache.id_rows(["p39", "p00", "zz", "p07"], below=6) == {
                p: r for p, r in want_rows.items() if p in ("p39", "p00", "p07") and r < 6}
            ids = list(want_rows)[::-1]
            assert cache.rows_for_ids(ids).tolist() == [want_rows[p] for p in ids]
            assert cache.record_summaries(["zz", *last]) == {
                pid: (r.genres, r.title, r.image) for pid, (r, _) in last.items()}
            assert cache.labelled_genres() == {pid: r.genres for pid, (r, _) in last.items()}
            counts: dict[str, int] = {}
            for r, _ in last.values():
                counts[r.split or "none"] = counts.get(r.split or "none", 0) + 1
            assert cache.info().splits == dict(sorted(counts.items()))
    unstored = sorted(pid for pid, (_, h) in last.items() if h not in rows)
    assert unstored  # the data has records without a poster, and rows_for_ids names one of them
    with pytest.raises(ClipposterError, match=f"poster id {unstored[0]!r} is not in the cache"):
        c.rows_for_ids(unstored)


def test_float32_texts_and_tokens(tmp_path):
    class Encoder:
        identity = ident()

        def __init__(self):
            self.calls = 0

        def encode_texts(self, texts, batch_size=256):
            self.calls += 1
            return np.stack([unit(1, seed=len(t))[0] for t in texts])

    c = new_cache(tmp_path / "c", dtype="float32")
    tokens = np.random.default_rng(1).normal(size=(3, 5, 4)).astype(np.float32)
    c.add_posters(["a", "b", "c"], unit(3), [(rec(i), h) for i, h in enumerate("abc")], tokens=tokens)
    enc = Encoder()
    first = c.text_embeddings(["x", "yy", "x"], backbone=enc)
    assert enc.calls == 1 and c.missing_texts(["x", "zzz"]) == ["zzz"]
    with ShardedCache.open(tmp_path / "c", mode="r") as r:
        assert r.image_matrix().dtype == np.float32
        np.testing.assert_array_equal(r.text_embeddings(["yy", "x"]), first[[1, 0]])
        np.testing.assert_array_equal(r.tokens_for_ids(["p2", "p0"]), tokens[[2, 0]])
        assert r.token_shape == (5, 4)


def test_a_read_only_open_writes_nothing_and_refuses_to_add(tmp_path):
    c = new_cache(tmp_path / "c")
    c.add_posters(["a"], unit(1), [(rec(0), "a")])
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*")}
    r = ShardedCache.open(tmp_path / "c", mode="r")
    with pytest.raises(ClipposterError, match="open read-only"):
        r.add_posters(["b"], unit(1))
    r.close()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*")} == before


def _killed_before_commit(root, partial):
    """A writer that dies after writing (and, unless `partial`, renaming) its shard, before listing it."""
    if partial:
        def write_shard(root, tmp, *a, **kw):
            (tmp / "images.npy").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        sf.write_shard = write_shard
    else:
        def commit(*a, **kw):
            os.kill(os.getpid(), signal.SIGKILL)
        sf.commit = commit
    cache = ShardedCache.open(root)
    cache.add_posters(["dead"], unit(1, seed=5))


@pytest.mark.parametrize("partial", [False, True])
def test_a_killed_writer_leaves_one_unlisted_shard_that_readers_ignore_and_writers_remove(tmp_path, partial):
    root = tmp_path / "c"
    new_cache(root).add_posters(["a"], unit(1), [(rec(0), "a")])
    proc = multiprocessing.get_context("fork").Process(target=_killed_before_commit, args=(root, partial))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    shards = sorted(p.name for p in (root / sf.SHARDS).iterdir())
    assert len(shards) == 2  # the listed one and the dead writer's
    with ShardedCache.open(root, mode="r") as r:
        assert r.num_posters == 1 and r.known_hashes(["dead"]) == set()
    assert sorted(p.name for p in (root / sf.SHARDS).iterdir()) == shards  # a reader removes nothing
    with ShardedCache.open(root) as w:
        assert w.num_posters == 1
        assert [p.name for p in (root / sf.SHARDS).iterdir()] == w.shard_names
        w.add_posters(["dead"], unit(1, seed=5))  # the rerun adds what the killed run lost
        assert w.num_posters == 2


def test_a_live_writers_unlisted_shard_is_not_removed(tmp_path):
    root = tmp_path / "c"
    new_cache(root)
    with sf.new_shard(root) as tmp:
        entry = sf.write_shard(root, tmp, 8, np.float16, poster_hashes=["x"], images=unit(1).astype(np.float16))
        assert sf.remove_unlisted(root) == []  # its writer still holds the shard's lock
        assert (root / sf.SHARDS / entry.name).is_dir()
        sf.commit(root, [entry])
    sf.finish_shard(root, entry.name)
    assert sf.remove_unlisted(root) == []
    assert ShardedCache.open(root, mode="r").known_hashes(["x"]) == {"x"}


def _append_many(root, start):
    cache = ShardedCache.open(root)
    for n in range(start, start + 20):
        cache.add_posters([f"h{n}"], unit(1, seed=n), [(PosterRecord(id=f"p{n}"), f"h{n}")])


def test_writers_in_several_processes_append_without_losing_a_row(tmp_path):
    root = tmp_path / "c"
    new_cache(root)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(root, s)) for s in (0, 100, 200)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with ShardedCache.open(root, mode="r") as r:
        assert r.num_posters == 60 and len(r.shard_names) == 60
        for n in (0, 119, 219):
            assert r.embeddings_for_ids([f"p{n}"]).astype(np.float16).tobytes() == \
                unit(1, seed=n).astype(np.float16).tobytes()


def test_a_damaged_or_missing_shard_is_one_clear_error(tmp_path):
    root = tmp_path / "c"
    c = new_cache(root)
    c.add_posters(["a", "b"], unit(2))
    name = c.shard_names[0]
    images = root / sf.SHARDS / name / "images.npy"
    data = images.read_bytes()
    images.write_bytes(data[:-16])
    with pytest.raises(ClipposterError, match=f"shard {name} of .* is damaged"):
        ShardedCache.open(root, mode="r")
    images.write_bytes(data)
    (root / sf.SHARDS / name / "posters.parquet").write_bytes(b"not parquet")
    with pytest.raises(ClipposterError, match="posters.parquet"):
        ShardedCache.open(root, mode="r")
    import shutil
    shutil.rmtree(root / sf.SHARDS / name)
    with pytest.raises(ClipposterError, match=f"shard {name} listed in .* is missing"):
        ShardedCache.open(root, mode="r")
    (root / sf.INDEX).write_text("{")
    with pytest.raises(ClipposterError, match="unreadable shard index"):
        ShardedCache.open(root, mode="r")


def test_another_backbone_is_refused_through_embedding_cache(tmp_path):
    new_cache(tmp_path / "c")
    with pytest.raises(ClipposterError, match="was made with backbone"):
        EmbeddingCache.open(tmp_path / "c", ident(weights="openai"))
    assert isinstance(EmbeddingCache.open(tmp_path / "c", ident()), ShardedCache)


def test_a_writer_in_a_folder_it_cannot_write_is_one_line(tmp_path):
    root = tmp_path / "c"
    new_cache(root).add_posters(["a"], unit(1))
    os.chmod(root, 0o555)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("running as a user that writes anywhere")
        with pytest.raises(ClipposterError, match="cannot write into"):
            ShardedCache.open(root)
        assert ShardedCache.open(root, mode="r").num_posters == 1
    finally:
        os.chmod(root, 0o755)
