"""Cache read benchmark: embeddings for 100K poster ids, sharded cache (format 2) against format 1.

One run builds a format-1 cache of --n random unit vectors (float16, width --dim, each with a record),
migrates it to a sharded cache in one shard and in --shards shards, and times, on each, with the same
random ids and a warm page cache (the median of --repeats):

  open       opening the cache read-only (the sharded one reads every shard's tables)
  by_id      embeddings_for_ids(--ids random ids) → float32, the call heads and search make
  by_split   records(split="train")
  by_hash    rows_for_hashes(--ids content hashes)
  first_ids  the first rows_for_ids(--ids ids) after an open: a sharded cache indexes its records then
  first_one  the first record_summaries of one id after an open (what a search result shows first)

and prints each time with its ratio to format 1 (target: by_id no slower than 1.2×). The two `first_`
times open the cache anew before each call.

    python scripts/bench/cache_read.py [--n 200000] [--dim 512] [--ids 100000] [--shards 8] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.cache_convert import migrate
from clipposter.embedding.identity import BackboneIdentity
from clipposter.records import PosterRecord


def build_v1(root: Path, n: int, dim: int) -> None:
    ident = BackboneIdentity(model="bench", weights="sha256:0", image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3,
                             interpolation="bicubic", resize_mode="shortest", embed_dim=dim)
    rng = np.random.default_rng(0)
    splits = ("train", "validation", "test")
    with EmbeddingCache.open_v1(root, ident) as cache:
        for start in range(0, n, 4096):
            stop = min(n, start + 4096)
            x = rng.normal(size=(stop - start, dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            hashes = [f"{i:064x}" for i in range(start, stop)]
            recs = [(PosterRecord(id=f"tt{i:08d}", image=f"posters/{i}.jpg", genres=["Drama"],
                                  split=splits[i % 3]), h) for i, h in zip(range(start, stop), hashes)]
            cache.add_posters(hashes, x, recs)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def measure(root: Path, ids: list[str], hashes: list[str], repeats: int) -> tuple[dict, np.ndarray]:
    t_open, cache = timed(lambda: EmbeddingCache.open(root, mode="r"), repeats)
    t_id, emb = timed(lambda: cache.embeddings_for_ids(ids), repeats)
    t_split, _ = timed(lambda: cache.records(split="train"), repeats)
    t_hash, _ = timed(lambda: cache.rows_for_hashes(hashes), repeats)
    t_first_ids = first_lookup(root, lambda c: c.rows_for_ids(ids), repeats)
    t_first_one = first_lookup(root, lambda c: c.record_summaries(ids[:1]), repeats)
    return {"open": t_open, "by_id": t_id, "by_split": t_split, "by_hash": t_hash, "first_ids": t_first_ids,
            "first_one": t_first_one}, emb


def first_lookup(root: Path, fn, repeats: int) -> float:
    """The median time of `fn(cache)` on a cache opened just before it (the open not counted)."""
    times = []
    for _ in range(repeats):
        cache = EmbeddingCache.open(root, mode="r")
        t = time.perf_counter()
        fn(cache)
        times.append(time.perf_counter() - t)
        cache.close()
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ids", type=int, default=100_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rng = np.random.default_rng(1)
    picks = rng.choice(args.n, size=min(args.ids, args.n), replace=False)
    ids = [f"tt{i:08d}" for i in picks]
    hashes = [f"{i:064x}" for i in picks]
    with tempfile.TemporaryDirectory() as tmp:
        v1 = Path(tmp) / "v1"
        build_v1(v1, args.n, args.dim)
        migrate(v1, Path(tmp) / "v2-1")
        migrate(v1, Path(tmp) / f"v2-{args.shards}", shard_rows=-(-args.n // args.shards))
        results, reference = {}, None
        for name, root in (("v1", v1), ("v2, 1 shard", Path(tmp) / "v2-1"),
                           (f"v2, {args.shards} shards", Path(tmp) / f"v2-{args.shards}")):
            results[name], emb = measure(root, ids, hashes, args.repeats)
            if reference is None:
                reference = emb
            elif not np.array_equal(emb, reference):
                print(f"error: {name} returned other embeddings than v1", file=sys.stderr)
                return 1
    base = results["v1"]
    ratios = {name: {k: v / base[k] for k, v in r.items()} for name, r in results.items()}
    if args.json:
        print(json.dumps({"n": args.n, "dim": args.dim, "ids": len(ids), "seconds": results, "ratio_to_v1": ratios},
                         indent=2))
        return 0
    print(f"{args.n} posters × {args.dim} (float16), {len(ids)} ids; median of {args.repeats}; ratio to v1")
    for name, r in results.items():
        print(f"{name:>14}: " + "  ".join(f"{k} {v * 1000:.1f} ms ({ratios[name][k]:.2f}×)" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
