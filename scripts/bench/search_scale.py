"""Search at scale: the index built within a memory budget against today's in-memory build, same cache.

A real float16 cache of N clustered unit vectors (default 200,000 × 512) is indexed twice, each build
in a fresh process so that its peak memory (VmHWM, growth from just before the build) is its own:

  in-memory   kind ivfpq, no budget: trained on 50,000 rows, float32 add chunks of 65,536 rows, and
              the float16 re-ranking store (a copy of every row) loaded as the first query would
  budgeted    --memory-budget (default 64MB): IVF-PQ trained on a seeded sample of 30-256 points per
              list, rows encoded chunk by chunk through EmbeddingCache.iter_embeddings, re-ranking
              from the memory-mapped cache

Reported per build: peak memory growth, build seconds (and the budgeted build's train / add split,
as seconds per sampled and per added vector: the figures docs/scaling.md scales to 10M and 100M),
index bytes, single-query p50/p99 and recall@10 against exact search on held-out queries from the
same mixture. Ratios are budgeted / in-memory, measured in this run.

    python scripts/bench/search_scale.py [--n 200000] [--dim 512] [--budget 64MB] [--queries 300] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import Clustered, lat_stats, make_cache, recall_at  # noqa: E402  (the search benchmark's helpers)

from clipposter.search.engines import blocked_topk  # noqa: E402

_CHILD = r"""
import json, sys, time
import numpy as np
from clipposter.embedding.cache import EmbeddingCache
from clipposter.search.index import PosterIndex

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

root, budget, qfile = sys.argv[1], sys.argv[2], sys.argv[3]
cache = EmbeddingCache.open(root, mode="r")
import faiss
cache.id_rows()  # the id map every index reads reaches its peak before the baseline
before = hwm()
t = time.perf_counter()
index = PosterIndex.build(cache, kind="ivfpq", memory_budget=None if budget == "none" else budget, progress=False)
index.warm()
build = time.perf_counter() - t
grew = hwm() - before
queries = np.load(qfile)
for q in queries[:5]:
    index.search(q, 10)
rows, lat = [], []
for q in queries:
    t = time.perf_counter()
    rows.append([h.row for h in index.search(q, 10)[0]])
    lat.append((time.perf_counter() - t) * 1e3)
info = index.info()
print(json.dumps({"grew": grew, "build_s": build, "rows": rows, "lat_ms": lat, "bytes": info["bytes"],
                  "params": info["params"], "notes": info["notes"],
                  "train_s": info.get("train_seconds"), "add_s": info.get("add_seconds")}))
"""


def run_build(root: Path, budget: str, qfile: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    done = subprocess.run([sys.executable, "-c", _CHILD, str(root), budget, str(qfile)], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise SystemExit(f"build with budget {budget} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--budget", default="64MB")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    tmp = Path(tempfile.mkdtemp(prefix="search-scale-"))
    try:
        mixture = Clustered(np.random.default_rng(0), args.clusters, args.dim)
        cache = make_cache(tmp / "cache", args.n, args.dim, 1, "float16", draw=mixture.draw)
        queries = mixture.draw(np.random.default_rng(2), args.queries)
        _, truth = blocked_topk(cache.image_matrix(), queries, 10)
        cache.close()
        qfile = tmp / "queries.npy"
        np.save(qfile, queries)
        fp16 = args.n * args.dim * 2
        log(f"{args.n:,} × {args.dim} float16 vectors ({fp16 / 1e6:.0f} MB), {args.clusters} clusters")
        out = {"n": args.n, "dim": args.dim, "budget": args.budget, "cache_matrix_bytes": fp16}
        for name, budget in (("in_memory", "none"), ("budgeted", args.budget)):
            r = run_build(tmp / "cache", budget, qfile)
            out[name] = {"peak_growth_bytes": r["grew"], "build_seconds": round(r["build_s"], 2),
                         "index_bytes": r["bytes"], "recall_at_10": round(recall_at(r["rows"], truth), 4),
                         **lat_stats(np.asarray(r["lat_ms"])), "params": r["params"], "notes": r["notes"]}
            if r["train_s"] is not None:
                trained = r["params"]["trained_rows"]
                out[name].update({"train_seconds": r["train_s"], "add_seconds": r["add_s"],
                                  "train_us_per_sampled_vector": round(r["train_s"] / trained * 1e6, 2),
                                  "add_us_per_vector": round(r["add_s"] / args.n * 1e6, 3)})
            o = out[name]
            log(f"  {name:>9}: peak +{o['peak_growth_bytes'] / 1e6:.0f} MB  build {o['build_seconds']:.1f} s  "
                f"index {o['index_bytes'] / 1e6:.1f} MB  recall@10 {o['recall_at_10']:.3f}  "
                f"p50 {o['p50_ms']:.2f} ms  p99 {o['p99_ms']:.2f} ms")
        a, b = out["in_memory"], out["budgeted"]
        out["ratios_budgeted_over_in_memory"] = {
            "peak_memory": round(b["peak_growth_bytes"] / a["peak_growth_bytes"], 3),
            "build_seconds": round(b["build_seconds"] / a["build_seconds"], 3),
            "p50_latency": round(b["p50_ms"] / a["p50_ms"], 3),
            "recall_at_10": round(b["recall_at_10"] / a["recall_at_10"], 3)}
        log("  budgeted / in-memory: " + "  ".join(f"{k} {v:.2f}×" for k, v in
                                                    out["ratios_budgeted_over_in_memory"].items()))
        if args.json:
            print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
