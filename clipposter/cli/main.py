"""`clipposter` command line: parses arguments, calls the Python API, prints (or prints JSON).

One module per command group (embed, genres, captions, search, report, app, demo), each with a
`register` that adds its subcommands; the flags they share live in clipposter.cli.common. Building
the parser imports no heavy library (a test checks it): they are imported when a command runs.

Expected failures (bad input, missing weights, mismatched caches) end with one `error:` line and a
non-zero exit code; only real bugs show a traceback. A library ConfigError names a Python parameter;
the line printed here names the flag of the invoked command that sets it.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from clipposter.cli import app, backbone, captions, demo, embed, export, genres, report, search
from clipposter.cli.common import EXIT_ERROR, flag_for, name_flags
from clipposter.errors import ClipposterError, ConfigError

# 128 + SIGPIPE, what a shell reports for a command whose reader went away (`clipposter ... | head`).
EXIT_BROKEN_PIPE = 141


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipposter", description="Movie-poster analysis on frozen CLIP embeddings: "
                                     "genres, taglines and similarity search from one embedding cache.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    embed.register(sub)
    # `train <head>` and `evaluate <head>` hold one subcommand per head; the head modules add them.
    train_heads = sub.add_parser("train", help="train a head on an embedding cache").add_subparsers(
        dest="train_head", required=True)
    evaluate_heads = sub.add_parser("evaluate", help="evaluate a head on a cache split").add_subparsers(
        dest="evaluate_head", required=True)
    for module in (genres, captions, backbone, search, report, app, demo, export):
        module.register(sub, train_heads, evaluate_heads)
    for leaf in leaf_parsers(parser):
        # the parser of the invoked command, to name its flags in error messages
        leaf.set_defaults(command_parser=leaf)
    return parser


def leaf_parsers(parser: argparse.ArgumentParser):
    """The parsers of every runnable command (those without subcommands of their own)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
        return
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from leaf_parsers(child)


def config_error_line(exc: ConfigError, parser: argparse.ArgumentParser | None) -> str:
    flag = flag_for(parser, exc.field) if parser is not None else "--" + exc.field.replace("_", "-")
    return f"error: {flag} {name_flags(exc.problem, parser)}"


def _quiet_broken_pipe() -> int:
    # The reader of stdout went away: send what Python still wants to flush to /dev/null, so that
    # exiting prints no second BrokenPipeError.
    with contextlib.suppress(OSError, ValueError):  # no stdout file descriptor left to redirect: nothing to flush
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


class LowercaseLevelFormatter(logging.Formatter):
    """`warning: ...`, the casing of the CLI's own `error:` and `warning:` lines, for logged records
    too (on this handler only: the record other handlers see keeps its level name)."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord(record.__dict__)
        record.levelname = record.levelname.lower()
        return super().format(record)


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(build_parser(), argv)
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        sys.stdout.flush()  # --help into a closed pipe fails here, inside main, not at exit
        raise
    handler = logging.StreamHandler()
    handler.setFormatter(LowercaseLevelFormatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    if not args.verbose:
        # open_clip and the hub client log their own multi-line errors; ours is the one line that counts.
        for name in ("root", "huggingface_hub", "open_clip"):
            logging.getLogger(name).setLevel(logging.CRITICAL if name == "root" else logging.ERROR)
        logging.getLogger("clipposter").setLevel(logging.WARNING)
    try:
        code = args.func(args) or 0
        sys.stdout.flush()
        return code
    except ConfigError as exc:
        print(config_error_line(exc, getattr(args, "command_parser", None)), file=sys.stderr)
        return EXIT_ERROR
    except ClipposterError as exc:
        print(f"error: {name_flags(str(exc), getattr(args, 'command_parser', None))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
