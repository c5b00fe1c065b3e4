"""Genre-head subcommands: `train genres`, `evaluate genres`, `predict`.

Parsing only at import time: torch and scikit-learn are imported inside the commands.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from clipposter.cli.common import (add_cache_flag, add_device_flag, add_head_flag, add_json_flag, emit, pretrained_arg,
                                   warn)
from clipposter.errors import ClipposterError


# ====================================================================================== train ==

def _read_templates(path: str | None) -> list[str]:
    from clipposter.embedding.prompts import DEFAULT_TEMPLATES

    if path is None:
        return list(DEFAULT_TEMPLATES)
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ClipposterError(f"{path}: cannot read prompt templates ({exc})") from None
    templates = [t for t in lines if t and not t.startswith("#")]
    if not templates:
        raise ClipposterError(f"{path}: no prompt templates (one per line, each with {{genre}})")
    return templates


def cmd_train_genres(args) -> int:
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.heads.genre import TrainConfig, parse_genre_spec, parse_pos_weight, train_genre_head

    options = TrainConfig(loss=args.loss, pos_weight=parse_pos_weight(args.pos_weight), focal_gamma=args.focal_gamma,
                           asl_gamma_neg=args.asl_gamma_neg, asl_gamma_pos=args.asl_gamma_pos, asl_clip=args.asl_clip,
                           lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, patience=args.patience,
                           lr_patience=args.lr_patience, weight_decay=args.weight_decay, seed=args.seed,
                           threshold_mode=args.threshold_mode, probe_c=args.probe_c)
    architecture = {"width": args.width, "mlp_hidden": args.mlp_hidden, "num_layers": args.num_layers,
                    "num_heads": args.num_heads, "dropout": args.dropout, "num_groups": args.num_groups,
                    "self_attention": args.self_attention, "memory": args.memory}
    genres = parse_genre_spec(args.genres)
    templates = _read_templates(args.templates)
    if args.threads is not None:
        if args.threads < 1:
            raise ClipposterError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    with EmbeddingCache.open(args.cache, mode="r") as cache:
        result = train_genre_head(cache, kind=args.kind, genres=genres, genres_from_data=args.genres_from_data,
                                  templates=templates, architecture=architecture, options=options,
                                  pretrained=pretrained_arg(args.pretrained), device=args.device,
                                  progress=not args.json)
        out = result.head.save_pretrained(args.out)
    warn(result.warnings)
    payload = {**result.to_dict(), "out": str(out)}
    d = result.data
    m = result.head.metrics.get("validation", {})
    lines = [f"{result.head.kind} head over {len(d.genres)} genres ({d.vocabulary_source}): "
             + ", ".join(d.genres),
             "posters: " + ", ".join(f"{s} {len(v.ids)}" for s, v in d.splits.items())
             + (f"; {sum(d.unlabelled.values())} without labels left out" if sum(d.unlabelled.values()) else "")
             + (f"; {sum(d.out_of_vocabulary.values())} out-of-vocabulary labels ignored"
                if d.out_of_vocabulary else "")]
    if result.history:
        last = result.history[-1]
        lines.append(f"trained {len(result.history)} epochs in {result.seconds:.1f} s (best epoch "
                     f"{result.best_epoch}, final train loss {last.train_loss:.4f}, validation loss {last.val_loss:.4f})")
    for name in ("0.5", "calibrated"):
        if name in m:
            mi = m[name]["micro"]
            label = "at 0.5" if name == "0.5" else f"at calibrated thresholds ({result.head.thresholds['mode']})"
            lines.append(f"validation micro P/R/F1 {label}: {mi['precision']:.3f} / {mi['recall']:.3f} / {mi['f1']:.3f}")
    lines.append(f"saved {out} (next: clipposter evaluate genres --head {out} --cache {args.cache})")
    emit(args, payload, "\n".join(lines))
    return 0


# =================================================================================== evaluate ==

def cmd_evaluate_genres(args) -> int:
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.heads.genre import GenreHead, evaluate_genres
    from clipposter.heads.genre.evaluation import format_genre_per_genre, format_genre_table, write_genre_evaluation
    from clipposter.report.charts import write_genre_f1_chart

    head = GenreHead.from_pretrained(args.head)
    baselines = [] if args.baselines in ("", "none") else [b.strip() for b in args.baselines.split(",") if b.strip()]
    with EmbeddingCache.open(args.cache, mode="r") as cache:
        report = evaluate_genres(head, cache, baselines=baselines, probe_c=args.probe_c, seed=args.seed,
                                 progress=not args.json)
    out = Path(args.out) if args.out else Path(args.head) / "evaluation.json"
    chart = Path(args.chart) if args.chart else out.with_suffix(".svg")
    report["chart"] = str(chart) if write_genre_f1_chart(report, chart) else None
    write_genre_evaluation(report, head.genres, out)
    warn(report["warnings"])
    p = report["posters"]
    text = "\n".join([
        f"genre head {args.head} ({head.kind}, {len(head.genres)} genres) on cache {args.cache}: "
        + ", ".join(f"{s} {n}" for s, n in p.items()) + " labelled posters",
        "",
        "micro = the seed paper's Table 1; labels/pred = genres per poster, true and predicted",
        format_genre_table(report),
        "",
        format_genre_per_genre(report),
        "",
        f"wrote {out}" + (f" and {chart}" if report["chart"] else ""),
    ])
    emit(args, report, text)
    return 0


# ==================================================================================== predict ==

def _expand_posters(items: list[str]) -> list[str]:
    """Poster paths; a folder stands for the images directly inside it (sorted)."""
    from clipposter.ingest.images import is_image_path

    out = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir() if p.is_file() and is_image_path(p))
            if not found:
                print(f"warning: {item}: folder holds no images", file=sys.stderr)
            out.extend(found)
        else:
            out.append(item)
    return out


def cmd_predict(args) -> int:
    from clipposter.heads.genre.head import GenreHead

    if args.top_k is not None and args.top_k < 1:
        raise ClipposterError(f"--top-k must be at least 1, got {args.top_k}")
    head = GenreHead.from_pretrained(args.head)
    head.thresholds_for(args.threshold)  # refuse a bad --threshold before any work
    paths = _expand_posters(args.posters)
    if not paths:
        raise ClipposterError("no posters given")
    cache = None
    if args.cache:
        from clipposter.embedding.cache import EmbeddingCache

        cache = EmbeddingCache.open(args.cache, mode="r")
    try:
        result = head.predict_posters(paths, cache=cache, pretrained=pretrained_arg(args.pretrained),
                                      device=args.device, threshold=args.threshold, top_k=args.top_k,
                                      batch_size=args.batch_size, progress=not args.json)
    finally:
        if cache is not None:
            cache.close()
    for path, reason in result.failed:
        print(f"warning: {path}: {reason} (skipped)", file=sys.stderr)
    if not result.predictions:
        raise ClipposterError(f"none of the {len(paths)} posters could be read")
    payload = {"head": str(args.head), "threshold": args.threshold or "calibrated", "encoded": result.encoded,
               "from_cache": result.from_cache,
               "predictions": [p.to_dict() for p in result.predictions],
               "failed": [{"path": p, "reason": r} for p, r in result.failed]}
    lines = []
    for p in result.predictions:
        if args.top_k:
            marked = ", ".join(f"{g} {v:.2f}{'*' if g in p.predicted else ''}" for g, v in p.top)
            lines.append(f"{p.path}: {marked}")
        else:
            shown = ", ".join(f"{g} {p.probabilities[g]:.2f}" for g in p.predicted) or \
                f"(none above threshold; most likely {p.top[0][0]} {p.top[0][1]:.2f})"
            lines.append(f"{p.path}: {shown}")
    if args.top_k:
        lines.append("* = above the head's threshold")
    emit(args, payload, "\n".join(lines))
    return 0


# =================================================================================== register ==

def register(sub, train, evaluate) -> None:
    """Add the genre commands to the top-level, `train` and `evaluate` subparsers."""
    p = train.add_parser("genres", help="train a genre head (ML-Decoder, linear probe or zero-shot) on a cache",
                         description="Train a genre head on the cache's train split, with early stopping on the "
                                     "validation split, and calibrate per-genre thresholds on validation.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_cache_flag(p)
    p.add_argument("--out", metavar="DIR", required=True, help="folder for the trained head")
    p.add_argument("--model", dest="kind", default="ml-decoder", choices=["ml-decoder", "linear-probe", "zero-shot"],
                   help="head kind: the ML-Decoder, or one of the baselines in the same format")
    g = p.add_argument_group("genres")
    g.add_argument("--genres", default=None,
                   help="vocabulary: A,B,C, a file with one genre per line, or imdb (the shipped IMDb list); "
                        "default: the genres of the training split")
    g.add_argument("--genres-from-data", action="store_true",
                   help="add every genre found in the cache's labels to the vocabulary instead of ignoring it")
    g.add_argument("--templates", default=None, help="file of prompt templates with {genre}, one per line "
                                                     "(default: three templates incl. 'This is an image of a "
                                                     "{genre} movie poster')")
    a = p.add_argument_group("ML-Decoder architecture")
    # dests are the DecoderConfig fields, so that an error about `num_heads` names --heads
    a.add_argument("--layers", dest="num_layers", type=int, default=1)
    a.add_argument("--width", type=int, default=768, help="decoder width")
    a.add_argument("--mlp-hidden", type=int, default=512)
    a.add_argument("--heads", dest="num_heads", type=int, default=8, help="attention heads (used with --memory tokens or --self-attention)")
    a.add_argument("--dropout", type=float, default=0.7)
    a.add_argument("--groups", dest="num_groups", type=int, default=None, help="group decoding: number of queries (default: one per genre)")
    a.add_argument("--self-attention", action="store_true", help="add self-attention among queries (ML-Decoder drops it)")
    a.add_argument("--memory", default="pooled", choices=["pooled", "tokens"],
                   help="pooled: the poster embedding is the only memory token (every query attends to the same "
                        "vector); tokens: the ViT token sequence (needs a cache that stores it)")
    t = p.add_argument_group("training")
    t.add_argument("--loss", default="bce", choices=["bce", "focal", "asl"])
    t.add_argument("--pos-weight", default="none", help="BCE weight of positives: none, auto (negatives/positives "
                                                        "per genre, clipped to 1..100) or a number")
    t.add_argument("--focal-gamma", type=float, default=2.0)
    t.add_argument("--asl-gamma-neg", type=float, default=4.0)
    t.add_argument("--asl-gamma-pos", type=float, default=0.0)
    t.add_argument("--asl-clip", type=float, default=0.05)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--patience", type=int, default=3, help="early stopping: epochs without a better validation loss")
    t.add_argument("--lr-patience", type=int, default=1, help="epochs without improvement before the lr is halved")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: one per core); 1 is often faster on a machine other jobs share")
    t.add_argument("--threshold-mode", default="per-genre", choices=["per-genre", "global"],
                   help="thresholds predict uses: one per genre or one for all, both chosen on validation for F1")
    t.add_argument("--probe-c", type=float, default=1.0, help="linear probe: inverse L2 strength (scikit-learn C)")
    b = p.add_argument_group("backbone (only to encode genre prompts the cache lacks)")
    b.add_argument("--pretrained", default=None, help="checkpoint path if it moved since the cache was made")
    add_device_flag(b)
    add_json_flag(p)
    p.set_defaults(func=cmd_train_genres)

    p = evaluate.add_parser("genres", help="precision/recall/F1 (micro, macro, per sample), mAP and per-genre "
                                           "scores of a genre head and its baselines",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_head_flag(p, help="trained genre head folder")
    add_cache_flag(p, help="embedding cache with labelled train/validation/test posters")
    p.add_argument("--out", metavar="FILE", default=None, help="JSON report path (default: HEAD/evaluation.json)")
    p.add_argument("--chart", default=None, help="per-genre F1 chart, SVG (default: the JSON path with .svg)")
    p.add_argument("--baselines", default="zero-shot,linear-probe,constant",
                   help="comma-separated baselines to score beside the head, or none")
    p.add_argument("--probe-c", type=float, default=1.0, help="linear probe baseline: scikit-learn C")
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p)
    p.set_defaults(func=cmd_evaluate_genres)

    p = sub.add_parser("predict", help="genres of poster files with a trained genre head",
                       description="Print each poster's genres with probabilities. Posters in --cache use their "
                                   "cached embedding; others are encoded with the head's backbone.")
    p.add_argument("posters", nargs="+", metavar="POSTER", help="poster image files (or folders of them)")
    add_head_flag(p, help="trained genre head folder")
    add_cache_flag(p, required=False, help="embedding cache to look posters up in (same backbone as the head)")
    p.add_argument("--top-k", type=int, default=None, help="show the N most probable genres (* marks those above "
                                                           "threshold) instead of only the predicted ones")
    p.add_argument("--threshold", default=None,
                   help="calibrated (the head's saved mode, default), per-genre, global, or a number such as 0.5")
    p.add_argument("--pretrained", default=None, help="backbone checkpoint path if it moved since training")
    add_device_flag(p)
    p.add_argument("--batch-size", type=int, default=64)
    add_json_flag(p)
    p.set_defaults(func=cmd_predict)
