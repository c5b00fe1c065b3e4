"""The sharded cache (format 2): the same reading and adding API as the v1 cache, over write-once shards.

Opening reads the shard index once and maps every listed shard (see shard_files.py for the files):
the poster and text tables of all shards become two in-memory maps and the record tables one Arrow
table in id order (shard_rows.ShardRecords, indexed at the first lookup of a record), so a lookup by
poster id, split or content hash touches no file, and an embedding is one read of a memory-mapped row.
What a reader sees is the set of shards listed when it opened (a snapshot); a writer sees its own
additions at once.

Rows are numbered across shards in index order: shard 0's rows first, then shard 1's. A content hash
in two shards (two writers that embedded the same poster at once) keeps its first row; a poster id in
two shards keeps its last record, as an upsert would. Every add writes one new shard: `embed` buffers
its batches and adds them a few thousand at a time, the Ray engine adds one shard per block, and
`clipposter cache compact` rewrites many shards as few.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from clipposter.embedding import shard_files as sf
from clipposter.embedding.cache_types import (DTYPES, MODES, CacheInfo, RecordSummary, cached_text_embeddings,
                                              read_meta, record_meta, text_hash, write_meta)
from clipposter.embedding.identity import BackboneIdentity
from clipposter.embedding.shard_rows import ShardedRows, ShardRecords, gather
from clipposter.errors import ClipposterError, ConfigError
from clipposter.records import PosterRecord

FORMAT_VERSION = sf.FORMAT_VERSION
# Texts encoded for a read-only cache are not stored; a writable one stores them in shards of this many.
TEXT_ROWS = 4096
_OPEN_TRIES = 5


def create_meta(root: Path, identity: BackboneIdentity, dtype: str, backbone_spec: dict | None) -> None:
    """Write a new sharded cache's description (cache.json): the cache exists from here on, empty."""
    write_meta(root, FORMAT_VERSION, identity, dtype, backbone_spec)


class ShardedCache:
    """Image and text embeddings of one backbone in write-once shards, keyed by content, with records.

    Open through `EmbeddingCache.open` (which picks the format from cache.json) or directly with
    `ShardedCache(root, identity, dtype, backbone_spec, mode=...)` on a folder whose cache.json exists.
    """

    format_version = FORMAT_VERSION

    def __init__(self, root: str | os.PathLike, identity: BackboneIdentity, dtype: str,
                 backbone_spec: dict | None = None, mode: str = "a"):
        if mode not in MODES:
            raise ConfigError("mode", f"must be one of {list(MODES)}, got {mode!r}")
        self.root = Path(root)
        self.identity, self.dtype, self.backbone_spec, self.mode = identity, dtype, backbone_spec, mode
        self.dim = identity.embed_dim
        self._np_dtype = np.dtype(DTYPES[dtype])
        meta = read_meta(self.root)
        self._token_choice = meta.tokens if meta is not None else None
        if self.writable:
            sf.remove_unlisted(self.root)  # what a killed writer left (a live writer's shard is kept)
        self._load()

    @classmethod
    def open(cls, root: str | os.PathLike, *, mode: str = "a") -> "ShardedCache":
        """Open the sharded cache in `root` with the backbone its cache.json records."""
        root = Path(root)
        meta = read_meta(root)
        if meta is None:
            raise ClipposterError(f"{root}: no clipposter cache here (no cache.json)")
        if meta.format_version != FORMAT_VERSION:
            raise ClipposterError(f"{root}: cache format {meta.format_version} is not sharded; convert it "
                                  f"with `clipposter cache migrate --cache {root}`")
        return cls(root, meta.identity, meta.dtype, meta.backbone_spec, mode=mode)

    @property
    def writable(self) -> bool:
        return self.mode != "r"

    def close(self) -> None:
        self._shards = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----- loading -------------------------------------------------------------------------------
    def _load(self) -> None:
        """Read the index and every shard it lists; a shard removed by a compaction that committed in
        between means reading the new index."""
        for _ in range(_OPEN_TRIES):
            try:
                entries = sf.read_index(self.root)
                shards = [sf.load_shard(self.root, e, self.dim, self._np_dtype) for e in entries]
                break
            except sf.ShardMissing as exc:
                missing = str(exc)
        else:
            raise ClipposterError(f"shard {missing} listed in {self.root / sf.INDEX} is missing; restore it from "
                                  f"where the cache came from")
        self._shards: list[sf.ShardData] = []
        self._poster_row: dict[str, int] = {}
        self._text_row: dict[str, int] = {}
        # every shard's records by poster id, built on first use (`_records`)
        self._record_index: ShardRecords | None = None
        self._poster_starts: list[int] = []
        self._text_starts: list[int] = []
        self._rows = self._texts = 0
        self._matrix: np.ndarray | None = None
        for shard in shards:
            self._add_shard(shard)

    def _add_shard(self, shard: sf.ShardData) -> None:
        self._shards.append(shard)
        self._poster_starts.append(self._rows)
        self._text_starts.append(self._texts)
        self._take_rows(self._poster_row, shard.poster_hashes, self._rows)
        self._take_rows(self._text_row, shard.text_hashes, self._texts)
        self._record_index = None  # its records and its posters change what the records say
        self._rows += shard.entry.posters
        self._texts += shard.entry.texts
        self._matrix = None

    @staticmethod
    def _take_rows(rows: dict[str, int], hashes: list[str], start: int) -> None:
        """Number `hashes` from `start` into `rows`; a hash already there, or earlier in `hashes`, keeps
        its first row."""
        new = dict(zip(reversed(hashes), range(start + len(hashes) - 1, start - 1, -1)))
        for h in new.keys() & rows.keys():
            del new[h]
        rows.update(new)

    @property
    def _records(self) -> ShardRecords:
        """The records of every shard by poster id, a later shard's record of an id replacing an earlier
        one's; indexed the first time a record is asked for, so opening a cache to look up hashes or rows
        does not pay for it."""
        if self._record_index is None:
            self._record_index = ShardRecords([s.record_table for s in self._shards], self._poster_row)
        return self._record_index

    def _append(self, **content) -> None:
        """Write and list one shard, then take it (and any listed since by other writers) in."""
        sf.append_shard(self.root, self.dim, self._np_dtype, **content)
        entries = sf.read_index(self.root)
        names = [s.entry.name for s in self._shards]
        if [e.name for e in entries[:len(names)]] != names:  # compacted meanwhile
            self._load()
            return
        for entry in entries[len(names):]:
            try:
                self._add_shard(sf.load_shard(self.root, entry, self.dim, self._np_dtype))
            except sf.ShardMissing:
                self._load()
                return

    def require_writable(self, what: str) -> None:
        if not self.writable:
            raise ClipposterError(f"the cache {self.root} is open read-only; open it with `mode` \"a\" to {what}")

    @property
    def shard_names(self) -> list[str]:
        return [s.entry.name for s in self._shards]

    @property
    def shard_entries(self) -> list[sf.ShardEntry]:
        """The index entries of the shards this cache read, in order."""
        return [s.entry for s in self._shards]

    # ----- counts --------------------------------------------------------------------------------
    @property
    def num_posters(self) -> int:
        return len(self._poster_row)

    @property
    def num_texts(self) -> int:
        return len(self._text_row)

    @property
    def num_records(self) -> int:
        return len(self._records)

    @staticmethod
    def exists(root: str | os.PathLike) -> bool:
        return (Path(root) / "cache.json").is_file()

    # ----- posters -------------------------------------------------------------------------------
    def known_hashes(self, hashes: Iterable[str]) -> set[str]:
        return {h for h in hashes if h in self._poster_row}

    def add_posters(self, hashes: Sequence[str], embeddings: np.ndarray,
                    records: Sequence[tuple[PosterRecord, str]] = (), tokens: np.ndarray | None = None) -> int:
        """Write one shard of the posters whose content hash is new (each once) and of `records`.
        `tokens`: optional (len(hashes), T, W) token sequences, kept for the new posters. Returns rows added."""
        if len(hashes) != len(embeddings) or (tokens is not None and len(tokens) != len(hashes)):
            raise ValueError("one embedding (and token sequence) per hash")
        self.require_writable("add posters")
        seen: set[str] = set()
        keep = [i for i, h in enumerate(hashes) if h not in self._poster_row and not (h in seen or seen.add(h))]
        if not keep and not records:
            return 0
        emb = np.asarray(embeddings)
        self._append(poster_hashes=[hashes[i] for i in keep],
                     images=np.ascontiguousarray(emb[keep] if keep else np.zeros((0, self.dim)), self._np_dtype),
                     tokens=None if tokens is None else np.ascontiguousarray(np.asarray(tokens)[keep],
                                                                             self._np_dtype),
                     records=self._record_rows(records))
        return len(keep)

    def upsert_records(self, records: Sequence[tuple[PosterRecord, str]]) -> None:
        """Store or refresh the metadata of posters (a shard of records only)."""
        self.require_writable("store records")
        if records:
            self._append(records=self._record_rows(records))

    @staticmethod
    def _record_rows(records: Sequence[tuple[PosterRecord, str]]) -> list[tuple]:
        latest = {r.id: (r.id, h, r.image, list(r.genres), r.tagline, r.overview, r.split, r.title, r.url)
                  for r, h in records}
        return list(latest.values())

    def records(self, split: str | None = None) -> list[PosterRecord]:
        """Records, in id order, optionally of one split."""
        return self._records.records(split)

    def records_with_hashes(self) -> list[tuple[PosterRecord, str]]:
        """Every record with its poster's content hash, in id order."""
        return self._records.records(with_hashes=True)

    def image_matrix(self) -> "np.ndarray | ShardedRows":
        """Every stored poster row, (rows, D), in the stored dtype: the shard's memory map when there is
        one shard, else a view over their maps that reads only the rows it is asked for (shard_rows.py)."""
        if self._matrix is None:
            parts = [s.images for s in self._shards if len(s.images)]
            if not parts:
                self._matrix = np.zeros((0, self.dim), self._np_dtype)
            else:
                self._matrix = parts[0] if len(parts) == 1 else ShardedRows(parts, self.dim, self._np_dtype)
        return self._matrix

    def iter_embeddings(self, chunk_rows: int = 65_536, start: int = 0,
                        stop: int | None = None):
        """(first row, rows in the stored dtype) for rows start..stop, `chunk_rows` at a time. Each chunk is
        copied out of maps released before the next, so a scan keeps one chunk resident, not the shards."""
        stop = self._rows if stop is None else stop
        starts = self._poster_starts + [self._rows]
        for s in range(start, stop, max(1, int(chunk_rows))):
            end = min(stop, s + int(chunk_rows))
            pieces = []
            for n, shard in enumerate(self._shards):
                lo, hi = max(s, starts[n]), min(end, starts[n + 1])
                if lo < hi:
                    pieces.append(sf.read_rows(self.root, shard.entry, lo - starts[n], hi - starts[n],
                                               shard.images))
            yield s, (pieces[0] if len(pieces) == 1 else
                      np.concatenate(pieces) if pieces else np.zeros((0, self.dim), self._np_dtype))

    def poster_hashes(self) -> list[str]:
        """The content hash of every stored row, in row order (a hash stored twice: its later row too)."""
        return [h for s in self._shards for h in s.poster_hashes]

    # ----- lookups -------------------------------------------------------------------------------
    def row_for_hash(self, content_hash: str) -> int | None:
        return self._poster_row.get(content_hash)

    def rows_for_hashes(self, hashes: Iterable[str]) -> dict[str, int]:
        return {h: self._poster_row[h] for h in hashes if h in self._poster_row}

    def id_rows(self, ids: Sequence[str] | None = None, *, below: int | None = None) -> dict[str, int]:
        """Row of each poster id whose poster is stored, in id order (of `ids`, or of every record),
        optionally only rows under `below`."""
        records = self._records
        if ids is None:
            order, rows = records.ids, records.poster_rows()
        else:
            order = sorted(set(ids))
            rows = records.poster_rows(records.index_of(order))
        keep = (rows >= 0) if below is None else (rows >= 0) & (rows < below)
        return dict(zip(itertools.compress(order, keep.tolist()), rows[keep].tolist()))

    def record_summaries(self, ids: Sequence[str]) -> dict[str, RecordSummary]:
        ids = list(dict.fromkeys(ids))
        at = self._records.index_of(ids)
        known = np.flatnonzero(at >= 0)
        cols = [self._records.column(c, at[known]) for c in ("genres", "title", "image")]
        return {ids[n]: RecordSummary(list(g), t, im) for n, g, t, im in zip(known.tolist(), *cols)}

    def labelled_genres(self) -> dict[str, list[str]]:
        return dict(zip(self._records.ids, map(list, self._records.column("genres"))))

    def rows_for_ids(self, ids: Sequence[str]) -> np.ndarray:
        """Rows of the given poster ids; an unknown id is a clear error."""
        rows = self._records.poster_rows(self._records.index_of(ids))
        if len(rows) and rows.min() < 0:
            missing = [pid for pid, row in zip(ids, rows.tolist()) if row < 0]
            raise ClipposterError(f"poster id {missing[0]!r} is not in the cache {self.root} "
                                  f"({len(missing)} missing); embed it first")
        return rows

    def embeddings_for_rows(self, rows: Sequence[int], dtype=np.float32) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self._rows):
            raise IndexError(f"row out of range for a cache of {self._rows} rows")
        return gather([s.images for s in self._shards], np.asarray(self._poster_starts), rows, (self.dim,), dtype)

    def embeddings_for_ids(self, ids: Sequence[str], dtype=np.float32) -> np.ndarray:
        return self.embeddings_for_rows(self.rows_for_ids(ids), dtype)

    def embedding_for_hash(self, content_hash: str) -> np.ndarray | None:
        row = self.row_for_hash(content_hash)
        return None if row is None else self.embeddings_for_rows([row])[0]

    # ----- tokens --------------------------------------------------------------------------------
    @property
    def token_shape(self) -> tuple[int, int] | None:
        """(T, W) when every shard holding posters stores their token sequences, else None."""
        shapes = {s.entry.tokens for s in self._shards if s.entry.posters}
        return shapes.pop() if len(shapes) == 1 and None not in shapes else None

    @property
    def has_some_tokens(self) -> bool:
        return any(s.entry.tokens for s in self._shards)

    @property
    def stores_tokens(self) -> bool | None:
        """Whether this cache stores a token sequence for each poster, as its cache.json records (the
        first run that encodes a poster records it); None where nothing is recorded yet."""
        return self._token_choice

    def record_tokens(self, tokens: bool) -> None:
        """Record in cache.json, once, whether this cache stores token sequences, so that a run killed
        before its first shard leaves the choice for the next one. Another choice already recorded is
        refused."""
        self.require_writable("record its token choice")
        if self._token_choice is None:
            with sf.index_lock(self.root):
                self._token_choice = bool(record_meta(self.root, "tokens", bool(tokens)))
        if self._token_choice != bool(tokens):
            raise ConfigError("tokens", f"is {'set' if tokens else 'off'}, but the cache {self.root} records that "
                                        f"its posters are stored {'with' if self._token_choice else 'without'} "
                                        f"token sequences; embed into a new cache")

    def tokens_for_ids(self, ids: Sequence[str]) -> np.ndarray:
        """Token sequences of the given poster ids, (len(ids), T, W), in the stored dtype."""
        return self.tokens_for_rows(self.rows_for_ids(ids))

    def tokens_for_rows(self, rows: Sequence[int]) -> np.ndarray:
        """Token sequences of the given rows, (len(rows), T, W), in the stored dtype."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        shape = self.token_shape
        if shape is None:
            raise ClipposterError(f"the cache {self.root} does not store token sequences for all its posters; "
                                  f"embed them with tokens into a new cache")
        return gather([s.tokens for s in self._shards], np.asarray(self._poster_starts), rows, shape,
                       self._np_dtype)

    # ----- texts ---------------------------------------------------------------------------------
    def text_embeddings(self, texts: Sequence[str], backbone=None, batch_size: int = 256) -> np.ndarray:
        """Embeddings of texts; missing ones are encoded with `backbone` (which must match the cache) and
        stored in shards of TEXT_ROWS (a read-only cache returns them unstored). float32 (len(texts), D)."""
        return cached_text_embeddings(self, texts, backbone, batch_size, step_rows=TEXT_ROWS,
                                      rows_of=self._stored_text_rows, store=self._store_texts,
                                      read=self._read_text_rows)

    def _stored_text_rows(self, keys: Sequence[str]) -> dict[str, int]:
        return {k: self._text_row[k] for k in keys if k in self._text_row}

    def _store_texts(self, keys: Sequence[str], texts: Sequence[str], emb: np.ndarray) -> None:
        todo = [n for n, k in enumerate(keys) if k not in self._text_row]
        if todo:
            self._append(text_hashes=[keys[n] for n in todo], texts=[texts[n] for n in todo],
                         text_emb=np.ascontiguousarray(emb[todo]))

    def _read_text_rows(self, rows: np.ndarray) -> np.ndarray:
        return gather([s.texts for s in self._shards], np.asarray(self._text_starts), rows, (self.dim,), np.float32)

    def missing_texts(self, texts: Iterable[str]) -> list[str]:
        uniq = list(dict.fromkeys(texts))
        return [t for t in uniq if text_hash(t) not in self._text_row]

    def text_items(self) -> list[tuple[str, str]]:
        """(hash, text) of every stored text row, in row order."""
        return [(h, t) for s in self._shards for h, t in zip(s.text_hashes, s.text_values)]

    def text_matrix(self) -> np.ndarray:
        """Every stored text row, (rows, D), in the stored dtype."""
        parts = [s.texts for s in self._shards]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), self._np_dtype)

    # ----- summary -------------------------------------------------------------------------------
    def info(self) -> CacheInfo:
        splits = self._records.split_counts()
        return CacheInfo(path=str(self.root), backbone=self.identity.to_dict(), dtype=self.dtype, dim=self.dim,
                         posters=self.num_posters, records=self.num_records, texts=self.num_texts,
                         splits=splits, bytes_on_disk=sf.shard_bytes(self.root))
