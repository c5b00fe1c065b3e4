"""The run folder: `run.json` names the parts of a finished `clipposter demo` run.

The pipeline writes it last, once the cache, both heads and their evaluations exist; the report and
the app read it to reopen the run. Paths are stored relative to the run folder, so a run folder can
be moved or copied whole, and are made absolute when read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from clipposter.errors import ClipposterError
from clipposter.files import read_json, write_json

__all__ = ["RUN_FILE", "RUN_FORMAT", "PATH_KEYS", "write_run", "read_run"]

RUN_FILE = "run.json"
RUN_FORMAT = 1
REQUIRED_KEYS = ("cache", "genre_head", "caption_head")
PATH_KEYS = REQUIRED_KEYS + ("report",)  # folder-relative paths; "evaluation" maps names to more of them


def write_run(run_dir: str | os.PathLike, info: Mapping[str, Any]) -> Path:
    """Write `info` as the run folder's run.json (atomically) and return its path.

    `info` must name the cache, genre head and caption head (paths relative to `run_dir`); the format
    number is added. Values that are not JSON (paths, dates) are written as text."""
    missing = [key for key in REQUIRED_KEYS if not info.get(key)]
    if missing:
        raise ClipposterError(f"a run description needs {', '.join(REQUIRED_KEYS)}; missing {', '.join(missing)}")
    return write_json(Path(run_dir) / RUN_FILE, {"format": RUN_FORMAT, **info}, default=str)


def read_run(run_dir: str | os.PathLike) -> dict:
    """The run description `clipposter demo` wrote in `run_dir`, with its paths made absolute and
    `run_dir` added. A missing, unreadable or incomplete run.json is one ClipposterError line."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    try:
        info = read_json(path)
    except FileNotFoundError:
        raise ClipposterError(f"{path}: not found; give a run folder written by `clipposter demo`, or "
                              f"the cache and the two head folders") from None
    except (OSError, ValueError) as exc:
        raise ClipposterError(f"{path}: unreadable run description ({exc}); rerun `clipposter demo`") from None
    if not isinstance(info, dict) or any(k not in info for k in REQUIRED_KEYS):
        raise ClipposterError(f"{path}: lacks cache, genre_head or caption_head; rerun `clipposter demo`")
    for key in PATH_KEYS:
        if info.get(key):
            info[key] = str((run_dir / info[key]).resolve())
    evaluation = dict(info.get("evaluation") or {})
    for key, value in evaluation.items():
        if value:
            evaluation[key] = str((run_dir / value).resolve())
    if "evaluation" in info:
        info["evaluation"] = evaluation
    info["run_dir"] = str(run_dir.resolve())
    return info
