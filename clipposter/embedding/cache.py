"""The embedding cache: every poster and text is encoded once per backbone, and every head reads from here.

Layout of a cache directory:

    cache.json      format version, backbone identity, dtype, width (written once, checked on open)
    index.sqlite    posters (content hash → row), records (poster id → hash + labels and texts),
                    texts (text hash → row)
    images.npy      (N, D) L2-normalised image embeddings, a plain .npy file, memory-mapped on read
    texts.npy       (M, D) L2-normalised text embeddings (genre prompts, taglines, overviews)

Crash safety: SQLite is the source of truth. Rows are appended to the .npy body and fsynced first,
then their index rows are committed in one transaction, and finally the .npy header's row count is
rewritten. A run killed at any moment leaves at most uncommitted trailing bytes, which the next open
cuts off, so every poster ends up exactly once and no committed row is ever half-written.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from clipposter.embedding.identity import BackboneIdentity
from clipposter.errors import ClipposterError, ConfigError
from clipposter.files import directory_lock, write_json
from clipposter.records import PosterRecord

FORMAT_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
# A fixed-size .npy header so it can be rewritten in place when rows are added.
_HEADER_BYTES = 128

_SCHEMA = """
CREATE TABLE IF NOT EXISTS posters (hash TEXT PRIMARY KEY, row INTEGER UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL, image TEXT, genres TEXT NOT NULL DEFAULT '[]',
    tagline TEXT, overview TEXT, split TEXT, title TEXT, url TEXT);
CREATE INDEX IF NOT EXISTS records_hash ON records(hash);
CREATE INDEX IF NOT EXISTS records_split ON records(split);
CREATE TABLE IF NOT EXISTS texts (hash TEXT PRIMARY KEY, row INTEGER UNIQUE NOT NULL, text TEXT NOT NULL);
"""


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _npy_header(shape: tuple[int, int], dtype: np.dtype) -> bytes:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    body = repr(header).encode("latin1")
    magic = b"\x93NUMPY\x01\x00"
    pad = _HEADER_BYTES - len(magic) - 2 - len(body) - 1
    if pad < 0:
        raise ValueError("shape too large for the fixed .npy header")
    return magic + (_HEADER_BYTES - len(magic) - 2).to_bytes(2, "little") + body + b" " * pad + b"\n"


class _Matrix:
    """An append-only (N, D) .npy file whose committed length is given from outside (the index)."""

    def __init__(self, path: Path, dim: int, dtype: np.dtype):
        self.path, self.dim, self.dtype = path, dim, np.dtype(dtype)
        self.row_bytes = dim * self.dtype.itemsize
        if not path.exists():
            with open(path, "wb") as f:
                f.write(_npy_header((0, dim), self.dtype))

    def repair(self, rows: int) -> None:
        """Cut bytes past `rows` committed rows (left by a killed run) and make the header agree."""
        size = _HEADER_BYTES + rows * self.row_bytes
        actual = self.path.stat().st_size
        if actual < size:
            raise ClipposterError(f"{self.path}: holds fewer rows than its index records ({actual} bytes, "
                                  f"{rows} rows expected); the cache is damaged, embed into a new `cache` directory")
        with open(self.path, "r+b") as f:
            if actual > size:
                f.truncate(size)
            f.seek(0)
            f.write(_npy_header((rows, self.dim), self.dtype))
            f.flush()
            os.fsync(f.fileno())

    def append(self, start_row: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        if data.ndim != 2 or data.shape[1] != self.dim:
            raise ValueError(f"expected rows of width {self.dim}, got shape {data.shape}")
        with open(self.path, "r+b") as f:
            f.seek(_HEADER_BYTES + start_row * self.row_bytes)
            f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())

    def set_header(self, rows: int) -> None:
        with open(self.path, "r+b") as f:
            f.write(_npy_header((rows, self.dim), self.dtype))

    def read(self, rows: int) -> np.ndarray:
        if rows == 0:
            return np.zeros((0, self.dim), self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=_HEADER_BYTES, shape=(rows, self.dim))


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


class EmbeddingCache:
    """Image and text embeddings of one backbone, keyed by content, with poster metadata.

    Open with `EmbeddingCache.open(dir, identity)` to create or check, or `EmbeddingCache.open(dir)`
    to read a cache whose backbone is recorded in it.
    """

    def __init__(self, root: Path, identity: BackboneIdentity, dtype: str, backbone_spec: dict | None = None):
        self.root = root
        self.backbone_spec = backbone_spec  # how to load the backbone again (see Backbone.spec)
        self.identity = identity
        self.dtype = dtype
        self.dim = identity.embed_dim
        self._db = sqlite3.connect(root / "index.sqlite", isolation_level=None, check_same_thread=False)
        # Lookups may come from several threads (an app's workers); one statement at a time.
        self._read_lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._images = _Matrix(root / "images.npy", self.dim, DTYPES[dtype])
        self._texts = _Matrix(root / "texts.npy", self.dim, DTYPES[dtype])
        with directory_lock(self.root):
            self._images.repair(self.num_posters)
            self._texts.repair(self.num_texts)

    # ----- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike, identity: BackboneIdentity | None = None,
             dtype: str = "float16", backbone_spec: dict | None = None) -> "EmbeddingCache":
        root = Path(root)
        meta_path = root / "cache.json"
        if dtype not in DTYPES:
            raise ConfigError("dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
                stored = BackboneIdentity.from_dict(meta["backbone"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ClipposterError(f"{meta_path}: unreadable cache description ({exc}); "
                                      f"point `cache` at a clipposter cache directory") from None
            if meta.get("format_version") != FORMAT_VERSION:
                raise ClipposterError(f"{meta_path}: cache format {meta.get('format_version')} is not "
                                      f"{FORMAT_VERSION}; re-embed into a new `cache` directory")
            if identity is not None:
                identity.check_same(stored, f"the cache {root}")
            return cls(root, stored, meta["dtype"], meta.get("backbone_spec"))
        if identity is None:
            raise ClipposterError(f"{root}: no clipposter cache here (no cache.json); "
                                  f"create one with `clipposter embed SOURCE --cache {root}`")
        root.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "backbone": identity.to_dict(), "dtype": dtype,
                "backbone_spec": backbone_spec}
        write_json(meta_path, meta)
        return cls(root, identity, dtype, backbone_spec)

    @staticmethod
    def exists(root: str | os.PathLike) -> bool:
        """Whether `root` holds a cache (its description, cache.json), without opening it."""
        return (Path(root) / "cache.json").is_file()

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----- counts --------------------------------------------------------------------------------
    @property
    def num_posters(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM posters").fetchone()[0]

    @property
    def num_texts(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM texts").fetchone()[0]

    @property
    def num_records(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    # ----- posters -------------------------------------------------------------------------------
    def known_hashes(self, hashes: Iterable[str]) -> set[str]:
        hashes = list(hashes)
        found: set[str] = set()
        for start in range(0, len(hashes), 900):  # SQLite's bound-parameter limit
            chunk = hashes[start:start + 900]
            q = f"SELECT hash FROM posters WHERE hash IN ({','.join('?' * len(chunk))})"
            found.update(h for (h,) in self._db.execute(q, chunk))
        return found

    def add_posters(self, hashes: Sequence[str], embeddings: np.ndarray,
                    records: Sequence[tuple[PosterRecord, str]] = ()) -> int:
        """Append embeddings for new content hashes, and upsert records, in one crash-safe step.

        Hashes already present are ignored (their rows are not written twice). Returns rows added.
        """
        if len(hashes) != len(embeddings):
            raise ValueError("one embedding per hash")
        with directory_lock(self.root):
            known = self.known_hashes(hashes)
            keep = [i for i, h in enumerate(hashes) if h not in known]
            seen: set[str] = set()
            keep = [i for i in keep if not (hashes[i] in seen or seen.add(hashes[i]))]
            start = self.num_posters
            if keep:
                self._images.append(start, np.asarray(embeddings)[keep])
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO posters(hash, row) VALUES (?, ?)",
                                     [(hashes[i], start + n) for n, i in enumerate(keep)])
                self._upsert_records(records)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._images.set_header(start + len(keep))
        return len(keep)

    def upsert_records(self, records: Sequence[tuple[PosterRecord, str]]) -> None:
        """Store or refresh the metadata of posters whose embeddings are already cached."""
        with directory_lock(self.root):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._upsert_records(records)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _upsert_records(self, records: Sequence[tuple[PosterRecord, str]]) -> None:
        self._db.executemany(
            "INSERT INTO records(id, hash, image, genres, tagline, overview, split, title, url) "
            "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET hash=excluded.hash, "
            "image=excluded.image, genres=excluded.genres, tagline=excluded.tagline, "
            "overview=excluded.overview, split=excluded.split, title=excluded.title, url=excluded.url",
            [(r.id, h, r.image, json.dumps(r.genres), r.tagline, r.overview, r.split, r.title, r.url)
             for r, h in records])

    def records(self, split: str | None = None) -> list[PosterRecord]:
        """Records whose poster is embedded, in id order, optionally of one split."""
        q = "SELECT id, image, genres, tagline, overview, split, title, url FROM records"
        args: tuple = ()
        if split is not None:
            q += " WHERE split = ?"
            args = (split,)
        q += " ORDER BY id"
        return [PosterRecord(id=i, image=im, genres=json.loads(g), tagline=t, overview=o, split=s, title=ti, url=u)
                for i, im, g, t, o, s, ti, u in self._db.execute(q, args)]

    def image_matrix(self) -> np.ndarray:
        """All poster embeddings, (N, D), memory-mapped in the stored dtype; row order = insertion."""
        return self._images.read(self.num_posters)

    # ----- lookups (by content hash and by poster id) ----------------------------------------------
    def _fetch(self, query: str, args: Sequence = ()) -> list[tuple]:
        with self._read_lock:
            return self._db.execute(query, tuple(args)).fetchall()

    def _fetch_in(self, query: str, keys: Sequence[str]) -> list[tuple]:
        """`query` with its `IN ({})` filled for every key, in chunks under SQLite's parameter limit."""
        out: list[tuple] = []
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), 900):
            chunk = keys[start:start + 900]
            out.extend(self._fetch(query.format(",".join("?" * len(chunk))), chunk))
        return out

    def row_for_hash(self, content_hash: str) -> int | None:
        """The embedding row of a poster's content hash, or None when the cache lacks that content."""
        found = self._fetch("SELECT row FROM posters WHERE hash = ?", (content_hash,))
        return int(found[0][0]) if found else None

    def rows_for_hashes(self, hashes: Iterable[str]) -> dict[str, int]:
        """Embedding rows of the content hashes the cache holds (the others are left out)."""
        return {h: int(r) for h, r in self._fetch_in("SELECT hash, row FROM posters WHERE hash IN ({})",
                                                     list(hashes))}

    def id_rows(self, ids: Sequence[str] | None = None, *, below: int | None = None) -> dict[str, int]:
        """Embedding row of each poster id, in id order: of `ids` (unknown ones left out) or of every
        record, optionally only rows under `below`. Reads two columns, not whole records: a search
        index needs this for a million posters on every start."""
        join = "SELECT r.id, p.row FROM records r JOIN posters p ON p.hash = r.hash"
        if ids is None:
            where, args = ("WHERE p.row < ?", (int(below),)) if below is not None else ("", ())
            pairs = self._fetch(f"{join} {where} ORDER BY r.id", args)
        else:
            pairs = sorted(self._fetch_in(f"{join} WHERE r.id IN ({{}})", ids))
            if below is not None:
                pairs = [(i, r) for i, r in pairs if r < below]
        return {i: int(r) for i, r in pairs}

    def record_summaries(self, ids: Sequence[str]) -> dict[str, RecordSummary]:
        """Labelled genres, title and image path of the given poster ids (unknown ids left out)."""
        rows = self._fetch_in("SELECT id, genres, title, image FROM records WHERE id IN ({})", ids)
        return {pid: RecordSummary(json.loads(g), title, image) for pid, g, title, image in rows}

    def labelled_genres(self) -> dict[str, list[str]]:
        """The labelled genres of every poster id."""
        return {pid: json.loads(g) for pid, g in self._fetch("SELECT id, genres FROM records")}

    def rows_for_ids(self, ids: Sequence[str]) -> np.ndarray:
        """Embedding rows of the given poster ids; an unknown id is a clear error."""
        rows = self.id_rows(ids)
        missing = [i for i in ids if i not in rows]
        if missing:
            raise ClipposterError(f"poster id {missing[0]!r} is not in the cache {self.root} "
                                  f"({len(missing)} missing); embed it first")
        return np.fromiter((rows[i] for i in ids), dtype=np.int64, count=len(ids))

    def embeddings_for_ids(self, ids: Sequence[str], dtype=np.float32) -> np.ndarray:
        return np.asarray(self.image_matrix()[self.rows_for_ids(ids)], dtype=dtype)

    def embeddings_for_rows(self, rows: Sequence[int], dtype=np.float32) -> np.ndarray:
        """Embeddings of the given rows, (len(rows), D), converted from the stored dtype."""
        return np.asarray(self.image_matrix()[np.asarray(rows, dtype=np.int64)], dtype=dtype).reshape(
            len(rows), self.dim)

    def embedding_for_hash(self, content_hash: str) -> np.ndarray | None:
        row = self.row_for_hash(content_hash)
        if row is None:
            return None
        return np.asarray(self.image_matrix()[row], dtype=np.float32)

    # ----- texts ---------------------------------------------------------------------------------
    def text_embeddings(self, texts: Sequence[str], backbone=None, batch_size: int = 256) -> np.ndarray:
        """Embeddings of texts (genre prompts, taglines, overviews); missing ones are encoded with
        `backbone` (which must match the cache) and stored. Returns float32 (len(texts), D)."""
        keys = [text_hash(t) for t in texts]
        rows = self._text_rows(keys)
        missing = sorted({k: t for k, t in zip(keys, texts) if k not in rows}.items())
        if missing:
            if backbone is None:
                raise ClipposterError(f"{len(missing)} texts are not in the cache {self.root}; "
                                      f"pass a backbone to encode them")
            self.identity.check_same(backbone.identity, f"the cache {self.root}")
            new = backbone.encode_texts([t for _, t in missing], batch_size=batch_size)
            with directory_lock(self.root):
                rows = self._text_rows(keys)
                todo = [(i, k, t) for i, (k, t) in enumerate(missing) if k not in rows]
                start = self.num_texts
                if todo:
                    self._texts.append(start, new[[i for i, _, _ in todo]])
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany("INSERT INTO texts(hash, row, text) VALUES (?,?,?)",
                                         [(k, start + n, t) for n, (_, k, t) in enumerate(todo)])
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._texts.set_header(start + len(todo))
            rows = self._text_rows(keys)
        matrix = self._texts.read(self.num_texts)
        if not keys:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(matrix[[rows[k] for k in keys]], dtype=np.float32)

    def missing_texts(self, texts: Iterable[str]) -> list[str]:
        """The distinct texts of `texts` the cache holds no embedding for, in first-seen order."""
        uniq = list(dict.fromkeys(texts))
        rows = self._text_rows([text_hash(t) for t in uniq])
        return [t for t in uniq if text_hash(t) not in rows]

    def _text_rows(self, keys: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        uniq = list(dict.fromkeys(keys))
        for start in range(0, len(uniq), 900):
            chunk = uniq[start:start + 900]
            q = f"SELECT hash, row FROM texts WHERE hash IN ({','.join('?' * len(chunk))})"
            out.update(self._db.execute(q, chunk))
        return out

    # ----- summary -------------------------------------------------------------------------------
    def info(self) -> CacheInfo:
        splits = dict(self._db.execute("SELECT COALESCE(split, 'none'), COUNT(*) FROM records GROUP BY 1"))
        size = sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())
        return CacheInfo(path=str(self.root), backbone=self.identity.to_dict(), dtype=self.dtype, dim=self.dim,
                         posters=self.num_posters, records=self.num_records, texts=self.num_texts,
                         splits=splits, bytes_on_disk=size)
