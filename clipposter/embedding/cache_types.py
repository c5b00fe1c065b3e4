"""What both cache formats share: the stored dtypes, the text key, the cache description (cache.json),
the text-embedding lookup, and the summaries a cache returns. Light (numpy only), so the v1 store
(cache_v1.py), the sharded v2 store (shards.py) and the opener (cache.py) use one copy."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from clipposter.embedding.identity import BackboneIdentity
from clipposter.errors import ClipposterError, ConfigError
from clipposter.files import write_json

DTYPES = {"float16": np.float16, "float32": np.float32}
MODES = ("r", "a")
META = "cache.json"


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheMeta:
    """A cache's description, cache.json: its format, the backbone of its embeddings and how they are stored."""

    format_version: object
    identity: BackboneIdentity
    dtype: str
    backbone_spec: dict | None
    tokens: bool | None = None  # whether its posters store token sequences; None: not recorded (older caches)


def read_meta(root: Path) -> CacheMeta | None:
    """The description in `root`'s cache.json (None when there is none), checked: a file that is not
    JSON, lacks the backbone or names an unknown dtype is one line. The format is the caller's to check."""
    path = root / META
    try:
        meta = json.loads(path.read_text())
        stored = BackboneIdentity.from_dict(meta["backbone"])
        dtype = meta["dtype"]
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClipposterError(f"{path}: unreadable cache description ({exc}); point `cache` at a clipposter "
                              f"cache directory") from None
    tokens = meta.get("tokens")
    return CacheMeta(meta.get("format_version"), stored, dtype, meta.get("backbone_spec"),
                     tokens if isinstance(tokens, bool) else None)


def record_meta(root: Path, key: str, value) -> object:
    """Set `key` of `root`'s cache.json to `value` unless it holds one already; returns the value it
    holds afterwards. The file is replaced atomically; the caller holds the cache's index lock."""
    path = root / META
    meta = json.loads(path.read_text())
    if meta.get(key) is None:
        meta[key] = value
        try:
            write_json(path, meta)
        except OSError as exc:
            raise ClipposterError(f"cannot write {path}: {exc.strerror or exc} (it is as it was)") from None
    return meta[key]


def write_meta(root: Path, format_version: int, identity: BackboneIdentity, dtype: str,
               backbone_spec: dict | None) -> None:
    """Write a new cache's description (cache.json): the cache exists from here on, empty."""
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
    root.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": format_version, "backbone": identity.to_dict(), "dtype": dtype,
            "backbone_spec": backbone_spec}
    try:
        write_json(root / META, meta)
    except OSError as exc:
        raise ClipposterError(f"cannot write {root / META}: {exc.strerror or exc} (nothing was created)") from None


def cached_text_embeddings(cache, texts: Sequence[str], backbone, batch_size: int, *, step_rows: int,
                           rows_of: Callable[[Sequence[str]], dict], store: Callable, read: Callable) -> np.ndarray:
    """Embeddings of `texts` from `cache` (either format), float32 (len(texts), D). Texts it lacks are
    encoded with `backbone` (which must match the cache), `step_rows` at a time, and stored with
    `store(hashes, texts, rows in the stored dtype)`; a read-only cache returns them unstored, rounded to
    the stored dtype as if stored and read back. `rows_of(hashes)` gives the stored rows of those text
    hashes it holds, `read(rows)` their embeddings as float32."""
    keys = [text_hash(t) for t in texts]
    if not keys:
        return np.zeros((0, cache.dim), np.float32)
    rows = rows_of(keys)
    missing = sorted({k: t for k, t in zip(keys, texts) if k not in rows}.items())
    fresh: dict[str, np.ndarray] = {}  # encoded now and not stored (a read-only cache)
    if missing:
        if backbone is None:
            raise ClipposterError(f"{len(missing)} texts are not in the cache {cache.root}; "
                                  f"pass a backbone to encode them")
        cache.identity.check_same(backbone.identity, f"the cache {cache.root}")
        for s in range(0, len(missing), step_rows):
            step = missing[s:s + step_rows]
            new = np.asarray(np.asarray(backbone.encode_texts([t for _, t in step], batch_size=batch_size)),
                             DTYPES[cache.dtype])
            if cache.writable:
                store([k for k, _ in step], [t for _, t in step], new)
            else:
                fresh.update((k, v) for (k, _), v in zip(step, new))
        rows = rows_of(keys)
    out = np.empty((len(keys), cache.dim), np.float32)
    stored = [n for n, k in enumerate(keys) if k in rows]
    if stored:
        out[stored] = read(np.asarray([rows[keys[n]] for n in stored], np.int64))
    for n, k in enumerate(keys):
        if k not in rows:
            out[n] = fresh[k]
    return out


@dataclass
class CacheInfo:
    path: str
    backbone: dict
    dtype: str
    dim: int
    posters: int
    records: int
    texts: int
    splits: dict
    bytes_on_disk: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class RecordSummary(NamedTuple):
    """What a search result shows of a poster record: its labelled genres, title and image path."""

    genres: list[str]
    title: str | None
    image: str | None
