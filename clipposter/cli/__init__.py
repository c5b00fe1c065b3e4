"""The `clipposter` command line: argument parsing only, over the Python API.

    from clipposter.cli.main import main
    main(["cache", "info", "--cache", "runs/cache", "--json"])

The entry point is `clipposter.cli.main:main` (the function shares its module's name, so it is not
re-exported here). `build_parser` is looked up on first use, so that `python -m clipposter.cli.main`
does not find its own module imported twice.
"""
from __future__ import annotations

import importlib

__all__ = ["build_parser"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("clipposter.cli.main"), name)
