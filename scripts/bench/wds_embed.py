"""`embed` from WebDataset shards against `embed` from the same posters as files, in one run.

  (a) files    embed_records over a manifest of JPEG files, into a fresh cache: the baseline
  (b) wds      the same posters exported with `export_webdataset` into tar shards, read as a `wds:`
               source (each poster one seek and one read inside its shard), into a fresh cache

Both use the same backbone (ViT-B-32 architecture with random weights by default: speed does not
depend on the weights), batch size and decode threads, interleaved over `--rounds` rounds; the
median of each is reported, with (b)/(a). Also timed: reading the source (the tar headers and json
members of every shard, against reading the manifest) and the export itself. The two caches must
hold the same embeddings (the shards keep each file's bytes, so the content hashes are the same).

    python scripts/bench/wds_embed.py [--posters 128] [--shard-size 32] [--rounds 3] [--json]

Figures: docs/scaling.md ("Three set-ups").
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--posters", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", default="500x750")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backbone", default="ViT-B-32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from clipposter.embedding.backbone import load_backbone
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.embedding.embed import embed_records
    from clipposter.ingest.sources import load_source
    from clipposter.ingest.synthetic import generate_posters
    from clipposter.ingest.webdataset import export_webdataset

    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.split("x"))
    backbone = load_backbone(args.backbone, None, device="cpu")  # None: random weights
    with tempfile.TemporaryDirectory(prefix="wds-bench-") as tmp:
        root = Path(tmp)
        records = generate_posters(root / "set", n=args.posters, seed=0, size=(w, h))
        started = time.perf_counter()
        export_webdataset(records, root / "shards", shard_size=args.shard_size, progress=False)
        export_s = time.perf_counter() - started
        specs = {"files": str(root / "set" / "manifest.csv"), "wds": f"wds:{root / 'shards'}"}
        warm = EmbeddingCache.open(root / "warm", backbone.identity, backbone_spec=backbone.spec)
        embed_records(load_source(specs["files"])[: args.batch_size], warm, backbone, batch_size=args.batch_size,
                      progress=False)  # first-call costs (allocator, kernels) outside the timed rounds
        warm.close()
        read_s = {k: [] for k in specs}
        rates = {k: [] for k in specs}
        matrices = {}
        for r in range(args.rounds):
            for kind, spec in specs.items():
                started = time.perf_counter()
                recs = load_source(spec)
                read_s[kind].append(time.perf_counter() - started)
                cache = EmbeddingCache.open(root / f"{kind}-{r}", backbone.identity, backbone_spec=backbone.spec)
                s = embed_records(recs, cache, backbone, batch_size=args.batch_size, progress=False)
                if s.encoded != args.posters:
                    raise SystemExit(f"error: {kind} encoded {s.encoded} of {args.posters} posters")
                rates[kind].append(s.encoded / s.seconds)
                ids = sorted(r_.id for r_ in recs)
                matrices[kind] = cache.embeddings_for_ids(ids)
                cache.close()
        same = bool(np.array_equal(matrices["files"], matrices["wds"]))
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "posters": args.posters, "shard_size": args.shard_size, "poster_size": args.size,
        "backbone": f"{args.backbone} (random weights)", "batch_size": args.batch_size, "rounds": args.rounds,
        "torch_threads": args.threads,
        "files_posters_per_second": round(med["files"], 2), "wds_posters_per_second": round(med["wds"], 2),
        "wds_over_files": round(med["wds"] / med["files"], 3),
        "read_source_seconds": {k: round(statistics.median(v), 4) for k, v in read_s.items()},
        "export_seconds": round(export_s, 2), "same_embeddings": same,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.posters} posters of {args.size}, {result['backbone']}, batch {args.batch_size}, "
              f"median of {args.rounds} rounds")
        print(f"(a) embed from files      {med['files']:7.2f} posters/s  (reading the manifest "
              f"{result['read_source_seconds']['files']:.3f} s)")
        print(f"(b) embed from wds shards {med['wds']:7.2f} posters/s  = {result['wds_over_files']:.2f} × (a) "
              f"(reading {args.posters // args.shard_size} shards' headers {result['read_source_seconds']['wds']:.3f} s)")
        print(f"export to shards of {args.shard_size}: {export_s:.2f} s; same embeddings from both: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
