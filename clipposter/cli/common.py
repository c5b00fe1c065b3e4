"""What every command module of the CLI shares: the common flags, printing, and argument helpers.

Light at import time on purpose: `clipposter --help` builds every parser, and nothing here (or in the
command modules' argument definitions) may import torch, open_clip, transformers, faiss or gradio.
Heavy imports happen inside the functions that run a command.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from clipposter.errors import ClipposterError

EXIT_ERROR = 2

# clipposter.ingest.images.DEFAULT_MAX_BYTES, spelled out so that building the parser imports no image
# library (a test checks that the two agree).
DEFAULT_MAX_BYTES = 50 * 1024 * 1024

# The decoding strategies of clipposter.heads.caption.decoding.STRATEGIES, spelled out here so that
# parsing arguments does not import torch (a test checks that the two lists agree).
STRATEGY_CHOICES = ("greedy", "beam", "poster2plot", "sample", "lstm")
DEFAULT_STRATEGY = "lstm"


# ---------------------------------------------------------------------------------- printing

def emit(args, payload: dict, text: str) -> None:
    """Print `payload` as JSON with --json, else the human-readable `text`."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(text)


def warn(lines) -> None:
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


# ---------------------------------------------------------------------------- the shared flags
# One shape for every command: `--cache DIR` names the embedding cache, `--head DIR` the head a
# command uses, `--out` what it writes (a folder, or a JSON/HTML file), `--json` prints JSON.

def add_json_flag(p: argparse.ArgumentParser, help: str = "print machine-readable JSON") -> None:
    p.add_argument("--json", action="store_true", help=help)


def add_cache_flag(p, required: bool = True, help: str = "embedding cache directory (from `clipposter embed`)") -> None:
    p.add_argument("--cache", metavar="DIR", required=required, default=None, help=help)


def add_head_flag(p, help: str = "trained head folder") -> None:
    p.add_argument("--head", metavar="DIR", required=True, help=help)


def add_device_flag(p, help: str = "auto, cpu, cuda, cuda:N or mps") -> None:
    p.add_argument("--device", default="auto", help=help)


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone")
    # No defaults here: an existing cache supplies its own backbone (see backbone_from_args for new ones).
    g.add_argument("--backbone", default=None,
                   help="open_clip architecture (ViT-B-32, ViT-L-14, clipposter-tiny) or hf-hub:ORG/NAME "
                        "(default: an existing cache's, else ViT-B-32)")
    g.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag (openai, laion2b_s34b_b79k, ...) or a local checkpoint file; "
                        "'random' for seeded random weights (benchmarks only) (default: an existing cache's, "
                        "else openai)")
    add_device_flag(g)
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="autocast precision on GPU (auto: fp16 on CUDA, fp32 on CPU)")


def add_source_args(p: argparse.ArgumentParser, *, reads_posters: bool = True) -> None:
    """The flags of a command taking a SOURCE; `reads_posters` adds those of one that reads the poster
    files (`embed`): --image-root, --seed, --download-dir and --max-bytes."""
    g = p.add_argument_group("source")
    for col, default in [("id", "id"), ("image", "image"), ("genres", "genres"), ("tagline", "tagline"),
                         ("overview", "overview"), ("split", "split"), ("title", "title"), ("url", "url")]:
        g.add_argument(f"--{col}-col", default=None, help=f"manifest column with the {col} (default: {default})")
    g.add_argument("--encoding", default=None,
                   help="text encoding of a CSV/TSV source, e.g. cp1252 (default: detected; UTF-8, UTF-16 with a "
                        "byte-order mark, cp1252 or Latin-1, with a note when it is not UTF-8)")
    g.add_argument("--join", default=None, choices=["left", "inner"],
                   help="kaggle:DIR: keep every labelled poster (left, the default) or only those with a row in "
                        "movies_metadata.csv (inner)")
    if not reads_posters:
        return
    g.add_argument("--image-root", default=None, help="folder that relative image paths in a manifest start from")
    g.add_argument("--seed", type=int, default=0, help="seed of the train/validation/test split (default 0)")
    g.add_argument("--download-dir", default=None,
                   help="download posters that only have a URL (and copy wds: pipe: shards) into this folder "
                        "before embedding")
    g.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help="largest poster file read, in bytes; larger ones are skipped (default 50 MB)")


# ------------------------------------------------------------------------------ from arguments

def pretrained_arg(value: str | None) -> str | None:
    """A --pretrained value for a command that only needs it when a checkpoint moved: none → None."""
    return None if value in (None, "", "none") else value


DEFAULT_BACKBONE, DEFAULT_PRETRAINED = "ViT-B-32", "openai"


def pretrained_value(value: str | None) -> str | None:
    """--pretrained as load_backbone takes it: 'random' (or none) → None, seeded random weights;
    not given → the default tag, openai."""
    if value is None:
        return DEFAULT_PRETRAINED
    return None if value in ("random", "none", "") else value


def backbone_from_args(args):
    from clipposter.embedding.backbone import load_backbone

    return load_backbone(args.backbone or DEFAULT_BACKBONE, pretrained_value(args.pretrained), device=args.device,
                         precision=args.precision)


def load_records(args, stats=None, *, local_images: bool = True):
    """The records of args.source (with the source flags), downloading URL-only posters with --download-dir.

    What the reader decided is printed as `note:` lines, what it left out as `warning:` lines, on
    stderr; `stats` (a SourceStats) receives the counts, for --json. With `local_images`, a source
    where no poster has an image file is an error that says where to get them, raised before any
    cache is touched. --max-pixels and --max-bytes are checked here first for the same reason.
    """
    from clipposter.ingest.images import check_limits
    from clipposter.ingest.sources import SourceStats, load_source, require_local_images

    check_limits(max_pixels=getattr(args, "max_pixels", None), max_bytes=getattr(args, "max_bytes", None))
    options = {k: v for k, v in vars(args).items() if k.endswith("_col") and v is not None}
    for name in ("image_root", "encoding", "join", "download_dir"):
        if getattr(args, name, None):
            options[name] = getattr(args, name)
    stats = stats if stats is not None else SourceStats()
    records = load_source(args.source, seed=getattr(args, "seed", 0), stats=stats, **options)
    parser = getattr(args, "command_parser", None)
    say("note", stats.notes, parser)
    warn([name_flags(line, parser) for line in stats.warnings])
    if stats.rows_skipped:
        warn([f"{args.source}: {stats.summary()}"])
    if getattr(args, "download_dir", None):
        from clipposter.ingest.download import download_posters

        report = download_posters([r for r in records if not r.image and r.url], args.download_dir,
                                  progress=not args.json)
        if report.failed:
            report.write_failures(Path(args.download_dir) / "failures.csv")
            print(f"warning: {len(report.failed)} posters could not be downloaded; "
                  f"see {Path(args.download_dir) / 'failures.csv'}", file=sys.stderr)
    if local_images:
        require_local_images(records, args.source)
    return records


def say(kind: str, lines, parser: argparse.ArgumentParser | None = None) -> None:
    """Print each line as `kind: line` on stderr, with the parameters it names in backticks as the flags
    of `parser`."""
    for line in lines:
        print(f"{kind}: {name_flags(line, parser)}", file=sys.stderr)


# ---------------------------------------------------------------------- library errors → flags

def flag_for(parser: argparse.ArgumentParser, field: str) -> str:
    """The option of `parser` that sets the Python parameter `field` (its argparse dest), for error
    messages: `num_heads` → `--heads`. A positional prints as its metavar; an unknown field as
    --field-with-dashes."""
    for action in parser._actions:
        if action.dest != field or isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if isinstance(action, argparse.BooleanOptionalAction):  # --tokens / --no-tokens: the positive one
                longs = [o for o in longs if not o.startswith("--no-")]
            return max(longs or action.option_strings, key=len)
        return action.metavar or action.dest.upper()
    return "--" + field.replace("_", "-")


def name_flags(message: str, parser: argparse.ArgumentParser | None) -> str:
    """Library messages name a parameter in backticks (`max_pixels`); where `parser` has a flag for it,
    the flag (--max-pixels) replaces it."""
    if parser is None:
        return message
    dests = {a.dest for a in parser._actions}
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: flag_for(parser, m.group(1)) if m.group(1) in dests
                  else m.group(0), message)


def open_analyzer(args, what: str, pretrained: str | None = None):
    """The analyzer a report or app command asked for: `--run DIR`, or all three of `--cache`,
    `--genre-head` and `--caption-head`. Any other combination is one error line that says what to
    pass; `what` names the command's job in it ("the report", "the app")."""
    from clipposter.analysis import PosterAnalyzer

    parts = {"--cache": args.cache, "--genre-head": args.genre_head, "--caption-head": args.caption_head}
    given = [name for name, value in parts.items() if value]
    if args.run and given:
        raise ClipposterError(f"give --run DIR, or {', '.join(parts)}, not both ({', '.join(given)} given "
                              f"with --run)")
    if args.run:
        return PosterAnalyzer.from_run(args.run, pretrained=pretrained, device=args.device)
    if not given:
        raise ClipposterError(f"no posters for {what}: pass --run DIR (a folder written by `clipposter demo`), "
                              f"or --cache DIR --genre-head DIR --caption-head DIR")
    missing = [name for name, value in parts.items() if not value]
    if missing:
        raise ClipposterError(f"{', '.join(missing)} missing: without --run {what} needs --cache, --genre-head "
                              f"and --caption-head")
    return PosterAnalyzer.open(args.cache, args.genre_head, args.caption_head, pretrained=pretrained,
                               device=args.device)
