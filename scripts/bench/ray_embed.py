"""The Ray engine of `embed` against the local engine, measured in one run on the same posters.

  (a) local          embed_records in this process (decode threads ahead of the model): the baseline
  (b) ray x1         embed_records_ray on a local Ray: decode in CPU tasks, one encoder actor
  (c) ray x2         the same with two encoder actors (`--concurrency 2`)
  (t) ... +tokens    (a) and (b) storing each poster's token sequence too (`tokens=True`); skip: --no-tokens
  (n) 2 nodes x1/x2  with `--nodes 2`: (b) and (c) on a Ray cluster of a head (no CPUs: it schedules
                     only) and 2 worker nodes, `--cpus` split between them, all on this machine
                     (ray.cluster_utils.Cluster: a raylet and an object store per node); the engine
                     is given the cluster's address, as `--address` gives it
  (d) resume         the Ray job run as `clipposter embed --engine ray` in a subprocess, SIGKILLed once
                     half the posters are committed, then rerun: how many committed posters the rerun
                     encoded again (must be 0), and the time lost (kill + rerun − an uninterrupted run)

Each row fills a fresh cache from the same JPEG files with the same backbone and batch size;
posters/s counts the whole call (hashing, and for Ray the actors' start and model load). Ray itself
(the local Ray, then the cluster) is started once before its rows and warmed by one job of one block
(Ray Data starts its own helper actors on a cluster's first job); start and warm-up are reported on
their own. Ratios are against (a). Every Ray row checks its embeddings (and token sequences) against (a)'s.

    python scripts/bench/ray_embed.py [--posters 192] [--batch-size 16] [--cpus 2] [--nodes 2]
                                      [--no-tokens] [--no-resume] [--json]

Figures and what they mean: docs/scaling.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def fresh_cache(root: Path, backbone):
    from clipposter.embedding.cache import EmbeddingCache

    return EmbeddingCache.open(root, backbone.identity, backbone_spec=backbone.spec)


def committed(cache_dir: Path) -> int:
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.errors import ClipposterError

    try:
        with EmbeddingCache.open(cache_dir, mode="r") as cache:
            return cache.num_posters
    except (ClipposterError, OSError):
        return 0


def min_cosine(ref, cache, ids, tokens: bool) -> float:
    """The smallest cosine between `cache`'s and `ref`'s embeddings of the same posters (with `tokens`,
    also over every token row of every poster)."""
    cos = float(np.min(np.sum(ref.embeddings_for_ids(ids) * cache.embeddings_for_ids(ids), axis=1)))
    if tokens:
        a, b = (c.tokens_for_ids(ids).astype(np.float32) for c in (ref, cache))
        cos = min(cos, float(np.min(np.sum(a * b, axis=-1))))
    return cos


def start_cluster(root: Path, nodes: int, cpus: int):
    """A Ray cluster on this machine: a head without CPUs and `nodes` worker nodes sharing `cpus`."""
    from ray.cluster_utils import Cluster

    # the cluster notes its address under Ray's default temporary folder: keep that inside `root`
    os.environ["RAY_TMPDIR"] = str(root)
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": str(root / "ray")})
    for n in range(nodes):
        cluster.add_node(num_cpus=cpus // nodes + (n < cpus % nodes))
    cluster.wait_for_nodes()
    return cluster


def resume(src: Path, root: Path, args, address: str, full_seconds: float) -> dict:
    """Kill the Ray job at half its posters, rerun it, and count what the rerun redid."""
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.embedding.ray_engine import embed_records_ray
    from clipposter.ingest.sources import load_source

    cache_dir = root / "resume"
    cmd = [sys.executable, "-m", "clipposter.cli.main", "embed", str(src / "manifest.csv"), "--cache", str(cache_dir),
           "--backbone", args.backbone, "--pretrained", "random", "--engine", "ray", "--address", address,
           "--concurrency", "1", "--batch-size", str(args.batch_size), "--no-texts", "--json"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    half = args.posters // 2
    while proc.poll() is None and committed(cache_dir) < half:
        time.sleep(0.05)
    if proc.poll() is not None:
        return {"error": "the job ended before half its posters were committed"}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    until_kill = time.perf_counter() - started
    at_kill = committed(cache_dir)
    records = load_source(str(src / "manifest.csv"))
    with EmbeddingCache.open(cache_dir) as cache:
        start = time.perf_counter()
        summary = embed_records_ray(records, cache, batch_size=args.batch_size, concurrency=1, progress=False)
        rerun = time.perf_counter() - start
        total = cache.num_posters
    return {"committed_at_kill": at_kill, "rerun_encoded": summary.encoded, "posters": total,
            "committed_redone": at_kill + summary.encoded - total,
            "seconds_until_kill": round(until_kill, 2), "rerun_seconds": round(rerun, 2),
            "seconds_lost": round(until_kill + rerun - full_seconds, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="ViT-B-32")
    ap.add_argument("--posters", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--size", default="500x750", help="poster size WxH (TMDB's w500 posters are 500x750)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs the local Ray (and the cluster of --nodes) may use")
    ap.add_argument("--nodes", type=int, default=0, help="also run (b) and (c) on a cluster of this many "
                                                          "worker nodes on this machine (0: not)")
    ap.add_argument("--no-tokens", action="store_true", help="skip the rows with token sequences")
    ap.add_argument("--no-resume", action="store_true", help="skip (d)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.nodes and not 1 <= args.nodes <= args.cpus:
        ap.error(f"--nodes must be between 1 and --cpus ({args.cpus}), got {args.nodes}")

    import ray
    import torch

    from clipposter.embedding.backbone import load_backbone
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.embedding.embed import embed_records
    from clipposter.embedding.ray_engine import embed_records_ray
    from clipposter.ingest.synthetic import generate_posters

    w, h = (int(x) for x in args.size.split("x"))
    root = Path(tempfile.mkdtemp(prefix="raybench"))
    src = root / "posters"
    records = generate_posters(src, n=args.posters, seed=0, size=(w, h))
    backbone = load_backbone(args.backbone, None, device="cpu")
    rows = {}
    ids = [r.id for r in records]

    def folder(name: str) -> Path:
        return root / name.replace(" ", "").replace("+", "-")

    for name, tokens in (("local", False), ("local +tokens", True))[:1 if args.no_tokens else 2]:
        with fresh_cache(folder(name), backbone) as cache:
            s = embed_records(records, cache, backbone, batch_size=args.batch_size, tokens=tokens, progress=False)
        assert s.encoded == len(records), s.to_dict()
        rows[name] = {"posters_per_second": s.encoded / s.seconds, "seconds": s.seconds}

    def warm_up(address: str | None = None) -> None:
        with fresh_cache(root / f"warm-up{len(rows)}", backbone) as cache:
            embed_records_ray(records[:args.batch_size], cache, batch_size=args.batch_size, concurrency=1,
                              address=address, progress=False)

    def ray_row(name: str, actors: int, tokens: bool = False, address: str | None = None) -> None:
        cache = fresh_cache(folder(name), backbone)
        s = embed_records_ray(records, cache, batch_size=args.batch_size, concurrency=actors, tokens=tokens,
                              address=address, progress=False)
        assert s.encoded == len(records), s.to_dict()
        with EmbeddingCache.open(folder("local +tokens" if tokens else "local"), mode="r") as ref:
            cos = min_cosine(ref, cache, ids, tokens)
        rows[name] = {"posters_per_second": s.encoded / s.seconds, "seconds": s.seconds, "min_cosine": cos}
        cache.close()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, _temp_dir=str(root / "ray"))
    warm_up()
    ray_start = time.perf_counter() - start
    address = ray.get_runtime_context().gcs_address
    try:
        ray_row("ray x1", 1)
        ray_row("ray x2", 2)
        if not args.no_tokens:
            ray_row("ray x1 +tokens", 1, tokens=True)
        resumed = None if args.no_resume else resume(src, root, args, address, rows["ray x1"]["seconds"])
    finally:
        ray.shutdown()

    cluster_start = None
    if args.nodes:
        start = time.perf_counter()
        cluster = start_cluster(root, args.nodes, args.cpus)
        warm_up(cluster.address)
        cluster_start = time.perf_counter() - start
        try:  # the engine connects to the cluster's address, and ends its connection, in every call
            ray_row(f"{args.nodes} nodes x1", 1, address=cluster.address)
            ray_row(f"{args.nodes} nodes x2", 2, address=cluster.address)
        finally:
            cluster.shutdown()

    base = rows["local"]["posters_per_second"]
    for row in rows.values():
        row["ratio"] = row["posters_per_second"] / base
        # what Ray adds to each poster, over the whole job (actors' start and model load included)
        row["overhead_ms_per_poster"] = 1000 * (1 / row["posters_per_second"] - 1 / base)
    result = {"backbone": args.backbone, "posters": args.posters, "batch_size": args.batch_size, "size": args.size,
              "cpus": args.cpus, "torch_threads": torch.get_num_threads(), "ray_start_seconds": round(ray_start, 2),
              "nodes": args.nodes, "cluster_start_seconds": None if cluster_start is None else round(cluster_start, 2),
              "rows": {k: {kk: round(v, 4) for kk, v in row.items()} for k, row in rows.items()},
              "resume": resumed}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.posters} posters {args.size}, {args.backbone} (random weights), batch {args.batch_size}, "
          f"local Ray on {args.cpus} CPUs (started and warmed up in {ray_start:.1f} s, not counted below)")
    if args.nodes:
        print(f"{args.nodes} nodes: a head without CPUs and {args.nodes} worker nodes sharing {args.cpus} CPUs on "
              f"this machine (started and warmed up in {cluster_start:.1f} s, not counted below)")
    print(f"{'engine':<16} {'posters/s':>10} {'× local':>8} {'ms/poster added':>16} {'min cosine':>11}")
    for name, row in rows.items():
        cos = f"{row['min_cosine']:.5f}" if "min_cosine" in row else "-"
        print(f"{name:<16} {row['posters_per_second']:>10.2f} {row['ratio']:>8.2f} "
              f"{row['overhead_ms_per_poster']:>16.1f} {cos:>11}")
    if resumed:
        print("resume: " + ", ".join(f"{k} {v}" for k, v in resumed.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
