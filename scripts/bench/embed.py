"""Embedding throughput: posters/s of the model alone, the whole `embed` path, and two naive loops.

All use the same architecture (ViT-B-32 by default, random weights: speed does not depend on the
weights) and the same batch size, on the same JPEG posters, in one run:

  (a) model   the model alone on already-preprocessed tensors: the ceiling
  (b) embed   clipposter's embed path from JPEG files into a fresh cache (hash, decode, preprocess,
              encode, commit) with its default decode threads (2 on CPU);
              (b') the same with decoding inline between batches (--workers 0)
  (c) naive, full decode   load one poster at full size, preprocess, encode it alone, append; repeat
  (d) naive, same decode   the same loop, but decoding each JPEG the way the embed path does (reduced
              DCT scale that still covers the model's input, `make_loader`)

The embed path differs from (c) in two ways at once: batching and cheaper JPEG decoding. (b)/(d)
isolates batching (and decode threads); (b)/(c) is the whole gain a user sees over a plain loop.

Targets on a 2-core machine: (b) >= 0.9 x (a) and (b) >= 1.5 x (c).

    python scripts/bench/embed.py [--posters 256] [--batch-size 32] [--size 500x750] [--rounds 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clipposter.embedding.backbone import load_backbone
from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.embed import embed_records, make_loader
from clipposter.ingest.images import load_poster
from clipposter.ingest.synthetic import generate_posters


def bench_model(backbone, pixels: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        backbone.encode_image_tensors(pixels[i:i + batch_size])
    return len(pixels) / (time.perf_counter() - start)


def bench_embed(backbone, records, batch_size: int, workers: int, root: Path) -> float:
    cache = EmbeddingCache.open(root / "cache", backbone.identity)
    summary = embed_records(records, cache, backbone, batch_size=batch_size, workers=workers, progress=False)
    assert summary.encoded == len(records), summary.to_dict()
    return summary.encoded / summary.seconds


def bench_naive(backbone, records, same_decode: bool = False) -> float:
    """One poster at a time. same_decode: decode as the embed path does (reduced-scale JPEG decoding),
    so that the only difference left to (b) is batching and decode threads."""
    if same_decode:
        load = make_loader(backbone)
    else:
        def load(path):
            return backbone.preprocess(load_poster(path))
    out = []
    start = time.perf_counter()
    for rec in records:
        pixels = load(rec.image)[None]
        out.append(backbone.encode_image_tensors(pixels))
    np.concatenate(out)
    return len(records) / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="ViT-B-32")
    ap.add_argument("--posters", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", default="500x750", help="poster size WxH (TMDB's w500 posters are 500x750)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    w, h = (int(x) for x in args.size.split("x"))

    backbone = load_backbone(args.backbone, None, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = generate_posters(root / "posters", n=args.posters, seed=0, size=(w, h))
        # Preprocessed tensors for (a), made outside the timed region.
        pixels = torch.stack([backbone.preprocess(load_poster(r.image)) for r in records])
        bench_model(backbone, pixels[: args.batch_size], args.batch_size)  # warm-up
        # Rounds interleave the three so that a busy spell on the machine hits them alike; the
        # median of each is reported.
        runs: dict[str, list[float]] = {"model": [], "embed": [], "inline": [], "naive": [], "naive_same": []}
        for r in range(args.rounds):
            runs["model"].append(bench_model(backbone, pixels, args.batch_size))
            runs["embed"].append(bench_embed(backbone, records, args.batch_size, args.workers, root / f"r{r}"))
            runs["inline"].append(bench_embed(backbone, records, args.batch_size, 0, root / f"i{r}"))
            runs["naive"].append(bench_naive(backbone, records))
            runs["naive_same"].append(bench_naive(backbone, records, same_decode=True))
        model, embed, inline, naive, naive_same = (float(np.median(runs[k])) for k in
                                                   ("model", "embed", "inline", "naive", "naive_same"))

    result = {
        "backbone": args.backbone, "posters": args.posters, "poster_size": args.size,
        "batch_size": args.batch_size, "workers": args.workers, "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
        "posters_per_s": {"model": round(model, 2), "embed": round(embed, 2),
                          "embed_inline": round(inline, 2), "naive_full_decode": round(naive, 2),
                          "naive_same_decode": round(naive_same, 2)},
        "ratios": {"embed_over_model": round(embed / model, 3),
                   "embed_over_naive_full_decode": round(embed / naive, 3),
                   "embed_over_naive_same_decode": round(embed / naive_same, 3)},
        "targets": {"embed_over_model": 0.9, "embed_over_naive_full_decode": 1.5},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.backbone}, {args.posters} posters of {args.size}, batch {args.batch_size}, "
              f"{torch.get_num_threads()} torch threads")
        print(f"(a) model alone      {model:8.2f} posters/s")
        print(f"(b) embed path       {embed:8.2f} posters/s   {embed / model:.3f} x (a)  (target >= 0.9)")
        print(f"(b') embed, inline    {inline:8.2f} posters/s   {inline / model:.3f} x (a)")
        print(f"(c) naive, full decode {naive:6.2f} posters/s   (b) = {embed / naive:.2f} x (c)  "
              f"(batching + reduced-scale decode; target >= 1.5)")
        print(f"(d) naive, same decode {naive_same:6.2f} posters/s   (b) = {embed / naive_same:.2f} x (d)  "
              f"(batching and decode threads alone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
