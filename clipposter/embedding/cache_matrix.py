"""The two matrix files of an embedding cache (images.npy, texts.npy) and the check of each against the
row count its index has committed: what opening a cache may repair, and what it must refuse.

A matrix is a plain .npy file with a fixed 128-byte header, so its row count can be rewritten in place.
Rows are written past the committed ones first, then the index commits them, then the header is
rewritten. So the only states a writer leaves behind are:

- rows past the committed count that no commit claims (a writer killed before or during its commit):
  at most one append, and the header still agrees with the index. These bytes are the one thing
  repair cuts.
- a header behind the committed count (killed after the commit, before the header): repair rewrites
  the header; no byte of data changes.

Everything else (a header ahead of the index, fewer rows than the index records, a longer tail, a
garbled header) means files from different moments or a damaged file: a one-line error, and nothing
is changed, so the user can still restore the right files.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import numpy as np

from clipposter.errors import ClipposterError

# A fixed-size .npy header so it can be rewritten in place when rows are added.
HEADER_BYTES = 128
_FULL = (errno.ENOSPC, errno.EDQUOT)


def npy_header(shape: tuple[int, int], dtype: np.dtype) -> bytes:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    body = repr(header).encode("latin1")
    magic = b"\x93NUMPY\x01\x00"
    pad = HEADER_BYTES - len(magic) - 2 - len(body) - 1
    if pad < 0:
        raise ValueError("shape too large for the fixed .npy header")
    return magic + (HEADER_BYTES - len(magic) - 2).to_bytes(2, "little") + body + b" " * pad + b"\n"


def write_failure(root: Path, path: Path, exc: OSError, kept: str) -> ClipposterError:
    """The one-line error of a failed write: a full disk named as such, with what the cache kept."""
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL:
        return ClipposterError(f"disk full while writing {root}: {path.name}: {reason}; free some space and "
                               f"run again (the cache keeps {kept})")
    return ClipposterError(f"cannot write {path}: {reason} (the cache keeps {kept})")


class Matrix:
    """An append-only (N, D) .npy file whose committed length is given from outside (the index)."""

    def __init__(self, root: Path, name: str, dim: int, dtype: np.dtype):
        self.root, self.path, self.name = root, root / name, name
        self.dim, self.dtype = dim, np.dtype(dtype)
        self.row_bytes = dim * self.dtype.itemsize

    # ----- checking --------------------------------------------------------------------------------
    def header_rows(self) -> int | None:
        """The row count in the header (None: no file), read without writing; a garbled header is an error."""
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version != (1, 0):
                    raise ValueError(f"format version {version[0]}.{version[1]}")
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                offset = f.tell()
        except FileNotFoundError:
            return None
        except (ValueError, EOFError, SyntaxError, TypeError) as exc:
            raise self._unreadable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        if offset != HEADER_BYTES or fortran or np.dtype(dtype) != self.dtype or len(shape) != 2 \
                or shape[1] != self.dim:
            raise self._unreadable(f"a {np.dtype(dtype)} array of shape {shape}, expected a {self.dtype} matrix "
                                   f"of width {self.dim} with a {HEADER_BYTES}-byte header")
        return int(shape[0])

    def _unreadable(self, why: str) -> ClipposterError:
        return ClipposterError(f"{self.path}: not a readable .npy matrix of this cache ({why}); restore it or "
                               f"re-embed into a new `cache` directory")

    def check(self, header_rows: int | None, committed: int, max_tail_rows: int | None) -> str | None:
        """What a writer must repair given the header's rows (read first) and `committed` index rows (read
        next): "cut" (an uncommitted tail), "header" (a header behind the index), or None. Anything a
        writer could not have left is an error. The file size is read last: rows are written before
        their commit, so a live writer never makes committed rows look missing.

        max_tail_rows: the most rows one append writes; None for a reader, which repairs nothing and so
        accepts any tail (a writer may be appending right now)."""
        if header_rows is None:
            if committed:
                self._fewer(0, committed)
            return None
        if header_rows > committed:
            raise ClipposterError(
                f"index.sqlite is missing or older than {self.name}: in {self.root}, {self.name} holds "
                f"{header_rows} rows, the index {committed}; restore index.sqlite together with its "
                f"index.sqlite-wal file from where the cache came from, or re-embed into a new cache "
                f"(nothing was changed)")
        size = self.path.stat().st_size
        full = HEADER_BYTES + committed * self.row_bytes
        if size < full:
            self._fewer(size, committed)
        tail = size - full
        if max_tail_rows is None:
            return None
        if tail:
            if header_rows != committed:
                raise ClipposterError(
                    f"{self.path}: its header records {header_rows} rows, the index {committed}, and "
                    f"{tail} more bytes follow them, which no write leaves; the cache is damaged: restore it "
                    f"or re-embed into a new cache (nothing was changed)")
            if tail > max_tail_rows * self.row_bytes:
                raise ClipposterError(
                    f"{self.name} holds {tail} bytes past its {committed} committed rows, more than one append "
                    f"({max_tail_rows} rows) leaves; index.sqlite may be older than {self.name}: restore it "
                    f"together with its index.sqlite-wal file, or re-embed into a new cache (nothing was changed)")
            return "cut"
        return "header" if header_rows < committed else None

    def _fewer(self, size: int, committed: int) -> None:
        raise ClipposterError(f"{self.path}: holds fewer rows than its index records ({size} bytes, {committed} "
                              f"rows expected); the cache is damaged, embed into a new `cache` directory")

    # ----- writing (a writer holds the cache's lock) -------------------------------------------------
    def create(self) -> None:
        """An empty matrix file, unless one is there."""
        if not self.path.exists():
            with open(self.path, "wb") as f:
                f.write(npy_header((0, self.dim), self.dtype))
                f.flush()
                os.fsync(f.fileno())

    def repair(self, action: str | None, committed: int) -> None:
        """Apply what `check` asked for: cut the uncommitted tail and/or make the header agree."""
        if action is None:
            return
        with open(self.path, "r+b") as f:
            if action == "cut":
                f.truncate(HEADER_BYTES + committed * self.row_bytes)
            f.seek(0)
            f.write(npy_header((committed, self.dim), self.dtype))
            f.flush()
            os.fsync(f.fileno())

    def append(self, start_row: int, rows: np.ndarray) -> None:
        """Write rows after `start_row` committed ones and flush them to disk. On a failed write the
        partial rows are cut again and the failure is a one-line error."""
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        if data.ndim != 2 or data.shape[1] != self.dim:
            raise ValueError(f"expected rows of width {self.dim}, got shape {data.shape}")
        try:
            with open(self.path, "r+b") as f:
                f.seek(HEADER_BYTES + start_row * self.row_bytes)
                f.write(data.tobytes())
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            self.cut(start_row)
            raise write_failure(self.root, self.path, exc, f"its {start_row} committed rows") from None

    def cut(self, rows: int) -> None:
        """Best effort: drop bytes past `rows` rows (written by an append that was not committed)."""
        with contextlib.suppress(OSError):  # if it fails, the next writer's open cuts them
            with open(self.path, "r+b") as f:
                f.truncate(HEADER_BYTES + rows * self.row_bytes)

    def set_header(self, rows: int) -> None:
        with open(self.path, "r+b") as f:
            f.write(npy_header((rows, self.dim), self.dtype))

    # ----- reading ---------------------------------------------------------------------------------
    def read(self, rows: int) -> np.ndarray:
        if rows == 0:
            return np.zeros((0, self.dim), self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=HEADER_BYTES, shape=(rows, self.dim))
