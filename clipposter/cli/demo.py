"""`clipposter demo`: the main job end to end (clipposter.pipeline)."""
from __future__ import annotations

from clipposter.cli.common import add_json_flag, emit


def cmd_demo(args) -> int:
    from clipposter.pipeline import format_demo, run_demo

    result = run_demo(args.out, n=args.n, source=args.source, seed=args.seed, progress=not args.json)
    emit(args, result.to_dict(), format_demo(result))
    return 0


def register(sub, train, evaluate) -> None:
    """Add `demo` to the top-level subparsers."""
    p = sub.add_parser("demo", help="the main job end to end: posters → embed → both heads → evaluation → index → report",
                       description="Generate synthetic posters (or read --source), embed them, train the genre and "
                                   "caption heads briefly, evaluate both beside their baselines, build the poster "
                                   "index and write an HTML report; prints the report's path. Uses ViT-B-32/openai "
                                   "and gpt2 when their weights can be had, else a tiny CLIP trained once on synthetic "
                                   "posters (cached; docs/backbone.md) and a tiny GPT-2 (and says so). Rerunning "
                                   "reuses finished stages.")
    p.add_argument("--out", metavar="DIR", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("-n", type=int, default=600, help="number of synthetic posters (default 600)")
    p.add_argument("--source", default=None,
                   help="run on your own posters instead: a folder, a manifest with genres and taglines, or kaggle:DIR")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic posters, splits and training")
    add_json_flag(p)
    p.set_defaults(func=cmd_demo)
