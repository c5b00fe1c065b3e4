"""Crash-safe file writes and the directory lock: the one copy every stage uses.

A write goes to a hidden temporary name in the destination's folder, is flushed to disk, then renamed
over the destination, so a reader (or a rerun after a kill) sees the old file or the new one, never half
of one. The lock serialises writers of one folder across processes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "write_json", "read_json",
           "replace_dir", "directory_lock"]


def _temporary_name(path: Path) -> Path:
    # pid + thread: two writers of one path (processes or server threads) never share a temporary file.
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write `path` through (by any library that takes a file name); on success
    it is flushed and renamed over `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed already, or never written
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 2, allow_nan: bool = False,
               default: Callable[[Any], Any] | None = None) -> Path:
    """Write `payload` as JSON atomically. NaN and infinity are refused (they are not JSON) unless allowed."""
    text = json.dumps(payload, indent=indent, allow_nan=allow_nan, default=default)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def replace_dir(build: Callable[[Path], Any], folder: str | os.PathLike) -> Path:
    """Build a folder under a temporary name with `build(tmp)`, then swap it in for `folder`: a run killed
    half way leaves the previous folder (or none), never a half-written one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextlib.contextmanager
def directory_lock(folder: str | os.PathLike, name: str = ".lock") -> Iterator[None]:
    """One holder at a time of `folder`'s lock file, across processes (released when the process dies)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "a") as lock:  # "a": an existing lock file is not written to
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
