"""`clipposter report`: write the self-contained HTML report of a run, or of a cache and two heads.

With --run DIR (a folder written by `clipposter demo`), the cache, heads and saved evaluations named
in its run.json are reused; an evaluation is recomputed only when it is missing, unreadable, or was
made on another split or decoding strategy than asked for (and --no-eval is not given).
"""
from __future__ import annotations

import json
from pathlib import Path

from clipposter.cli.common import (DEFAULT_STRATEGY, STRATEGY_CHOICES, add_device_flag, add_json_flag, emit,
                                   open_analyzer)
from clipposter.errors import ClipposterError

_LABELS = {"genres": "genre", "captions": "tagline"}


def _load_saved(path: str | None) -> dict | None:
    """A saved evaluation JSON, or None when there is none or it cannot be read (it is then recomputed)."""
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cmd_report(args) -> int:
    from clipposter.report.build import build_report

    if args.limit < 1:
        raise ClipposterError(f"--limit must be at least 1, got {args.limit}")
    if args.k < 0:
        raise ClipposterError(f"-k must be zero or more, got {args.k}")
    out = Path(args.out) if args.out else (Path(args.run) / "report.html" if args.run else Path("report.html"))
    if out.is_dir():
        raise ClipposterError(f"--out {out}: is a folder; give a file name such as {out / 'report.html'}")
    analyzer = open_analyzer(args, what="the report", pretrained=None)
    with analyzer:
        saved = (analyzer.run_info.get("evaluation") or {}) if args.run else {}
        genre_eval = _load_saved(saved.get("genres"))
        caption_eval = _load_saved(saved.get("captions"))
        if caption_eval is not None and not args.no_eval:
            # A saved tagline evaluation of another split or strategy would not describe what is asked for.
            same = (caption_eval.get("split") == args.split
                    and (caption_eval.get("decoding") or {}).get("strategy") == args.strategy)
            if not same:
                caption_eval = None
        summary = build_report(analyzer, out, split=args.split, limit=args.limit, k=args.k, strategy=args.strategy,
                               genre_eval=genre_eval, caption_eval=caption_eval, evaluate=not args.no_eval,
                               sentence_model=args.sentence_model, progress=not args.json)
    size = summary["bytes"]
    human = f"{size / 1024 / 1024:.1f} MB" if size >= 1024 * 1024 else f"{size / 1024:.0f} KB"
    evals = ", ".join(summary["evaluations"]) or "none"
    lines = [summary["path"],
             f"  {summary['posters']} posters ({summary['split']} split), {human}; evaluations: {evals}"]
    if summary.get("notice"):
        lines.append(f"  notice: {summary['notice']}")
    for name, why in summary["skipped"].items():
        lines.append(f"  {_LABELS.get(name, name)} evaluation left out: {why}")
    emit(args, summary, "\n".join(lines))
    return 0


def register(sub, train, evaluate) -> None:
    """Add the `report` command to the top-level subparsers."""
    p = sub.add_parser("report", help="write a self-contained HTML report: posters, genres, taglines, neighbours, "
                                      "evaluations",
                       description="One HTML file with no external resources: a poster grid (true vs predicted "
                                   "genres, generated taglines, nearest neighbours), the genre and tagline "
                                   "evaluation tables beside their baselines, and per-genre charts.")
    src = p.add_argument_group("what to report on (--run, or the three folders)")
    src.add_argument("--run", metavar="DIR", help="a run folder written by `clipposter demo` (reads its run.json)")
    src.add_argument("--cache", metavar="DIR", help="embedding cache directory")
    src.add_argument("--genre-head", metavar="DIR", help="a genre head folder (`clipposter train genres --out`)")
    src.add_argument("--caption-head", metavar="DIR",
                     help="a caption head folder (`clipposter train captions --out`)")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="the HTML file to write (default: RUN/report.html with --run, else report.html)")
    p.add_argument("--split", default="test", help="posters of this split are shown (default test; all posters "
                                                   "when the split is empty)")
    p.add_argument("--limit", type=int, default=60, help="at most this many posters (default 60)")
    p.add_argument("-k", type=int, default=5, help="nearest neighbours per poster (default 5; 0 for none)")
    p.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGY_CHOICES,
                   help=f"tagline decoding (default {DEFAULT_STRATEGY})")
    p.add_argument("--no-eval", action="store_true",
                   help="do not compute evaluations (saved ones of a --run are still shown)")
    p.add_argument("--sentence-model", default="all-MiniLM-L6-v2",
                   help="sentence-transformers model for the tagline scores (name or folder)")
    add_device_flag(p, help="device for the heads (auto, cpu, cuda, cuda:N or mps)")
    add_json_flag(p)
    p.set_defaults(func=cmd_report)
