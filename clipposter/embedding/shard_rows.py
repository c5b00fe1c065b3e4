"""The rows of several shards seen as one: their memory-mapped matrices as one (N, D) matrix, without
concatenating them, and their record tables as one table of records by poster id (`ShardRecords`).

A sharded cache's `image_matrix()` is this view when it has more than one shard: search reads rows from
it the way it reads a memory-mapped .npy file (one row, a slice, a list of rows), and every such read
touches only the rows it names. A slice inside one shard is that shard's own memory map; a slice across
shards is again a view; `np.asarray(view)` is the one read that copies everything.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from clipposter.records import PosterRecord


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


class ShardRecords:
    """The poster records of several shards' record tables (Arrow tables of RECORD_COLUMNS) as one table
    in id order, each poster id once: a later shard's record of an id replaces an earlier one's, as an
    upsert would. Built with Arrow's sort (no Python object per record), and each lookup converts only
    the columns and records it returns; the id → record map and each record's poster row (from
    `poster_row`, content hash → row) are made on first use."""

    def __init__(self, tables: Sequence, poster_row: Mapping[str, int]):
        import pyarrow as pa
        import pyarrow.compute as pc

        self._poster_row = poster_row
        self._table = pa.concat_tables(tables) if tables else None
        n = 0 if self._table is None else self._table.num_rows
        if n == 0:
            self._keep, self._ids = np.zeros(0, np.int64), []
        else:
            order = pc.sort_indices(self._table.column("id")).to_numpy()  # stable: an id's records in shard order
            ids = self._table.column("id").combine_chunks().take(pa.array(order))
            last = np.ones(n, bool)  # the last record of each run of one id
            last[:-1] = pc.not_equal(ids.slice(0, n - 1), ids.slice(1)).to_numpy(zero_copy_only=False)
            self._keep = order[last]
            self._ids = ids.filter(pa.array(last)).to_pylist()
        self._at: dict[str, int] | None = None
        self._rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        """Every poster id, in id order."""
        return self._ids

    def index_of(self, ids: Sequence[str]) -> np.ndarray:
        """The place of each id in id order; -1 for an id without a record."""
        if self._at is None:
            self._at = dict(zip(self._ids, range(len(self._ids))))
        at = self._at
        return np.fromiter((at.get(i, -1) for i in ids), np.int64, len(ids))

    def poster_rows(self, at: np.ndarray | None = None) -> np.ndarray:
        """The poster row of the records at `at` (places from `index_of`; every record without it), -1
        where the place is -1 or the record's poster is not stored."""
        if self._rows is None:
            get = self._poster_row.get
            self._rows = np.fromiter((get(h, -1) for h in self.column("hash")), np.int64, len(self))
        if at is None:
            return self._rows.copy()
        at = np.asarray(at, np.int64)
        return np.where(at >= 0, self._rows[np.maximum(at, 0)] if len(self) else -1, -1)

    def column(self, name: str, at: np.ndarray | None = None) -> list:
        """Python values of one column for the records at `at` (places from `index_of`, none -1), or
        every record's in id order."""
        if not len(self):
            return [] if at is None else [None] * len(at)
        import pyarrow as pa

        keep = self._keep if at is None else self._keep[np.asarray(at, np.int64)]
        return self._table.column(name).take(pa.array(keep)).to_pylist()

    def records(self, split: str | None = None, with_hashes: bool = False) -> list:
        """Records in id order, optionally of one split; with `with_hashes`, (record, content hash) pairs."""
        at = None
        if split is not None and len(self):
            import pyarrow as pa
            import pyarrow.compute as pc

            splits = self._table.column("split").take(pa.array(self._keep))
            at = np.flatnonzero(pc.fill_null(pc.equal(splits, split), False).to_numpy(zero_copy_only=False))
        cols = {c: self.column(c, at) for c in ("id", "image", "genres", "tagline", "overview", "split", "title",
                                                "url")}
        out = [PosterRecord(id=i, image=im, genres=list(g), tagline=t, overview=o, split=s, title=ti, url=u)
               for i, im, g, t, o, s, ti, u in zip(*cols.values())]
        return list(zip(out, self.column("hash", at))) if with_hashes else out

    def split_counts(self) -> dict[str, int]:
        """Records per split ("none" for records without one), by split name."""
        counts: dict[str, int] = {}
        for s in self.column("split"):
            key = "none" if s is None else s
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))
