"""Whole-cache operations on sharded caches: migrate a v1 cache, merge caches, compact shards.

Each one writes new shards and makes them visible in one atomic step, so a run killed half way
changes nothing a reader sees:

- `migrate` (v1 → v2): in place, the shards are written beside the v1 files and cache.json is
  rewritten last (the switch); only then are the v1 files removed. A run killed before the switch
  leaves the v1 cache as it was (its leftover shards are removed by the next run); one killed after
  it leaves a v2 cache with stray v1 files that the next run removes. Rows keep their numbers, so
  every id, vector (bit for bit, in the stored dtype) and record is the same, and a saved search index
  stays valid. With `out`, the v1 cache is left alone.
- `merge` (v2 + v2 → new v2): the shards of each cache, hard-linked where the filesystem allows,
  listed in a new cache that appears under its name only when complete. Same backbone and dtype only.
- `compact` (v2, in place): the listed shards rewritten as few, each content hash once, each poster
  id's latest record, each text once; listed in place of the old ones in one index commit (shards
  appended meanwhile stay after them), then the old ones are deleted.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from clipposter.embedding import shard_files as sf
from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.cache_types import DTYPES
from clipposter.embedding.shards import ShardedCache, create_meta
from clipposter.errors import ClipposterError, ConfigError
from clipposter.files import directory_lock, replace_dir

# Rows per shard that migrate and compact write: 262,144 rows of width 512 in float16 are 256 MiB.
SHARD_ROWS = 262_144
_V1_FILES = ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "index.sqlite-journal", "images.npy",
             "texts.npy")


def _read_meta(root: Path) -> dict:
    path = root / "cache.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ClipposterError(f"{root}: no clipposter cache here (no cache.json)") from None
    except (OSError, ValueError) as exc:
        raise ClipposterError(f"{path}: unreadable cache description ({exc})") from None


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("out", f"{out} exists and is not an empty folder; name a new folder")


def _check_shard_rows(shard_rows: int) -> None:
    if shard_rows < 1:
        raise ConfigError("shard_rows", f"must be at least 1, got {shard_rows}")


def _write_shards(root: Path, src, shard_rows: int, replaced: Sequence[str] = ()) -> list[sf.ShardEntry]:
    """Write the content of `src` (either cache format) into new shards of `root`, each content hash and
    text once (its first row) and each record once, and list them (in place of `replaced`)."""
    dtype = np.dtype(DTYPES[src.dtype])
    hashes = src.poster_hashes()
    seen: set[str] = set()
    rows = np.asarray([n for n, h in enumerate(hashes) if not (h in seen or seen.add(h))], np.int64)
    kept = [hashes[n] for n in rows]
    tokens = getattr(src, "token_shape", None)
    if tokens is None and getattr(src, "has_some_tokens", False):
        raise ClipposterError(f"some shards of {src.root} store token sequences and others do not (or of another "
                              f"shape); rewriting them as one would drop tokens, so they are left as they are")
    text_items = src.text_items()
    seen = set()
    text_rows = np.asarray([n for n, (h, _) in enumerate(text_items) if not (h in seen or seen.add(h))], np.int64)
    text_matrix = src.text_matrix()
    records = src.records_with_hashes()
    chunk_of = {h: n // shard_rows for n, h in enumerate(kept)}
    chunks = max(-(-len(kept) // shard_rows), -(-len(text_rows) // shard_rows), 1)
    by_chunk: list[list[tuple]] = [[] for _ in range(chunks)]
    for r, h in records:
        by_chunk[chunk_of.get(h, 0)].append((r.id, h, r.image, list(r.genres), r.tagline, r.overview, r.split,
                                            r.title, r.url))
    entries = []
    with contextlib.ExitStack() as stack:
        for c in range(chunks):
            tmp = stack.enter_context(sf.new_shard(root))
            prow = rows[c * shard_rows:(c + 1) * shard_rows]
            trow = text_rows[c * shard_rows:(c + 1) * shard_rows]
            entries.append(sf.write_shard(
                root, tmp, src.dim, dtype, poster_hashes=kept[c * shard_rows:(c + 1) * shard_rows],
                images=np.ascontiguousarray(src.embeddings_for_rows(prow, dtype=dtype)) if len(prow) else None,
                tokens=_tokens(src, prow, tokens, dtype), records=by_chunk[c],
                text_hashes=[text_items[n][0] for n in trow], texts=[text_items[n][1] for n in trow],
                text_emb=np.ascontiguousarray(text_matrix[trow]) if len(trow) else None))
        sf.commit(root, entries, replaced)
    for e in entries:
        sf.finish_shard(root, e.name)
    return entries


def _tokens(src, rows: np.ndarray, shape, dtype) -> np.ndarray | None:
    if shape is None:
        return None
    out = src.tokens_for_rows(rows) if len(rows) else np.zeros((0, *shape), dtype)
    return np.ascontiguousarray(out, dtype)


def _summary(cache: ShardedCache, **extra) -> dict:
    return {"cache": str(cache.root), "format_version": sf.FORMAT_VERSION, "shards": len(cache.shard_names),
            "posters": cache.num_posters, "records": cache.num_records, "texts": cache.num_texts, **extra}


# ----- migrate -----------------------------------------------------------------------------------------
def migrate(root: str | os.PathLike, out: str | os.PathLike | None = None, *, shard_rows: int = SHARD_ROWS) -> dict:
    """Convert the v1 cache in `root` to a sharded one: in place, or into the new folder `out`."""
    root = Path(root)
    _check_shard_rows(shard_rows)
    meta = _read_meta(root)
    if sf.is_sharded(meta):
        if out is not None:
            raise ClipposterError(f"{root} is already a sharded cache (format {sf.FORMAT_VERSION}); "
                                  f"use `clipposter cache merge` or copy the folder")
        stray = _remove_v1_files(root)
        with ShardedCache.open(root, mode="r") as cache:
            return _summary(cache, migrated=False, removed_v1_files=stray)
    if out is not None:
        out = Path(out)
        _check_out(out)
        with EmbeddingCache.open(root, mode="r") as v1:
            def build(tmp: Path) -> None:
                create_meta(tmp, v1.identity, v1.dtype, v1.backbone_spec)
                _write_shards(tmp, v1, shard_rows)
            replace_dir(build, out)
        with ShardedCache.open(out, mode="r") as cache:
            return _summary(cache, migrated=True, source=str(root))
    try:
        lock = directory_lock(root)  # the v1 writers' lock: none adds rows while the shards are written
        lock.__enter__()
    except OSError as exc:
        raise ClipposterError(f"cannot write into {root} ({exc.strerror or exc}): migrating in place needs a "
                              f"writable folder; name a new one with `out`") from None
    try:
        with EmbeddingCache.open(root, mode="r") as v1:
            _remove_shards_folder(root)  # a killed migration's; cache.json still says v1, so nobody's
            _write_shards(root, v1, shard_rows)
            create_meta(root, v1.identity, v1.dtype, v1.backbone_spec)  # the switch
        _remove_v1_files(root)
    finally:
        lock.__exit__(None, None, None)
    with ShardedCache.open(root, mode="r") as cache:
        return _summary(cache, migrated=True, source=str(root))


def _remove_shards_folder(root: Path) -> None:
    shutil.rmtree(root / sf.SHARDS, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (root / sf.INDEX).unlink()


def _remove_v1_files(root: Path) -> list[str]:
    removed = []
    for name in _V1_FILES:
        with contextlib.suppress(FileNotFoundError):
            (root / name).unlink()
            removed.append(name)
    return removed


# ----- merge -------------------------------------------------------------------------------------------
def merge(sources: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict:
    """A new sharded cache in `out` holding every shard of `sources` (sharded caches of one backbone and
    dtype), in order: a content hash keeps the row of the first cache holding it, a poster id the record
    of the last."""
    if len(sources) < 2:
        raise ConfigError("sources", f"needs at least two caches to merge, got {len(sources)}")
    out = Path(out)
    _check_out(out)
    caches = []
    for src in map(Path, sources):
        meta = _read_meta(src)
        if not sf.is_sharded(meta):
            raise ClipposterError(f"{src} is a cache of format {meta.get('format_version')}; convert it first with "
                                  f"`clipposter cache migrate --cache {src}`")
        caches.append(ShardedCache.open(src, mode="r"))
    first = caches[0]
    for cache in caches[1:]:
        first.identity.check_same(cache.identity, f"the cache {cache.root}")
        if cache.dtype != first.dtype:
            raise ClipposterError(f"the cache {cache.root} stores {cache.dtype} and {first.root} {first.dtype}; "
                                  f"merge caches of one dtype")

    def build(tmp: Path) -> None:
        create_meta(tmp, first.identity, first.dtype, first.backbone_spec)
        for cache in caches:
            entries = cache.shard_entries
            try:
                sf.copy_shards(cache.root, entries, tmp)
            except sf.ShardMissing:
                raise ClipposterError(f"the cache {cache.root} was compacted while it was being merged; run the "
                                      f"merge again") from None
    replace_dir(build, out)
    with ShardedCache.open(out, mode="r") as merged:
        return _summary(merged, sources=[str(c.root) for c in caches])


# ----- compact -----------------------------------------------------------------------------------------
def compact(root: str | os.PathLike, *, shard_rows: int = SHARD_ROWS) -> dict:
    """Rewrite the shards of the sharded cache in `root` as few (`shard_rows` rows each)."""
    _check_shard_rows(shard_rows)
    root = Path(root)
    cache = ShardedCache.open(root, mode="a")  # removes what killed writers left
    before = cache.shard_names
    if len(before) > 1:
        _write_shards(root, cache, shard_rows, replaced=before)
        sf.remove_shards(root, before)
    with ShardedCache.open(root, mode="r") as after:
        return _summary(after, shards_before=len(before))
