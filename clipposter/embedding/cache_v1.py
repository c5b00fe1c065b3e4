"""The format-1 (v1) cache store: one SQLite index and two .npy matrices per cache.

Caches of format 1 open read-only through `EmbeddingCache.open` (cache.py), which returns a V1Cache;
writing into them means `cache migrate`. `EmbeddingCache.open_v1` still writes them, to build v1 caches
for migration and its checks. New caches are sharded (format 2, shards.py).

Layout of a format-1 cache directory:

    cache.json      format version, backbone identity, dtype, width (written once, checked on open)
    index.sqlite    posters (content hash → row), records (poster id → hash + labels and texts),
                    texts (text hash → row)
    images.npy      (N, D) L2-normalised image embeddings, a plain .npy file, memory-mapped on read
    texts.npy       (M, D) L2-normalised text embeddings (genre prompts, taglines, overviews)

Crash safety: SQLite is the source of truth. Rows are appended to the .npy body and fsynced first,
then their index rows are committed in one transaction, and finally the .npy header's row count is
rewritten; an append writes at most APPEND_ROWS rows before its commit. A run killed at any moment
leaves at most one append's uncommitted trailing bytes, which the next writer's open cuts off, so every
poster ends up exactly once and no committed row is ever half-written. Opening never cuts more than
that: files from different moments (an index deleted or older than its matrix) are refused in one line
and left as they are (see cache_matrix.py).

Two modes: `mode="a"` (create or append; writers take the folder's lock and repair what a killed
writer left) and `mode="r"` (read only: nothing is written, not even a lock file, so a cache on a
read-only disk or a shared folder can be searched and evaluated). A writer leaves the index in
SQLite's rollback-journal mode when it closes, so readers open it with `mode=ro` and take ordinary
shared locks; an index of an older version left in WAL mode is read as immutable when no writer is
active (no -wal file).
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from clipposter.embedding.cache_matrix import Matrix, write_failure
from clipposter.embedding.cache_types import (DTYPES, MODES, CacheInfo, RecordSummary, cached_text_embeddings,
                                              text_hash, write_meta)
from clipposter.embedding.identity import BackboneIdentity
from clipposter.errors import ClipposterError, ConfigError
from clipposter.files import directory_lock
from clipposter.records import PosterRecord

FORMAT_VERSION = 1
# The most rows one append writes before committing them: the most a killed run can leave uncommitted,
# and so the most an open may cut.
APPEND_ROWS = 4096
FILES = ("index.sqlite", "images.npy", "texts.npy")
# SQLite's primary result codes for a damaged file and for a full disk.
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 11, 13, 26
_CORRUPT_MESSAGES = ("file is not a database", "database disk image is malformed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS posters (hash TEXT PRIMARY KEY, row INTEGER UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL, image TEXT, genres TEXT NOT NULL DEFAULT '[]',
    tagline TEXT, overview TEXT, split TEXT, title TEXT, url TEXT);
CREATE INDEX IF NOT EXISTS records_hash ON records(hash);
CREATE INDEX IF NOT EXISTS records_split ON records(split);
CREATE TABLE IF NOT EXISTS texts (hash TEXT PRIMARY KEY, row INTEGER UNIQUE NOT NULL, text TEXT NOT NULL);
"""


def _sqlite_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    return None if code is None else code & 0xFF


def _is_corrupt(exc: sqlite3.Error) -> bool:
    return _sqlite_code(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or str(exc) in _CORRUPT_MESSAGES


def _is_full(exc: sqlite3.Error) -> bool:
    return _sqlite_code(exc) == _SQLITE_FULL or str(exc) == "database or disk is full"


def _unreadable_index(root: Path, exc: sqlite3.Error) -> ClipposterError:
    return ClipposterError(f"index.sqlite in {root} is not a readable SQLite database ({exc}): restore it or "
                           f"re-embed into a new cache")


@contextlib.contextmanager
def _index_errors(root: Path) -> Iterator[None]:
    """SQLite's errors of a damaged index as one line; others (a locked database, a constraint) as they are."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if _is_corrupt(exc):
            raise _unreadable_index(root, exc) from None
        raise


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """Open an index for reading without writing or creating any file: `mode=ro`; `immutable` for an
    index left in WAL mode with no -wal file (an older version's; a live writer always has a -wal file),
    which `mode=ro` alone would give new -wal and -shm files."""
    with open(path, "rb") as f:
        wal_mode = f.read(20)[18:20] == b"\x02\x02"
    immutable = wal_mode and not path.with_name(path.name + "-wal").exists()
    uri = path.resolve().as_uri() + ("?mode=ro&immutable=1" if immutable else "?mode=ro")
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)


def _counts(db: sqlite3.Connection) -> tuple[int, int] | None:
    """Committed posters and texts; None for an index whose tables were never made (a writer killed
    right after creating the file)."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"posters", "texts"} <= tables:
        return None
    return tuple(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("posters", "texts"))  # type: ignore


def create_meta(root: Path, identity: BackboneIdentity, dtype: str, backbone_spec: dict | None) -> None:
    """Write a new v1 cache's description (cache.json): the cache exists from here on, empty."""
    write_meta(root, FORMAT_VERSION, identity, dtype, backbone_spec)


class V1Cache:
    """Image and text embeddings of one backbone in format 1, keyed by content, with poster metadata.

    Open with `EmbeddingCache.open(dir)` (read-only, as every v1 cache opens there) or
    `EmbeddingCache.open_v1(dir, identity, mode=...)` (create, add, read), both in cache.py.
    """

    def __init__(self, root: Path, identity: BackboneIdentity, dtype: str, backbone_spec: dict | None = None,
                 mode: str = "a", *, migrate_to_write: bool = False):
        if mode not in MODES:
            raise ConfigError("mode", f"must be one of {list(MODES)}, got {mode!r}")
        self.root = root
        # Opened through `open`, a v1 cache is read-only for good: writing means migrating it first.
        self._migrate_to_write = migrate_to_write
        self.backbone_spec = backbone_spec  # how to load the backbone again (see Backbone.spec)
        self.identity = identity
        self.dtype = dtype
        self.dim = identity.embed_dim
        self.mode = mode
        # Lookups may come from several threads (an app's workers); one statement at a time.
        self._read_lock = threading.RLock()
        self._images = Matrix(root, "images.npy", self.dim, DTYPES[dtype])
        self._texts = Matrix(root, "texts.npy", self.dim, DTYPES[dtype])
        self._db: sqlite3.Connection | None = None
        if mode == "r":
            self._db = self._check(repair=False)
        else:
            # What a reader can see is refused before the lock is taken, so a refusal changes no file.
            self._check(repair=False).close()
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(directory_lock(root))
                except OSError as exc:
                    raise ClipposterError(f"cannot write into {root} ({exc.strerror or exc}): adding to a cache "
                                          f"needs a writable folder; commands that only read work on it as it "
                                          f"is") from None
                self._check(repair=True)
                self._db = self._connect_writer()

    @property
    def writable(self) -> bool:
        return self.mode != "r"

    def _check(self, repair: bool) -> sqlite3.Connection | None:
        """Check both matrices against the committed counts, reading only. A reader keeps the
        connection it read with; a writer then repairs what a killed writer left."""
        index = self.root / "index.sqlite"
        # Headers first, then counts: a writer rewrites a header only after its commit, so a header
        # read before the count is never ahead of it unless the files do not belong together.
        states = [m.header_rows() for m in (self._images, self._texts)]
        db = None
        if index.exists():
            with _index_errors(self.root):
                db = _connect_readonly(index)
                try:
                    counts = _counts(db)
                except BaseException:
                    db.close()
                    raise
            if counts is None:
                db.close()
                db, counts = None, (0, 0)
        else:
            counts = (0, 0)
        try:
            actions = [m.check(s, c, APPEND_ROWS if repair else None)
                       for m, s, c in zip((self._images, self._texts), states, counts)]
        except BaseException:
            if db is not None:
                db.close()
            raise
        if not repair:
            if db is None:  # no index and no rows: an empty cache, read from an index held in memory
                db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
                db.executescript(_SCHEMA)
            return db
        if db is not None:
            db.close()
        for m, action, committed in zip((self._images, self._texts), actions, counts):
            try:
                m.create()
                m.repair(action, committed)
            except OSError as exc:
                raise write_failure(self.root, m.path, exc, f"its {committed} committed rows") from None
        return None

    def _connect_writer(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "index.sqlite", isolation_level=None, check_same_thread=False)
        try:
            with self._write_errors("its committed rows"):
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        db, self._db = self._db, None
        if db is None:
            return
        if self.writable:
            # Back to a rollback journal at rest, so readers need no -wal/-shm files (see the module
            # docstring). While another connection is open this fails at once (no busy wait) and the
            # index stays in WAL mode, which is as safe; the last writer to close switches it.
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA busy_timeout=0")
                db.execute("PRAGMA journal_mode=DELETE")
        db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----- index access ------------------------------------------------------------------------------
    def _fetch(self, query: str, args: Sequence = ()) -> list[tuple]:
        with self._read_lock, _index_errors(self.root):
            return self._db.execute(query, tuple(args)).fetchall()

    def _fetch_in(self, query: str, keys: Sequence[str]) -> list[tuple]:
        """`query` with its `IN ({})` filled for every key, in chunks under SQLite's parameter limit."""
        out: list[tuple] = []
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), 900):
            chunk = keys[start:start + 900]
            out.extend(self._fetch(query.format(",".join("?" * len(chunk))), chunk))
        return out

    def require_writable(self, what: str) -> None:
        if self._migrate_to_write:
            raise ClipposterError(f"the cache {self.root} is of format {FORMAT_VERSION}, which is read-only: convert "
                                  f"it with `clipposter cache migrate --cache {self.root}` to {what}")
        if not self.writable:
            raise ClipposterError(f"the cache {self.root} is open read-only; open it with `mode` \"a\" to {what}")

    @contextlib.contextmanager
    def _write_errors(self, kept: str) -> Iterator[None]:
        """A full disk and a damaged index as one line each, naming what the cache kept."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if _is_full(exc):
                raise ClipposterError(f"disk full while writing {self.root}: index.sqlite: {exc}; free some "
                                      f"space and run again (the cache keeps {kept})") from None
            if _is_corrupt(exc):
                raise _unreadable_index(self.root, exc) from None
            raise

    def _commit(self, matrix: Matrix, table: str, insert: str, keys: Sequence[tuple], rows: np.ndarray | None,
                records: Sequence[tuple[PosterRecord, str]] = ()) -> None:
        """One append step: rows after the committed ones (flushed), then their index rows and `records`
        in one transaction, then the header. A failure leaves the committed rows as they were."""
        start = self._count(table)
        kept = f"its {start} committed {table}"
        if len(keys):
            matrix.append(start, rows)
        try:
            with self._write_errors(kept):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(insert, [(*k, start + n) for n, k in enumerate(keys)])
                    self._upsert_records(records)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # SQLite rolls back by itself on some errors (a full disk)
                        self._db.execute("ROLLBACK")
                    raise
        except BaseException:
            if len(keys):
                with contextlib.suppress(Exception):
                    if self._count(table) == start:  # not committed after all: the rows are nobody's
                        matrix.cut(start)
            raise
        matrix.set_header(start + len(keys))

    def _count(self, table: str) -> int:
        return self._fetch(f"SELECT COUNT(*) FROM {table}")[0][0]

    # ----- counts --------------------------------------------------------------------------------
    @property
    def num_posters(self) -> int:
        return self._count("posters")

    @property
    def num_texts(self) -> int:
        return self._count("texts")

    @property
    def num_records(self) -> int:
        return self._count("records")

    # ----- posters -------------------------------------------------------------------------------
    def known_hashes(self, hashes: Iterable[str]) -> set[str]:
        return {h for (h,) in self._fetch_in("SELECT hash FROM posters WHERE hash IN ({})", list(hashes))}

    def add_posters(self, hashes: Sequence[str], embeddings: np.ndarray,
                    records: Sequence[tuple[PosterRecord, str]] = ()) -> int:
        """Append embeddings for new content hashes, and upsert records, crash-safe: in one step, or in
        steps of APPEND_ROWS new rows, each record committed with its poster's row.

        Hashes already present are ignored (their rows are not written twice). Returns rows added.
        """
        if len(hashes) != len(embeddings):
            raise ValueError("one embedding per hash")
        self.require_writable("add posters")
        with directory_lock(self.root):
            known = self.known_hashes(hashes)
            keep = [i for i, h in enumerate(hashes) if h not in known]
            seen: set[str] = set()
            keep = [i for i in keep if not (hashes[i] in seen or seen.add(hashes[i]))]
            steps = [keep[s:s + APPEND_ROWS] for s in range(0, len(keep), APPEND_ROWS)] or [[]]
            step_of = {hashes[i]: n for n, step in enumerate(steps) for i in step}
            step_records: list[list[tuple[PosterRecord, str]]] = [[] for _ in steps]
            for r, h in records:
                step_records[step_of.get(h, 0)].append((r, h))
            emb = np.asarray(embeddings)
            for step, recs in zip(steps, step_records):
                self._commit(self._images, "posters", "INSERT INTO posters(hash, row) VALUES (?, ?)",
                             [(hashes[i],) for i in step], emb[step] if step else None, recs)
        return len(keep)

    def upsert_records(self, records: Sequence[tuple[PosterRecord, str]]) -> None:
        """Store or refresh the metadata of posters whose embeddings are already cached."""
        self.require_writable("store records")
        with directory_lock(self.root), self._write_errors("its records as they were"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._upsert_records(records)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
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
                for i, im, g, t, o, s, ti, u in self._fetch(q, args)]

    def image_matrix(self) -> np.ndarray:
        """All poster embeddings, (N, D), memory-mapped in the stored dtype; row order = insertion."""
        return self._images.read(self.num_posters)

    def poster_hashes(self) -> list[str]:
        """The content hash of every row of `image_matrix()`, in row order."""
        return [h for (h,) in self._fetch("SELECT hash FROM posters ORDER BY row")]

    def records_with_hashes(self) -> list[tuple[PosterRecord, str]]:
        """Every record with its poster's content hash, in id order."""
        rows = self._fetch("SELECT id, image, genres, tagline, overview, split, title, url, hash FROM records "
                           "ORDER BY id")
        return [(PosterRecord(id=i, image=im, genres=json.loads(g), tagline=t, overview=o, split=s, title=ti,
                              url=u), h) for i, im, g, t, o, s, ti, u, h in rows]

    def text_items(self) -> list[tuple[str, str]]:
        """(hash, text) of every stored text row, in row order."""
        return [(h, t) for h, t in self._fetch("SELECT hash, text FROM texts ORDER BY row")]

    def text_matrix(self) -> np.ndarray:
        """All text embeddings, (M, D), memory-mapped in the stored dtype."""
        return self._texts.read(self.num_texts)

    def iter_embeddings(self, chunk_rows: int = 65_536, start: int = 0,
                        stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows in the stored dtype) for rows start..stop, `chunk_rows` at a time. Each chunk is
        copied out of a map released before the next, so a scan keeps one chunk resident, not the file."""
        stop = self.num_posters if stop is None else stop
        for s in range(start, stop, max(1, int(chunk_rows))):
            mapped = self._images.read(stop)
            yield s, np.array(mapped[s:min(stop, s + int(chunk_rows))])
            del mapped

    # ----- lookups (by content hash and by poster id) ----------------------------------------------
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
        `backbone` (which must match the cache) and stored, in steps of APPEND_ROWS texts; a read-only
        cache returns them without storing them. Returns float32 (len(texts), D)."""
        return cached_text_embeddings(self, texts, backbone, batch_size, step_rows=APPEND_ROWS,
                                      rows_of=self._text_rows, store=self._store_texts,
                                      read=self._read_text_rows)

    def _store_texts(self, keys: Sequence[str], texts: Sequence[str], emb: np.ndarray) -> None:
        with directory_lock(self.root):
            stored = self._text_rows(keys)  # another writer may have added some
            todo = [n for n, k in enumerate(keys) if k not in stored]
            self._commit(self._texts, "texts", "INSERT INTO texts(hash, text, row) VALUES (?, ?, ?)",
                         [(keys[n], texts[n]) for n in todo], emb[todo])

    def _read_text_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._texts.read(self.num_texts)[rows], dtype=np.float32)

    def missing_texts(self, texts: Iterable[str]) -> list[str]:
        """The distinct texts of `texts` the cache holds no embedding for, in first-seen order."""
        uniq = list(dict.fromkeys(texts))
        rows = self._text_rows([text_hash(t) for t in uniq])
        return [t for t in uniq if text_hash(t) not in rows]

    def _text_rows(self, keys: Sequence[str]) -> dict[str, int]:
        return dict(self._fetch_in("SELECT hash, row FROM texts WHERE hash IN ({})", list(keys)))

    # ----- summary -------------------------------------------------------------------------------
    def info(self) -> CacheInfo:
        splits = dict(self._fetch("SELECT COALESCE(split, 'none'), COUNT(*) FROM records GROUP BY 1"))
        size = sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())
        return CacheInfo(path=str(self.root), backbone=self.identity.to_dict(), dtype=self.dtype, dim=self.dim,
                         posters=self.num_posters, records=self.num_records, texts=self.num_texts,
                         splits=splits, bytes_on_disk=size)
