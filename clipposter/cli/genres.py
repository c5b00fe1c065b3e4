"""Genre-head subcommands: `train genres`, `evaluate genres`, `predict`.

Parsing only at import time: torch and scikit-learn are imported inside the commands.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path

from clipposter.cli.common import (add_cache_flag, add_device_flag, add_head_flag, add_json_flag, emit, flag_for,
                                   pretrained_arg, warn)
from clipposter.errors import ClipposterError
from clipposter.heads.genre.config import (SMALL_DATA_ARCHITECTURE, SMALL_DATA_OPTIONS, SMALL_DATA_POSTERS, DecoderConfig,
                                           TrainConfig)

EVALUATION_FILE = "evaluation.json"  # `evaluate genres` writes it (and its .svg chart) into the head folder


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


# Flags of the small-data rule's settings are unset unless given, so that the rule fills the rest;
# their help names the paper's defaults (the dataclasses' ones) beside the rule's values.
PAPER_DEFAULTS = {f.name: f.default for f in (*fields(DecoderConfig), *fields(TrainConfig))
                  if f.name in {**SMALL_DATA_ARCHITECTURE, **SMALL_DATA_OPTIONS}}


def _small_data_line(args, small: dict) -> str:
    """The settings the small-data rule chose, by the flags that set them."""
    parser = args.command_parser
    settings = {**small["architecture"], **small["options"]}
    named = ", ".join(f"{flag_for(parser, k)} {v:g}" for k, v in settings.items())
    return (f"small data ({small['train_posters']} training posters < {small['limit']}): {named}; pass "
            f"--no-small-data or explicit flags to override")


def cmd_train_genres(args) -> int:
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.heads.genre import parse_genre_spec, parse_pos_weight, train_genre_head
    from clipposter.heads.distributed import is_main_process
    from clipposter.heads.genre.head import check_head_folder

    given = {k: getattr(args, k) for k in PAPER_DEFAULTS if hasattr(args, k)}
    options = {"loss": args.loss, "pos_weight": parse_pos_weight(args.pos_weight), "focal_gamma": args.focal_gamma,
               "asl_gamma_neg": args.asl_gamma_neg, "asl_gamma_pos": args.asl_gamma_pos, "asl_clip": args.asl_clip,
               "lr_patience": args.lr_patience, "weight_decay": args.weight_decay, "seed": args.seed,
               "threshold_mode": args.threshold_mode, "probe_c": args.probe_c,
               **{k: v for k, v in given.items() if k in SMALL_DATA_OPTIONS}}
    architecture = {"num_layers": args.num_layers, "num_groups": args.num_groups,
                    "self_attention": args.self_attention, "memory": args.memory,
                    **{k: v for k, v in given.items() if k in SMALL_DATA_ARCHITECTURE}}
    genres = parse_genre_spec(args.genres)
    templates = _read_templates(args.templates)
    if args.threads is not None:
        if args.threads < 1:
            raise ClipposterError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    replacing = check_head_folder(args.out, args.overwrite)  # before the training, not after it
    with EmbeddingCache.open(args.cache, mode="r") as cache:
        result = train_genre_head(cache, kind=args.kind, genres=genres, genres_from_data=args.genres_from_data,
                                  templates=templates, architecture=architecture, options=options,
                                  small_data=getattr(args, "small_data", "auto"),
                                  pretrained=pretrained_arg(args.pretrained), device=args.device,
                                  progress=not args.json)
        if not is_main_process():  # launched in several processes: rank 0 writes the head and the report
            return 0
        if replacing:  # the replaced head's evaluation describes another head
            for name in (EVALUATION_FILE, Path(EVALUATION_FILE).with_suffix(".svg").name):
                (Path(args.out) / name).unlink(missing_ok=True)
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
    if result.small_data:
        lines.append(_small_data_line(args, result.small_data))
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
    out = Path(args.out) if args.out else Path(args.head) / EVALUATION_FILE
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

def _default(what: str, field: str) -> str:
    """Help text naming the paper's default and the small-data rule's value."""
    small = {**SMALL_DATA_ARCHITECTURE, **SMALL_DATA_OPTIONS}[field]
    return f"{what} (default: {PAPER_DEFAULTS[field]:g}; {small:g} on small data)"


def register(sub, train, evaluate) -> None:
    """Add the genre commands to the top-level, `train` and `evaluate` subparsers."""
    p = train.add_parser("genres", help="train a genre head (ML-Decoder, linear probe or zero-shot) on a cache",
                         description="Train a genre head on the cache's train split, with early stopping on the "
                                     "validation split, and calibrate per-genre thresholds on validation.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_cache_flag(p)
    p.add_argument("--out", metavar="DIR", required=True, help="folder for the trained head")
    p.add_argument("--overwrite", action="store_true", help="replace a head already in --out")
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
    # The small-data rule's flags are unset unless given (argparse.SUPPRESS), so the rule fills the rest.
    a.add_argument("--width", type=int, default=argparse.SUPPRESS, help=_default("decoder width", "width"))
    a.add_argument("--mlp-hidden", type=int, default=argparse.SUPPRESS, help=_default("MLP width", "mlp_hidden"))
    a.add_argument("--heads", dest="num_heads", type=int, default=argparse.SUPPRESS,
                   help=_default("attention heads (used with --memory tokens or --self-attention)", "num_heads"))
    a.add_argument("--dropout", type=float, default=argparse.SUPPRESS, help=_default("dropout", "dropout"))
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
    t.add_argument("--lr", type=float, default=argparse.SUPPRESS, help=_default("learning rate", "lr"))
    t.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, help=_default("batch size", "batch_size"))
    t.add_argument("--epochs", type=int, default=argparse.SUPPRESS, help=_default("most epochs", "epochs"))
    t.add_argument("--patience", type=int, default=argparse.SUPPRESS,
                   help=_default("early stopping: epochs without a better validation loss", "patience"))
    t.add_argument("--no-small-data", dest="small_data", action="store_false", default=argparse.SUPPRESS,
                   help=f"keep the defaults above on fewer than {SMALL_DATA_POSTERS} labelled training posters "
                        f"(otherwise the ML-Decoder trains with the small-data settings)")
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
