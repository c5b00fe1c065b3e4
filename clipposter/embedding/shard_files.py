"""The files of a sharded (format 2) cache: write-once shards and the shard index that lists them.

Layout of a cache directory:

    cache.json      format version 2, backbone identity, dtype, width (written once)
    shards.json     the shard index: the shards that make up the cache, in order (replaced atomically)
    shards/NAME/    one write-once shard:
        images.npy      (n, D) L2-normalised image embeddings (a plain .npy file, memory-mapped on read)
        texts.npy       (m, D) text embeddings
        tokens.npy      (n, T, W) ViT token sequences of its posters (optional)
        posters.parquet content hash of each row of images.npy, in row order
        records.parquet poster records (id, hash, image, genres, tagline, overview, split, title, url)
        texts.parquet   hash and text of each row of texts.npy

A shard's row tables are Parquet: a shard is written once and read whole on open (every lookup goes
through the reader's in-memory index across shards), so a columnar file that pandas, pyarrow and
DuckDB read, with no journal, lock or -wal file to carry along, fits better than a database per shard.

A writer builds a shard under a hidden name (`shards/.NAME.partial`), holding an exclusive lock on
the file `.writing` inside it, fsyncs every file, renames the folder to `shards/NAME`, and only then
lists it in shards.json (a read-modify-write under the cache's `.index.lock`, written to a temporary
name and renamed). It drops its `.writing` lock after the commit. So a writer killed at any moment
leaves at most one shard that shards.json does not list: readers never see it, and `remove_unlisted`
(run by the next writer) deletes it, recognising a live writer's shard by its held lock. Many writers
append at once: each holds the index lock only for the few milliseconds of its commit.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from clipposter.errors import ClipposterError
from clipposter.files import directory_lock, write_json

FORMAT_VERSION = 2
INDEX = "shards.json"
SHARDS = "shards"
INDEX_LOCK = ".index.lock"
WRITING = ".writing"
_PARTIAL = ".partial"
_FULL = (errno.ENOSPC, errno.EDQUOT)

RECORD_COLUMNS = ("id", "hash", "image", "genres", "tagline", "overview", "split", "title", "url")


def _schemas():
    """The three row tables' Parquet schemas (pyarrow is imported only when a shard is read or written)."""
    import pyarrow as pa

    string = pa.string()
    records = pa.schema([(c, pa.list_(string) if c == "genres" else string) for c in RECORD_COLUMNS])
    return pa.schema([("hash", string)]), records, pa.schema([("hash", string), ("text", string)])


@dataclass(frozen=True)
class ShardEntry:
    """One line of the shard index: a shard's name and what it holds (checked against its files on open)."""

    name: str
    posters: int
    texts: int
    records: int
    tokens: tuple[int, int] | None = None  # (T, W) of its token tensor, None without one

    def to_dict(self) -> dict:
        return {"name": self.name, "posters": self.posters, "texts": self.texts, "records": self.records,
                "tokens": list(self.tokens) if self.tokens else None}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardEntry":
        tokens = d.get("tokens")
        return cls(str(d["name"]), int(d["posters"]), int(d["texts"]), int(d["records"]),
                   tuple(int(x) for x in tokens) if tokens else None)


@dataclass
class ShardData:
    """What one shard holds: its matrices memory-mapped, its hash tables as Python lists, and its records
    as the Arrow table read from disk (the reader indexes them when a record is first asked for)."""

    entry: ShardEntry
    images: np.ndarray
    texts: np.ndarray
    tokens: np.ndarray | None
    poster_hashes: list[str]
    text_hashes: list[str]
    text_values: list[str]
    record_table: object  # a pyarrow.Table of RECORD_COLUMNS


def is_sharded(meta: dict) -> bool:
    return meta.get("format_version") == FORMAT_VERSION


def _write_failure(root: Path, path: Path, exc: OSError) -> ClipposterError:
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL:
        return ClipposterError(f"disk full while writing {root}: {path.name}: {reason}; free some space and run "
                               f"again (the cache keeps every shard it listed)")
    return ClipposterError(f"cannot write {path}: {reason} (the cache keeps every shard it listed)")


# ----- the index -------------------------------------------------------------------------------------
def read_index(root: Path) -> list[ShardEntry]:
    """The listed shards, in order; a cache whose index was never written holds none."""
    path = root / INDEX
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ClipposterError(f"{path}: unreadable shard index ({exc}); restore it from where the cache came "
                              f"from") from None
    try:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format {data.get('format_version')}")
        return [ShardEntry.from_dict(d) for d in data["shards"]]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ClipposterError(f"{path}: not a shard index of format {FORMAT_VERSION} ({exc}); restore it from "
                              f"where the cache came from") from None


def _write_index(root: Path, entries: Sequence[ShardEntry]) -> None:
    path = root / INDEX
    try:
        write_json(path, {"format_version": FORMAT_VERSION, "shards": [e.to_dict() for e in entries]})
    except OSError as exc:
        raise _write_failure(root, path, exc) from None


@contextlib.contextmanager
def index_lock(root: Path) -> Iterator[None]:
    """The lock every change of the index takes (commits, removing unlisted shards); never held while
    a shard is written."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(directory_lock(root, INDEX_LOCK))
        except OSError as exc:
            raise ClipposterError(f"cannot write into {root} ({exc.strerror or exc}): adding to a cache needs a "
                                  f"writable folder; commands that only read work on it as it is") from None
        yield


def commit(root: Path, added: Sequence[ShardEntry], replaced: Sequence[str] = ()) -> list[ShardEntry]:
    """List `added` shards in the index, atomically. Without `replaced` they go last; with it (a
    compaction) they take the place of those shards, ahead of any listed since, and every replaced
    shard must still be listed (another compaction got there first otherwise). Returns the new list."""
    with index_lock(root):
        entries = read_index(root)
        if replaced:
            listed = {e.name for e in entries}
            gone = [n for n in replaced if n not in listed]
            if gone:
                raise ClipposterError(f"the shards of {root} changed while they were being compacted ({gone[0]} "
                                      f"is no longer listed); run the compaction again")
            drop = set(replaced)
            entries = list(added) + [e for e in entries if e.name not in drop]
        else:
            entries = entries + list(added)
        _write_index(root, entries)
        return entries


def remove_unlisted(root: Path) -> list[str]:
    """Delete the shards no index lists and no live writer is building or committing (a killed writer's,
    a compaction's leftovers). Returns their names."""
    folder = root / SHARDS
    if not folder.is_dir():
        return []
    removed = []
    with index_lock(root):
        listed = {e.name for e in read_index(root)}
        for path in sorted(folder.iterdir()):
            if path.name in listed or not path.is_dir():
                continue
            try:
                fd = os.open(path / WRITING, os.O_RDONLY)
            except FileNotFoundError:
                fd = None  # finished and never listed, or dropped from the index: nobody's
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer's
                finally:
                    os.close(fd)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def remove_shards(root: Path, names: Sequence[str]) -> None:
    """Delete shards that the index no longer lists (after a compaction). Readers that mapped them keep
    their mappings; the ones opening now read the new index."""
    for name in names:
        shutil.rmtree(root / SHARDS / name, ignore_errors=True)


# ----- writing one shard -----------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _save_table(path: Path, columns: dict, schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns, schema=schema), path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def new_shard(root: Path) -> Iterator[Path]:
    """A fresh shard folder to write into, named and locked as being written; on success the caller lists
    it (`commit`) before leaving the block, and the lock goes when the block ends. On failure the folder
    is removed."""
    folder = root / SHARDS
    name = uuid.uuid4().hex
    tmp = folder / f".{name}{_PARTIAL}"
    try:
        tmp.mkdir(parents=True)
        fd = os.open(tmp / WRITING, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _write_failure(root, tmp, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(folder / name, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def write_shard(root: Path, tmp: Path, dim: int, dtype: np.dtype, *, poster_hashes: Sequence[str] = (),
                images: np.ndarray | None = None, tokens: np.ndarray | None = None,
                records: Sequence[tuple] = (), text_hashes: Sequence[str] = (), texts: Sequence[str] = (),
                text_emb: np.ndarray | None = None) -> ShardEntry:
    """Write a shard's files into `tmp` (from `new_shard`), flush them, and rename it to its final name.
    `records` are tuples in RECORD_COLUMNS order, genres a list. Returns the entry to commit."""
    images = np.zeros((0, dim), dtype) if images is None else np.asarray(images)
    text_emb = np.zeros((0, dim), dtype) if text_emb is None else np.asarray(text_emb)
    if images.shape != (len(poster_hashes), dim) or text_emb.shape != (len(text_hashes), dim):
        raise ValueError(f"expected one row of width {dim} per hash, got {images.shape} and {text_emb.shape}")
    if images.dtype != dtype or text_emb.dtype != dtype:
        raise ValueError(f"shard matrices are stored as {np.dtype(dtype)}")
    if tokens is not None and (tokens.ndim != 3 or len(tokens) != len(poster_hashes) or tokens.dtype != dtype):
        raise ValueError(f"expected tokens of shape ({len(poster_hashes)}, T, W) in {np.dtype(dtype)}, "
                         f"got {tokens.shape} {tokens.dtype}")
    columns = list(zip(*records)) if records else [[] for _ in RECORD_COLUMNS]
    try:
        _save_npy(tmp / "images.npy", images)
        _save_npy(tmp / "texts.npy", text_emb)
        if tokens is not None:
            _save_npy(tmp / "tokens.npy", tokens)
        poster_schema, record_schema, text_schema = _schemas()
        _save_table(tmp / "posters.parquet", {"hash": list(poster_hashes)}, poster_schema)
        _save_table(tmp / "texts.parquet", {"hash": list(text_hashes), "text": list(texts)}, text_schema)
        _save_table(tmp / "records.parquet", dict(zip(RECORD_COLUMNS, map(list, columns))), record_schema)
        _fsync_dir(tmp)
        name = tmp.name[1:-len(_PARTIAL)]
        os.rename(tmp, tmp.parent / name)
        _fsync_dir(tmp.parent)
    except OSError as exc:
        raise _write_failure(root, tmp, exc) from None
    return ShardEntry(name, len(poster_hashes), len(text_hashes), len(records),
                      tuple(tokens.shape[1:]) if tokens is not None else None)


def finish_shard(root: Path, name: str) -> None:
    """After its commit: the shard no longer needs the mark of a shard being written."""
    with contextlib.suppress(OSError):
        (root / SHARDS / name / WRITING).unlink()


def append_shard(root: Path, dim: int, dtype: np.dtype, **content) -> ShardEntry:
    """Write one shard and list it: the whole of an append."""
    with new_shard(root) as tmp:
        entry = write_shard(root, tmp, dim, dtype, **content)
        commit(root, [entry])
    finish_shard(root, entry.name)
    return entry


# ----- reading one shard -----------------------------------------------------------------------------
class ShardMissing(Exception):
    """A listed shard is gone: a compaction replaced it after the index was read."""


def _damaged(root: Path, name: str, why: str) -> ClipposterError:
    return ClipposterError(f"shard {name} of {root} is damaged ({why}); restore it from where the cache came "
                           f"from, or drop it with `clipposter cache compact` after restoring the index")


def _load_npy(root: Path, entry: ShardEntry, file: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    path = root / SHARDS / entry.name / file
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ShardMissing(entry.name) from None
    except (OSError, ValueError) as exc:
        raise _damaged(root, entry.name, f"{file}: {exc}") from None
    if array.shape != shape or array.dtype != dtype:
        raise _damaged(root, entry.name, f"{file} is a {array.dtype} array of shape {array.shape}, the index "
                                         f"lists {shape} in {np.dtype(dtype)}")
    return array


def read_rows(root: Path, entry: ShardEntry, start: int, stop: int, fallback: np.ndarray) -> np.ndarray:
    """A copy of rows start..stop of a shard's images.npy through a map of its own, released on return, so
    a scan of every shard keeps one chunk resident, not the files. A shard removed since it was opened
    (a compaction) is read through `fallback`, the reader's own map of it."""
    try:
        mapped = np.load(root / SHARDS / entry.name / "images.npy", mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        return np.array(fallback[start:stop])
    try:
        return np.array(mapped[start:stop])
    finally:
        del mapped


def _load_table(root: Path, entry: ShardEntry, file: str, rows: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / SHARDS / entry.name / file
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise ShardMissing(entry.name) from None
    except (OSError, pa.ArrowException) as exc:
        raise _damaged(root, entry.name, f"{file}: {exc}") from None
    if table.num_rows != rows:
        raise _damaged(root, entry.name, f"{file} holds {table.num_rows} rows, the index lists {rows}")
    return table


def load_shard(root: Path, entry: ShardEntry, dim: int, dtype: np.dtype) -> ShardData:
    """Map a listed shard's matrices and read its tables, checking each against the index."""
    images = _load_npy(root, entry, "images.npy", (entry.posters, dim), dtype)
    texts = _load_npy(root, entry, "texts.npy", (entry.texts, dim), dtype)
    tokens = (_load_npy(root, entry, "tokens.npy", (entry.posters, *entry.tokens), dtype)
              if entry.tokens else None)
    posters = _load_table(root, entry, "posters.parquet", entry.posters)
    text_rows = _load_table(root, entry, "texts.parquet", entry.texts)
    records = _load_table(root, entry, "records.parquet", entry.records)
    return ShardData(entry, images, texts, tokens, posters.column("hash").to_pylist(),
                     text_rows.column("hash").to_pylist(), text_rows.column("text").to_pylist(), records)


def shard_bytes(root: Path) -> int:
    """Bytes on disk of the cache's own files and its shards (not of a search index kept beside them)."""
    files = [p for p in root.iterdir() if p.is_file()] + list((root / SHARDS).rglob("*"))
    return sum(p.stat().st_size for p in files if p.is_file())


def copy_shards(src_root: Path, entries: Sequence[ShardEntry], dst_root: Path) -> list[ShardEntry]:
    """List shards of another cache in `dst_root`, after its own, under new names: hard links where the
    filesystem allows (shards never change, so sharing their files is safe), copies elsewhere."""
    copied: list[ShardEntry] = []
    with contextlib.ExitStack() as stack:
        for entry in entries:
            tmp = stack.enter_context(new_shard(dst_root))
            src = src_root / SHARDS / entry.name
            try:
                for f in sorted(src.iterdir()):
                    if f.name == WRITING:
                        continue
                    try:
                        os.link(f, tmp / f.name)
                    except OSError:
                        shutil.copy2(f, tmp / f.name)
                _fsync_dir(tmp)
                name = tmp.name[1:-len(_PARTIAL)]
                os.rename(tmp, tmp.parent / name)
            except FileNotFoundError:
                raise ShardMissing(entry.name) from None
            except OSError as exc:
                raise _write_failure(dst_root, tmp, exc) from None
            copied.append(ShardEntry(name, entry.posters, entry.texts, entry.records, entry.tokens))
        commit(dst_root, copied)
    for entry in copied:
        finish_shard(dst_root, entry.name)
    return copied
