"""The rows of several memory-mapped shard matrices seen as one (N, D) matrix, without concatenating them.

A sharded cache's `image_matrix()` is this view when it has more than one shard: search reads rows from
it the way it reads a memory-mapped .npy file (one row, a slice, a list of rows), and every such read
touches only the rows it names. A slice inside one shard is that shard's own memory map; a slice across
shards is again a view; `np.asarray(view)` is the one read that copies everything.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def gather(parts: Sequence[np.ndarray], starts: np.ndarray, rows: np.ndarray, shape: tuple,
           dtype) -> np.ndarray:
    """Rows (global numbers) of the concatenation of `parts` (starting at `starts`), without concatenating."""
    out = np.empty((len(rows), *shape), dtype)
    if len(parts) == 1:
        out[:] = parts[0][rows]
        return out
    which = np.searchsorted(starts, rows, side="right") - 1
    for s in np.unique(which):
        mask = which == s
        out[mask] = parts[s][rows[mask] - starts[s]]
    return out


class ShardedRows:
    """Read-only (N, D) rows of `parts` one after another; indexes like a memory-mapped array."""

    ndim = 2

    def __init__(self, parts: Sequence[np.ndarray], dim: int, dtype):
        self._parts = [p for p in parts if len(p)]
        self.dtype = np.dtype(dtype)
        sizes = [len(p) for p in self._parts]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64) if sizes else np.zeros(1, np.int64)
        self.shape = (int(self._starts[-1]), int(dim))

    @property
    def parts(self) -> list[np.ndarray]:
        return list(self._parts)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        n = len(self)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise IndexError(f"boolean index of shape {rows.shape} for {n} rows")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64, copy=False)
        flat = rows.reshape(-1)
        if len(flat) and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"row out of range for {n} rows")
        flat = np.where(flat < 0, flat + n, flat)
        out = gather(self._parts, self._starts[:-1], flat, (self.shape[1],), self.dtype)
        return out.reshape(*rows.shape, self.shape[1])

    def _slice(self, key: slice):
        start, stop, step = key.indices(len(self))
        if step != 1:
            return self._rows(np.arange(start, stop, step))
        if stop <= start:
            return np.zeros((0, self.shape[1]), self.dtype)
        first = int(np.searchsorted(self._starts, start, side="right") - 1)
        last = int(np.searchsorted(self._starts, stop - 1, side="right") - 1)
        if first == last:
            base = int(self._starts[first])
            return self._parts[first][start - base:stop - base]
        parts = [self._parts[s][max(start - int(self._starts[s]), 0):
                                min(stop, int(self._starts[s + 1])) - int(self._starts[s])]
                 for s in range(first, last + 1)]
        return ShardedRows(parts, self.shape[1], self.dtype)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            head, rest = key[0], key[1:]
            picked = self[head]
            if isinstance(head, (int, np.integer)):
                return np.asarray(picked)[rest]
            return np.asarray(picked)[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            n = len(self)
            if not -n <= key < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            key = int(key) + n if key < 0 else int(key)
            s = int(np.searchsorted(self._starts, key, side="right") - 1)
            return self._parts[s][key - int(self._starts[s])]
        if isinstance(key, slice):
            return self._slice(key)
        return self._rows(np.asarray(key))

    def __array__(self, dtype=None, copy=None):
        out = (np.concatenate(self._parts) if self._parts else np.zeros(self.shape, self.dtype))
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self, dtype=dtype)

    def __iter__(self):
        for part in self._parts:
            yield from part
