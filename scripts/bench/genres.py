"""Genre-head training and prediction speed on cache-shaped random data.

Trains the default ML-Decoder head (width 768, MLP 512, one layer, dropout 0.7, batch 256, Adam)
for 10 epochs on 35,000 random unit vectors of width 512 (ViT-B-32's embedding width) × 25 genres
(about 2.3 labels per poster), with a 3,500-poster validation split evaluated after every epoch as
in real training, and times:

  train    seconds for the epochs (early stopping off, so all of them run), validation included
  predict  predictions/s of the trained head on the 35,000 embeddings (inference mode, its batching)

and, with --compare, the same training through the plain decoder computation (one (batch × genres
× width) token tensor through LayerNorm/MLP/classifier) for a few batches, extrapolated to the same
epochs, to show what the factorised pooled path saves. Random vectors are fine: the work per
step does not depend on the values. Target: 10 epochs in under 60 s on a 2-core CPU.

Usage: .venv/bin/python scripts/bench/genres.py [--posters 35000] [--genres 25] [--epochs 10] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clipposter.heads.genre.config import DecoderConfig, TrainConfig  # noqa: E402
from clipposter.heads.genre.model import MLDecoder, make_loss  # noqa: E402
from clipposter.heads.genre.train import fit_decoder  # noqa: E402


def make_data(n: int, dim: int, genres: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # ~2.3 labels per poster with a skewed genre frequency, like IMDb.
    freq = np.sort(rng.dirichlet(np.full(genres, 0.7)))[::-1] * 2.3
    y = (rng.random((n, genres)) < np.clip(freq, 0.005, 0.6)).astype(np.int8)
    text = rng.standard_normal((genres, dim)).astype(np.float32)
    return x, y, text / np.linalg.norm(text, axis=1, keepdims=True)


def build(cfg: DecoderConfig, text: np.ndarray, x: np.ndarray, y: np.ndarray, seed: int) -> MLDecoder:
    torch.manual_seed(seed)
    module = MLDecoder(cfg, text)
    module.set_input_stats(x)
    module.set_prior(y.mean(0))
    return module


def time_general(module: MLDecoder, x: np.ndarray, y: np.ndarray, options: TrainConfig, batches: int) -> float:
    """Seconds per training step of the plain (materialised) computation of the same module."""
    module.force_general = True
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=options.lr)
    loss_fn = make_loss(options, None)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    bs = options.batch_size
    started = None
    for i in range(batches + 1):  # the first step warms up allocators and is not timed
        if i == 1:
            started = time.perf_counter()
        idx = torch.randint(0, xt.shape[0], (bs,))
        loss = loss_fn(module(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.force_general = False
    return (time.perf_counter() - started) / batches


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posters", type=int, default=35_000)
    ap.add_argument("--validation", type=int, default=3_500)
    ap.add_argument("--genres", type=int, default=25)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--mlp-hidden", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--compare", action="store_true", help="also time the plain decoder computation")
    ap.add_argument("--compare-batches", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice, one per core); 1 is faster on a busy machine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x, y, text = make_data(args.posters + args.validation, args.dim, args.genres, args.seed)
    xtr, ytr, xva, yva = x[:args.posters], y[:args.posters], x[args.posters:], y[args.posters:]
    cfg = DecoderConfig(embed_dim=args.dim, num_genres=args.genres, width=args.width, mlp_hidden=args.mlp_hidden)
    options = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, patience=args.epochs + 1,
                          lr_patience=args.epochs + 1, seed=args.seed)
    module = build(cfg, text, xtr, ytr, args.seed)

    started, cpu_started = time.perf_counter(), time.process_time()
    history = fit_decoder(module, xtr, ytr, xva, yva, options, progress=not args.json)
    train_s = time.perf_counter() - started
    # CPU seconds of this process (all its threads): on a machine other jobs share, wall time also
    # counts their turns; with one thread this is what the run takes on a free core.
    train_cpu_s = time.process_time() - cpu_started

    module.eval()
    xt = torch.from_numpy(xtr)
    with torch.inference_mode():
        module(xt[:1024])  # warm-up
        started = time.perf_counter()
        for start in range(0, xt.shape[0], 1024):
            torch.sigmoid(module(xt[start:start + 1024]))
        predict_s = time.perf_counter() - started

    result = {
        "posters": args.posters, "validation": args.validation, "genres": args.genres, "dim": args.dim,
        "width": args.width, "mlp_hidden": args.mlp_hidden, "batch_size": args.batch_size, "epochs": len(history),
        "train_seconds": round(train_s, 2), "train_cpu_seconds": round(train_cpu_s, 2),
        "seconds_per_epoch": round(train_s / max(1, len(history)), 3),
        "predictions_per_second": round(args.posters / predict_s, 1),
        "final_train_loss": round(history[-1].train_loss, 5),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2), "target_seconds": 60,
    }
    if args.compare:
        general_step = time_general(build(cfg, text, xtr, ytr, args.seed), xtr, ytr, options, args.compare_batches)
        steps = -(-args.posters // args.batch_size) * args.epochs
        result["plain_seconds_per_step"] = round(general_step, 4)
        result["plain_train_seconds_estimate"] = round(general_step * steps, 1)
        result["fast_seconds_per_step"] = round(train_s / steps, 4)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"ML-Decoder genre head, {args.posters} × {args.dim} embeddings, {args.genres} genres, width "
              f"{args.width}, MLP {args.mlp_hidden}, batch {args.batch_size}, {torch.get_num_threads()} torch "
              f"threads, load average {result['load_average_1min']}")
        print(f"train    {len(history)} epochs in {train_s:.1f} s ({result['seconds_per_epoch']:.2f} s/epoch, "
              f"validation included; target < 60 s); process CPU time {train_cpu_s:.1f} s")
        print(f"predict  {result['predictions_per_second']:.0f} predictions/s")
        if args.compare:
            print(f"plain    {result['plain_seconds_per_step'] * 1000:.0f} ms/step vs "
                  f"{result['fast_seconds_per_step'] * 1000:.0f} ms/step factorised → about "
                  f"{result['plain_train_seconds_estimate']:.0f} s for the same epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
