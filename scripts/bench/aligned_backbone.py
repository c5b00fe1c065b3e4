"""Does contrastive training align the tiny CLIP? Zero-shot genres and text search on held-out posters.

Draws synthetic posters (--posters, --seed), trains `clipposter-tiny` contrastively on their train
split only (clipposter.embedding.contrastive.train_backbone: open_clip's ClipLoss, AdamW), then
scores, on the validation and test posters it never saw, both the trained backbone and the same
architecture with seeded random weights (what the offline demo used before):

  zero-shot genres  CLIP zero-shot (cosine to each genre's prompt embedding, ×100, softmax), thresholds
                    calibrated per genre on validation, scored on test: micro-F1 and mAP, beside the
                    image-blind constant (the k most frequent training genres for every poster, k chosen
                    on validation; its mAP is the genres' prevalence), and top-1: how often the highest-
                    scored genre is one of the poster's genres, beside the most frequent genre's share
  text search       for each genre, the query "a {genre} movie poster" (a wording the training texts do
                    not use) over all held-out posters: precision@10, beside the genre's frequency among
                    them (what a random top 10 scores)

    python scripts/bench/aligned_backbone.py [--posters 600] [--seed 0] [--epochs 30] [--batch-size 64]
                                             [--threads 1] [--json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clipposter.embedding.backbone import TINY_MODEL, Backbone, load_backbone  # noqa: E402
from clipposter.embedding.contrastive import ContrastiveConfig, train_backbone  # noqa: E402
from clipposter.embedding.prompts import prompt_texts  # noqa: E402
from clipposter.heads.genre.baselines import zero_shot_head  # noqa: E402
from clipposter.heads.genre.metrics import (genre_calibrate_thresholds, genre_constant_top_k,  # noqa: E402
                                            genre_scores)
from clipposter.ingest.images import load_poster  # noqa: E402
from clipposter.ingest.synthetic import generate_posters  # noqa: E402
from clipposter.records import PosterRecord  # noqa: E402

SEARCH_QUERY = "a {genre} movie poster"


def _labels(records: Sequence[PosterRecord], genres: Sequence[str]) -> np.ndarray:
    rows = [[g in r.genres for g in genres] for r in records]
    return np.array(rows, dtype=np.int8).reshape(len(records), len(genres))


def _genre_text(backbone: Backbone, genres: Sequence[str]) -> np.ndarray:
    emb = backbone.encode_texts(prompt_texts(genres)).reshape(len(genres), -1, backbone.embed_dim).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def alignment_report(backbone: Backbone, records: Sequence[PosterRecord], genres: Sequence[str] | None = None) -> dict:
    """Zero-shot genres (test, thresholds from validation) and text search (validation + test) of
    `backbone`, beside the constant baseline and the genres' frequency. Training posters are only used
    for the constant's genre order."""
    split = {s: [r for r in records if r.split == s and r.genres] for s in ("train", "validation", "test")}
    genres = sorted({g for r in split["train"] for g in r.genres}) if genres is None else list(genres)
    y = {s: _labels(rs, genres) for s, rs in split.items()}
    emb = {s: backbone.encode_images([load_poster(r.image) for r in rs]) for s, rs in split.items() if s != "train"}
    zs = zero_shot_head(genres, _genre_text(backbone, genres), backbone.identity, backbone.spec)
    prob = {s: zs.predict_proba(e) for s, e in emb.items()}
    thresholds = np.asarray(genre_calibrate_thresholds(y["validation"], prob["validation"])["per_genre"])
    zero_shot = genre_scores(y["test"], prob["test"], thresholds, genres)
    const = genre_constant_top_k(y["train"], y["validation"])
    freq = np.asarray(const["frequency"])
    cut = np.full(len(genres), 2.0)
    cut[const["order"][:const["k"]]] = 0.0
    constant = genre_scores(y["test"], np.tile(freq, (len(y["test"]), 1)), cut, genres)
    top1 = float(y["test"][np.arange(len(y["test"])), prob["test"].argmax(1)].mean())
    top1_constant = float(y["test"][:, const["order"][0]].mean())

    held_y = np.concatenate([y["validation"], y["test"]])
    held_emb = np.concatenate([emb["validation"], emb["test"]])
    queries = backbone.encode_texts([SEARCH_QUERY.format(genre=g) for g in genres])
    k = min(10, len(held_y))
    top = np.argsort(-(queries @ held_emb.T), axis=1, kind="stable")[:, :k]
    search = {g: {"precision_at_10": float(held_y[top[j], j].mean()), "frequency": float(held_y[:, j].mean())}
              for j, g in enumerate(genres)}
    present = [g for g in genres if search[g]["frequency"] > 0]
    return {
        "backbone": backbone.identity.describe(),
        "genres": genres,
        "posters": {s: len(rs) for s, rs in split.items()},
        "zero_shot": {"micro_f1": zero_shot["micro"]["f1"], "map": zero_shot["map"], "top1": top1},
        "constant": {"micro_f1": constant["micro"]["f1"], "map": constant["map"], "top1": top1_constant,
                     "k": const["k"], "genres": [genres[i] for i in const["order"][:const["k"]]]},
        "search": search,
        "search_mean": {"precision_at_10": float(np.mean([search[g]["precision_at_10"] for g in present])),
                        "frequency": float(np.mean([search[g]["frequency"] for g in present]))},
    }


def format_tables(reports: dict[str, dict]) -> str:
    names = list(reports)
    first = reports[names[0]]
    p = first["posters"]
    lines = [f"held out: {p['validation']} validation + {p['test']} test posters (thresholds on validation, "
             f"genre scores on test)", "",
             "zero-shot genres (test)      micro-F1    mAP   top-1"]
    c = first["constant"]
    lines.append(f"{'constant (top ' + str(c['k']) + ' genres)':<28} {c['micro_f1']:8.3f} {c['map']:6.3f} "
                 f"{c['top1']:7.3f}")
    for name in names:
        z = reports[name]["zero_shot"]
        lines.append(f"{name:<28} {z['micro_f1']:8.3f} {z['map']:6.3f} {z['top1']:7.3f}")
    lines += ["", f"text search \"{SEARCH_QUERY}\" over {p['validation'] + p['test']} held-out posters: "
                  "precision@10", f"{'genre':<12} {'frequency':>9} " + " ".join(f"{n:>10}" for n in names)]
    for g in first["genres"]:
        lines.append(f"{g:<12} {first['search'][g]['frequency']:9.2f} "
                     + " ".join(f"{reports[n]['search'][g]['precision_at_10']:10.2f}" for n in names))
    lines.append(f"{'mean':<12} {first['search_mean']['frequency']:9.2f} "
                 + " ".join(f"{reports[n]['search_mean']['precision_at_10']:10.2f}" for n in names))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posters", type=int, default=600, help="synthetic posters (80/10/10 train/validation/test)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the posters, the split and training")
    ap.add_argument("--epochs", type=int, default=ContrastiveConfig.epochs)
    ap.add_argument("--batch-size", type=int, default=ContrastiveConfig.batch_size)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared 2-core CPU)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # open_clip logs every randomly initialised model
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        records = generate_posters(Path(tmp) / "posters", n=args.posters, seed=args.seed)
        drawn = time.perf_counter() - started
        config = ContrastiveConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
        trained = train_backbone(records, Path(tmp) / "backbone", config, device="cpu", progress=not args.json)
        aligned = load_backbone(TINY_MODEL, str(trained.path), device="cpu")
        reports = {"trained": alignment_report(aligned, records),
                   "random": alignment_report(load_backbone(TINY_MODEL, None, device="cpu"), records)}
        size = trained.path.stat().st_size
    result = {"posters": args.posters, "seed": args.seed, "threads": args.threads, "draw_seconds": round(drawn, 2),
              "training": trained.to_dict(), "weights_bytes": size, "reports": reports}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"trained {TINY_MODEL} on {trained.posters} training posters ({trained.held_out} held out) for "
              f"{args.epochs} epochs in {trained.seconds:.1f} s on {args.threads} thread(s) (drawing the posters: "
              f"{drawn:.1f} s); loss {trained.history[0]:.3f} (epoch 1) → {trained.history[-1]:.3f}; weights "
              f"{size / 1e6:.1f} MB")
        print()
        print(format_tables(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
