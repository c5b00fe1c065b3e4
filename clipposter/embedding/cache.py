"""The embedding cache: every poster and text is encoded once per backbone, and every head reads from here.

`EmbeddingCache.open` is the one way in: it creates sharded caches (format 2, shards.py) and opens
both formats, reading the format from the cache's description (cache.json, cache_types.read_meta). A
cache of format 1 (cache_v1.py) opens read-only: writing into it means `cache migrate`.
`EmbeddingCache.open_v1` still creates and writes format 1, to build v1 caches for migration and its
checks.
"""
from __future__ import annotations

import os
from pathlib import Path

from clipposter.embedding.cache_types import (DTYPES, META, MODES, CacheInfo, CacheMeta, RecordSummary, read_meta,
                                              text_hash)
from clipposter.embedding.cache_v1 import FILES as V1_FILES, FORMAT_VERSION as V1_VERSION, V1Cache
from clipposter.embedding.cache_v1 import create_meta as create_v1_meta
from clipposter.embedding.identity import BackboneIdentity
from clipposter.embedding.shard_files import INDEX as SHARD_INDEX, SHARDS as SHARD_FOLDER
from clipposter.embedding.shards import FORMAT_VERSION as SHARDED_VERSION, ShardedCache, create_meta
from clipposter.errors import ClipposterError, ConfigError

# What callers import from here besides EmbeddingCache: the summaries a cache returns and the text key.
__all__ = ["EmbeddingCache", "CacheInfo", "RecordSummary", "text_hash"]


def _check_options(dtype: str, mode: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
    if mode not in MODES:
        raise ConfigError("mode", f"must be one of {list(MODES)}, got {mode!r}")


def _stored_meta(root: Path, identity: BackboneIdentity | None, formats: tuple, remedy: str) -> CacheMeta | None:
    """The description of the cache in `root` (None without cache.json), refused in one line when its
    format is not one of `formats` or its backbone is not `identity`."""
    meta = read_meta(root)
    if meta is None:
        return None
    if meta.format_version not in formats:
        raise ClipposterError(f"{root / META}: cache format {meta.format_version} is not "
                              f"{' or '.join(map(str, formats))}{remedy}")
    if identity is not None:
        identity.check_same(meta.identity, f"the cache {root}")
    return meta


class EmbeddingCache:
    """The way into an embedding cache: `EmbeddingCache.open(dir, identity)` to create or check one,
    `EmbeddingCache.open(dir)` to use a cache whose backbone is recorded in it, and
    `EmbeddingCache.open(dir, mode="r")` to read one without writing anything. What opens is a
    ShardedCache (format 2) or a read-only V1Cache (format 1): the same reading methods."""

    @classmethod
    def open(cls, root: str | os.PathLike, identity: BackboneIdentity | None = None,
             dtype: str = "float16", backbone_spec: dict | None = None, *,
             mode: str = "a") -> "ShardedCache | V1Cache":
        """Open (with `mode="a"` and an identity: create) the cache in `root`. New caches are sharded
        (format 2, see shards.py) and open as a ShardedCache. A cache of format 1 (cache_v1.py) opens
        read-only whatever `mode`: adding to it is refused with the command that migrates it.

        mode: "a" to add posters and texts, "r" to read only (writes nothing; texts it lacks are encoded
        but not stored)."""
        root = Path(root)
        _check_options(dtype, mode)
        meta = _stored_meta(root, identity, (V1_VERSION, SHARDED_VERSION),
                            "; re-embed into a new `cache` directory")
        if meta is not None:
            if meta.format_version == SHARDED_VERSION:
                return ShardedCache(root, meta.identity, meta.dtype, meta.backbone_spec, mode=mode)
            return V1Cache(root, meta.identity, meta.dtype, meta.backbone_spec, mode="r", migrate_to_write=True)
        present = [name for name in (*V1_FILES, SHARD_INDEX, SHARD_FOLDER) if (root / name).exists()]
        if present:  # the backbone of these embeddings is unknown: never let another one adopt them
            raise ClipposterError(f"{root}: holds cache files ({', '.join(present)}) but no cache.json, so the "
                                  f"backbone they were made with is unknown; restore cache.json or embed into a "
                                  f"new `cache` directory")
        if identity is None or mode == "r":
            raise ClipposterError(f"{root}: no clipposter cache here (no cache.json); "
                                  f"create one with `clipposter embed SOURCE --cache {root}`")
        create_meta(root, identity, dtype, backbone_spec)
        return ShardedCache(root, identity, dtype, backbone_spec, mode=mode)

    @classmethod
    def open_v1(cls, root: str | os.PathLike, identity: BackboneIdentity | None = None, dtype: str = "float16",
                backbone_spec: dict | None = None, *, mode: str = "a") -> V1Cache:
        """Open (with an identity: create) a cache of format 1 for writing or reading. New caches are
        sharded; this writer is kept to build v1 caches for `cache migrate` and for checking that v1
        caches stay readable."""
        root = Path(root)
        _check_options(dtype, mode)
        meta = _stored_meta(root, identity, (V1_VERSION,), "")
        if meta is not None:
            return V1Cache(root, meta.identity, meta.dtype, meta.backbone_spec, mode=mode)
        if identity is None or mode == "r":
            raise ClipposterError(f"{root}: no clipposter cache here (no cache.json)")
        create_v1_meta(root, identity, dtype, backbone_spec)
        return V1Cache(root, identity, dtype, backbone_spec, mode=mode)

    @staticmethod
    def exists(root: str | os.PathLike) -> bool:
        """Whether `root` holds a cache (its description, cache.json), without opening it."""
        return (Path(root) / META).is_file()
