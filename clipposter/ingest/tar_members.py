"""Posters stored inside local tar shards, named by a path of the form `SHARD.tar#MEMBER`.

A WebDataset shard is an uncompressed tar, so one member can be read with a seek and a read once the
member's offset is known. `member_location` tells whether a path names such a member (a real file of
that name always wins), and `read_member` returns its bytes within a byte limit. The offsets of a
shard come from one pass over its headers (tarfile seeks past the data), kept for the few shards read
last, so reading every poster of a shard costs one header pass and one read per poster.

clipposter.ingest.images reads these paths like files, so every stage that opens a poster by its
record's path (embed, the report's thumbnails, the app) reads posters inside shards unchanged.
"""
from __future__ import annotations

import functools
import os
import re
import tarfile
import threading

from clipposter.errors import PosterError

_MEMBER_PATH = re.compile(r"^(?P<shard>.+?\.tar)#(?P<member>[^#].*)$", re.DOTALL)

# Shards whose member offsets are kept in memory (a few MB each for 10,000-member shards).
_INDEXED_SHARDS = 16
_index_lock = threading.Lock()


def member_path(shard: str | os.PathLike, member: str) -> str:
    """The path of `member` inside the tar file `shard`: SHARD#MEMBER, with SHARD made absolute."""
    return f"{os.path.abspath(os.fspath(shard))}#{member}"


def member_location(path: str | os.PathLike) -> tuple[str, str] | None:
    """(shard, member) when `path` has the form SHARD.tar#MEMBER and names no file of its own, else None."""
    text = os.fspath(path)
    if not isinstance(text, str) or ".tar#" not in text:
        return None
    match = _MEMBER_PATH.match(text)
    if match is None or os.path.lexists(text):
        return None
    return match.group("shard"), match.group("member")


def member_size(path: str | os.PathLike, label: str | None = None) -> int:
    """The size in bytes of the member that `path` (SHARD.tar#MEMBER) names; PosterError when the shard
    cannot be read or holds no such member."""
    shard, member = _require_location(path)
    return _entry(shard, member, label or os.fspath(path))[1]


def read_member(path: str | os.PathLike, label: str | None = None) -> bytes:
    """The bytes of the member that `path` names (check `member_size` against a limit first)."""
    shard, member = _require_location(path)
    label = label or os.fspath(path)
    offset, size = _entry(shard, member, label)
    try:
        with open(shard, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
    except OSError as exc:
        raise PosterError(label, f"cannot read file: {exc.strerror or exc}") from exc
    if len(data) != size:
        raise PosterError(label, f"shard {shard} is truncated: member {member} is cut short")
    return data


def _require_location(path: str | os.PathLike) -> tuple[str, str]:
    location = member_location(path)
    if location is None:
        raise PosterError(os.fspath(path), "not a SHARD.tar#MEMBER path")
    return location


def _entry(shard: str, member: str, label: str) -> tuple[int, int]:
    try:
        info = os.stat(shard)
    except OSError as exc:
        raise PosterError(label, f"cannot read file: shard {shard}: {exc.strerror or exc}") from exc
    index, problem = _index(shard, info.st_size, info.st_mtime_ns)
    entry = index.get(member)
    if entry is None:
        raise PosterError(label, problem or f"no member {member!r} in shard {shard}")
    return entry


def _index(shard: str, size: int, mtime_ns: int) -> tuple[dict[str, tuple[int, int]], str | None]:
    # The lock keeps threads that read posters of one shard from scanning its headers twice at once.
    with _index_lock:
        return _cached_index(shard, size, mtime_ns)


@functools.lru_cache(maxsize=_INDEXED_SHARDS)
def _cached_index(shard: str, size: int, mtime_ns: int) -> tuple[dict[str, tuple[int, int]], str | None]:
    """Member name → (data offset, size) of the regular files of `shard`, and why the rest of it cannot
    be read (None when all of it can): the members before a damaged header stay readable. Keyed by
    size and mtime too, so a shard rewritten in place is read again."""
    index: dict[str, tuple[int, int]] = {}
    try:
        # "r:" (not "r:*"): an uncompressed tar only, where offsets in the file are offsets in the data.
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                if info.isreg():
                    index.setdefault(info.name, (info.offset_data, info.size))
    except tarfile.ReadError as exc:
        if not index:
            return index, f"shard {shard} is not a tar file ({exc}){compressed_hint(shard)}"
        return index, f"shard {shard} is truncated or damaged after {len(index)} members: {exc}"
    except (OSError, EOFError) as exc:
        return index, f"cannot read shard {shard}: {getattr(exc, 'strerror', None) or exc}"
    return index, None


def compressed_hint(shard: str) -> str:
    """'; it is gzip-compressed: …' when `shard` starts like a gzip stream, else ''."""
    try:
        with open(shard, "rb") as fh:
            magic = fh.read(2)
    except OSError:
        return ""
    # A gzip stream: offsets in the file are not offsets in the tar, so members cannot be read one by one.
    return "; it is gzip-compressed: decompress it with gunzip" if magic == b"\x1f\x8b" else ""
