"""Search benchmark: PosterIndex on N random unit vectors (default 1,000,000 × 512), and on clustered ones.

Random unit vectors are the hardest case for approximate search: no cluster structure, and a
query's 10th neighbour is barely closer than its 1000th (cosine ~0.19 vs ~0.14 at 1M × 512), so an
index has to score nearly every vector accurately. Real CLIP poster embeddings are far easier.

Everything runs through the product's own code path: the vectors go into a real EmbeddingCache
(float16, as `embed` writes it) and are searched with `PosterIndex.search`, one query at a time as an
interactive user would (Python overhead and id mapping included). Every latency percentile comes
from the same --queries single queries per query set. Reported:

  exact   single-query p50/p99 latency (the `exact` kind) and batch throughput (blocked products)
  ivfpq   build time (training, encoding, self-tuning, loading the re-ranking vectors), index
          memory, p50/p99 single-query latency, batch throughput, recall@10 against exact search,
          for held-out random queries (the target) and for perturbed copies of database vectors
          (cosine ~0.9 to their source: a near-duplicate-like query); plus a sweep of re-ranking
          depths to show the latency/recall trade-off. On random vectors the index finds no
          cluster structure and drops IVF: what is measured there is a flat 4-bit PQ fast-scan of
          every code plus exact re-ranking, and the output says so ("structure")
  hnsw    the same on the first --hnsw-n vectors (building 1M on 2 cores would take too long)
  clustered  exact and ivfpq on --clustered-n vectors drawn around --clusters centres (cosine ~0.8
          to their centre, like the genre/style groups of real posters), with held-out queries from
          the same mixture: the case where the IVF partition is kept and only a few lists are probed

Target from the issue: ANN p50 ≤ 5 ms at recall@10 ≥ 0.95 on random queries, on this machine.

    python scripts/bench/search.py [--n 1000000] [--dim 512] [--queries 500] [--hnsw-n 100000]
                                   [--clustered-n 1000000] [--clusters 1000] [--quick] [--json]

--quick: 200,000 random and 200,000 clustered vectors, no HNSW (a few minutes on 2 busy cores).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clipposter.embedding.backbone import BackboneIdentity
from clipposter.embedding.cache import EmbeddingCache
from clipposter.records import PosterRecord
from clipposter.search.engines import blocked_topk
from clipposter.search.index import PosterIndex

TARGET_P50_MS = 5.0
TARGET_RECALL = 0.95
CHUNK = 100_000


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class Clustered:
    """Unit vectors drawn around fixed random centres: centre + spread × Gaussian noise of the same
    scale, normalised (spread 0.5: cosine ≈ 0.89 to the centre, ≈ 0.8 between two cluster-mates)."""

    def __init__(self, rng: np.random.Generator, clusters: int, dim: int, spread: float = 0.5):
        self.centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        self.spread = spread

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = self.centres[rng.integers(0, len(self.centres), n)]
        x = x + self.spread * rng.standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def make_cache(root: Path, n: int, dim: int, seed: int, dtype: str, draw=None) -> EmbeddingCache:
    """A real cache holding n unit vectors (ids v0000000...), written in chunks: random ones, or
    draw(rng, m) for other distributions."""
    identity = BackboneIdentity(model="bench-random-vectors", weights="none", image_size=0, mean=(), std=(),
                                interpolation="none", resize_mode="none", embed_dim=dim)
    cache = EmbeddingCache.open(root, identity, dtype=dtype)
    rng = np.random.default_rng(seed)
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        hashes = [f"{i:064x}" for i in range(s, s + m)]
        recs = [(PosterRecord(id=f"v{i:07d}"), h) for i, h in zip(range(s, s + m), hashes)]
        cache.add_posters(hashes, unit_vectors(rng, m, dim) if draw is None else draw(rng, m), recs)
    return cache


def structure(params: dict) -> str:
    """What an ivfpq index actually is, in words: the benchmark names what it measured."""
    pq = f"PQ{params['pq_subquantizers']}×{params['pq_bits']} fast-scan"
    if params.get("nlist", 1) <= 1:
        shards = params.get("shards", 1)
        return (f"flat {pq} of every code (IVF dropped: 1 list, {shards} shard{'s' if shards > 1 else ''}) "
                f"+ exact float16 re-ranking, k_factor {params['k_factor']}")
    return (f"IVF {params['nlist']} lists, nprobe {params['nprobe']}, {pq} of the probed lists "
            f"+ exact float16 re-ranking, k_factor {params['k_factor']}")


def recall_at(found: list[list[int]], truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def single_queries(index: PosterIndex, queries: np.ndarray, k: int = 10) -> tuple[list[list[int]], np.ndarray]:
    for q in queries[:5]:  # warm-up: first-touch of pages and lookup tables
        index.search(q, k)
    rows, lat = [], []
    for q in queries:
        t = time.perf_counter()
        hits = index.search(q, k)[0]
        lat.append(time.perf_counter() - t)
        rows.append([h.row for h in hits])
    return rows, np.asarray(lat) * 1e3


def lat_stats(lat_ms: np.ndarray) -> dict:
    return {"p50_ms": round(float(np.percentile(lat_ms, 50)), 3), "p99_ms": round(float(np.percentile(lat_ms, 99)), 3),
            "mean_ms": round(float(lat_ms.mean()), 3)}


def batch_qps(index: PosterIndex, queries: np.ndarray, k: int = 10) -> float:
    t = time.perf_counter()
    index.search(queries, k)
    return round(len(queries) / (time.perf_counter() - t), 1)


def evaluate(index: PosterIndex, sets: dict, log) -> dict:
    out = {}
    for name, (queries, truth) in sets.items():
        rows, lat = single_queries(index, queries)
        out[name] = {"recall_at_10": round(recall_at(rows, truth), 4), **lat_stats(lat),
                     "batch_qps": batch_qps(index, queries)}
        log(f"  {name:>9}: recall@10 {out[name]['recall_at_10']:.3f}  p50 {out[name]['p50_ms']:.2f} ms  "
            f"p99 {out[name]['p99_ms']:.2f} ms  batch {out[name]['batch_qps']:.0f} q/s")
    return out


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="database vectors (default 1,000,000; --quick 200,000)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=500, help="queries per query set (random, perturbed)")
    ap.add_argument("--hnsw-n", type=int, default=None,
                    help="vectors for the HNSW comparison (default 100,000; --quick 0; 0: skip)")
    ap.add_argument("--clustered-n", type=int, default=None,
                    help="clustered vectors for the run where IVF is kept (default: --n; 0: skip)")
    ap.add_argument("--clusters", type=int, default=1000, help="cluster centres of the clustered run")
    ap.add_argument("--quick", action="store_true",
                    help="200,000 random and 200,000 clustered vectors, no HNSW (explicit --n etc. still win)")
    ap.add_argument("--sweep", default="32,64,128,192,256,384,512,768",
                    help="ivfpq re-ranking depths (k_factor) to sweep on random queries")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="cache dtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the temporary cache goes (default: system temp)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.n is None:
        args.n = 200_000 if args.quick else 1_000_000
    if args.hnsw_n is None:
        args.hnsw_n = 0 if args.quick else 100_000
    if args.clustered_n is None:
        args.clustered_n = args.n
    if args.n < 100 or args.dim < 8 or args.dim % 2:
        ap.error("--n must be at least 100 and --dim an even number ≥ 8")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    started = time.perf_counter()
    report: dict = {"n": args.n, "dim": args.dim, "dtype": args.dtype, "queries": args.queries,
                    "cpus": os.cpu_count(), "load_average_start": [round(x, 2) for x in os.getloadavg()],
                    "target": {"p50_ms": TARGET_P50_MS, "recall_at_10": TARGET_RECALL}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-", dir=args.workdir))
    try:
        t = time.perf_counter()
        cache = make_cache(tmp / "cache", args.n, args.dim, args.seed, args.dtype)
        report["cache_write_s"] = round(time.perf_counter() - t, 1)
        log(f"cache: {args.n:,} × {args.dim} {args.dtype} random unit vectors written in {report['cache_write_s']} s")
        matrix = cache.image_matrix()

        # Query sets: held-out random unit vectors (the target's case) and perturbed database vectors.
        rng = np.random.default_rng(args.seed + 1)
        q_random = unit_vectors(rng, args.queries, args.dim)
        src = rng.choice(args.n, args.queries, replace=False)
        noise = unit_vectors(rng, args.queries, args.dim) * 0.5  # cos(query, source) ≈ 1/sqrt(1.25) ≈ 0.89
        q_pert = np.asarray(matrix[src], dtype=np.float32) + noise
        q_pert /= np.linalg.norm(q_pert, axis=1, keepdims=True)

        t = time.perf_counter()
        _, gt = blocked_topk(matrix, np.concatenate([q_random, q_pert]), 10, progress=not args.json)
        gt_s = time.perf_counter() - t
        sets = {"random": (q_random, gt[:args.queries]), "perturbed": (q_pert, gt[args.queries:])}
        report["exact_batch"] = {"queries": 2 * args.queries, "seconds": round(gt_s, 2),
                                 "qps": round(2 * args.queries / gt_s, 1)}
        log(f"exact, batch of {2 * args.queries} (blocked float32 products over the memmap): {gt_s:.1f} s, "
            f"{report['exact_batch']['qps']} q/s")

        # Exact kind, single queries: the same random queries as the approximate engines.
        t = time.perf_counter()
        exact = PosterIndex.build(cache, kind="exact", progress=False)
        exact.warm()
        exact_ready = time.perf_counter() - t
        rows, lat = single_queries(exact, q_random)
        report["exact_single"] = {"ready_s": round(exact_ready, 2), "queries": len(q_random), **lat_stats(lat),
                                  "recall_at_10": round(recall_at(rows, gt[:args.queries]), 4),
                                  "bytes": exact.engine.nbytes()}
        log(f"exact, single queries ({len(q_random)}): p50 {report['exact_single']['p50_ms']:.1f} ms, "
            f"p99 {report['exact_single']['p99_ms']:.1f} ms (recall {report['exact_single']['recall_at_10']:.3f})")
        del exact

        # IVF-PQ (the auto kind above the threshold).
        t = time.perf_counter()
        index = PosterIndex.build(cache, kind="ivfpq", progress=not args.json)
        built = time.perf_counter() - t
        index.warm()  # the re-ranking vectors: part of being ready to serve
        ready = time.perf_counter() - t
        t = time.perf_counter()
        index.save()
        save_s = time.perf_counter() - t
        t = time.perf_counter()
        PosterIndex.load(cache, progress=False).warm()
        load_s = time.perf_counter() - t
        info = index.info()
        ivf = {"structure": structure(info["params"]),
               "build_s": round(built, 1), "ready_s": round(ready, 1), "save_s": round(save_s, 2),
               "load_s": round(load_s, 2), "params": info["params"], "notes": info["notes"],
               "tuned_recall_at_10": info.get("tuned_recall_at_10"), "bytes": info["bytes"],
               "pq_code_bytes": int(index.engine.base.code_size * index.ntotal),
               "disk_bytes": disk_bytes(index.directory)}
        log(f"ivfpq: built in {built:.1f} s (ready {ready:.1f} s), {info['bytes'] / 2**20:.0f} MiB in memory "
            f"({ivf['pq_code_bytes'] / 2**20:.0f} MiB PQ codes + re-ranking vectors), params {info['params']}")
        log(f"ivfpq on random vectors measures: {ivf['structure']}")
        ivf.update(evaluate(index, sets, log))
        sweep = []
        tuned_kf = index.engine.params["k_factor"]
        for kf in [int(x) for x in args.sweep.split(",") if x]:
            index.engine.params["k_factor"] = kf
            rows, lat = single_queries(index, q_random[:min(200, args.queries)])
            point = {"k_factor": kf, "candidates": index.engine.rerank_depth(10),
                     "recall_at_10": round(recall_at(rows, gt[:len(rows)]), 4), **lat_stats(lat)}
            sweep.append(point)
            log(f"  sweep k_factor {kf:>4} ({point['candidates']:>5} re-ranked): "
                f"recall@10 {point['recall_at_10']:.3f}  "
                f"p50 {point['p50_ms']:.2f} ms  p99 {point['p99_ms']:.2f} ms")
        index.engine.params["k_factor"] = tuned_kf
        ivf["sweep_random"] = sweep
        ok = [p for p in sweep if p["recall_at_10"] >= TARGET_RECALL]
        ivf["best_point_meeting_recall"] = min(ok, key=lambda p: p["p50_ms"]) if ok else None
        report["ivfpq"] = ivf
        del index

        if args.hnsw_n:
            m = min(args.hnsw_n, args.n)
            sub = EmbeddingCache.open(tmp / "cache_hnsw", cache.identity, dtype=args.dtype)
            for s in range(0, m, CHUNK):
                e = min(m, s + CHUNK)
                hashes = [f"{i:064x}" for i in range(s, e)]
                sub.add_posters(hashes, np.asarray(matrix[s:e]), [(PosterRecord(id=f"v{i:07d}"), h)
                                                                  for i, h in zip(range(s, e), hashes)])
            _, gt_sub = blocked_topk(sub.image_matrix(), np.concatenate([q_random, q_pert]), 10)
            sub_sets = {"random": (q_random, gt_sub[:args.queries]), "perturbed": (q_pert, gt_sub[args.queries:])}
            hn: dict = {"n": m}
            for kind in ("hnsw", "ivfpq"):
                t = time.perf_counter()
                idx = PosterIndex.build(sub, kind=kind, progress=not args.json)
                idx.warm()
                b = time.perf_counter() - t
                log(f"{kind} on the first {m:,}: built in {b:.1f} s, params {idx.engine.params}")
                hn[kind] = {"build_s": round(b, 1), "params": dict(idx.engine.params), "bytes": idx.engine.nbytes(),
                            "notes": list(idx.engine.notes), **evaluate(idx, sub_sets, log)}
                if kind == "ivfpq":
                    hn[kind]["structure"] = structure(idx.engine.params)
                if kind == "hnsw":
                    pts = []
                    for ef in (64, 256, 1024, 2048):
                        idx.engine.set_search_params(ef)
                        rows, lat = single_queries(idx, q_random[:min(200, args.queries)])
                        pts.append({"efSearch": ef, "recall_at_10": round(recall_at(rows, gt_sub[:len(rows)]), 4),
                                    **lat_stats(lat)})
                        log(f"  sweep efSearch {ef:>4}: recall@10 {pts[-1]['recall_at_10']:.3f}  "
                            f"p50 {pts[-1]['p50_ms']:.2f} ms")
                    hn[kind]["sweep_random"] = pts
                del idx
            report["subset"] = hn

        if args.clustered_n:
            del cache, matrix
            report["clustered"] = clustered_run(tmp / "cache_clustered", args, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["total_s"] = round(time.perf_counter() - started, 1)
    r = report["ivfpq"]["random"]
    report["target_met"] = bool(r["p50_ms"] <= TARGET_P50_MS and r["recall_at_10"] >= TARGET_RECALL)
    log(f"target (random queries, p50 ≤ {TARGET_P50_MS} ms at recall@10 ≥ {TARGET_RECALL}): "
        f"{'met' if report['target_met'] else 'NOT met'} — p50 {r['p50_ms']:.2f} ms, recall {r['recall_at_10']:.3f}; "
        f"peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB; total {report['total_s']} s; "
        f"load average {report['load_average_start']} → {report['load_average_end']}")
    if "clustered" in report:
        c = report["clustered"]
        log(f"clustered ({c['n']:,} vectors, {c['clusters']} clusters): ivfpq {c['ivfpq']['structure']}; "
            f"p50 {c['ivfpq']['queries']['p50_ms']:.2f} ms at recall@10 {c['ivfpq']['queries']['recall_at_10']:.3f} "
            f"vs exact p50 {c['exact_single']['p50_ms']:.2f} ms")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def clustered_run(root: Path, args, log) -> dict:
    """Exact and ivfpq on clustered vectors, with held-out queries from the same mixture."""
    rng = np.random.default_rng(args.seed + 2)
    mixture = Clustered(rng, args.clusters, args.dim)
    t = time.perf_counter()
    cache = make_cache(root, args.clustered_n, args.dim, args.seed + 3, args.dtype, draw=mixture.draw)
    log(f"clustered cache: {args.clustered_n:,} × {args.dim} around {args.clusters} centres written in "
        f"{time.perf_counter() - t:.1f} s")
    queries = mixture.draw(np.random.default_rng(args.seed + 4), args.queries)
    _, gt = blocked_topk(cache.image_matrix(), queries, 10)
    out: dict = {"n": args.clustered_n, "clusters": args.clusters, "queries": args.queries}

    exact = PosterIndex.build(cache, kind="exact", progress=False)
    exact.warm()
    rows, lat = single_queries(exact, queries)
    out["exact_single"] = {**lat_stats(lat), "recall_at_10": round(recall_at(rows, gt), 4)}
    log(f"clustered, exact single queries ({len(queries)}): p50 {out['exact_single']['p50_ms']:.2f} ms, "
        f"p99 {out['exact_single']['p99_ms']:.2f} ms")
    del exact

    t = time.perf_counter()
    index = PosterIndex.build(cache, kind="ivfpq", progress=not args.json)
    index.warm()
    ready = time.perf_counter() - t
    info = index.info()
    out["ivfpq"] = {"structure": structure(info["params"]), "ivf_kept": info["params"].get("nlist", 1) > 1,
                    "ready_s": round(ready, 1), "params": info["params"], "notes": info["notes"],
                    "tuned_recall_at_10": info.get("tuned_recall_at_10"), "bytes": info["bytes"]}
    log(f"clustered, ivfpq: ready in {ready:.1f} s; measures: {out['ivfpq']['structure']}")
    out["ivfpq"].update(evaluate(index, {"queries": (queries, gt)}, log))
    return out


if __name__ == "__main__":
    sys.exit(main())
