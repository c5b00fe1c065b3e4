"""Turn the places posters live into `PosterRecord`s.

Four inputs are understood: a folder of images, a CSV/TSV/Parquet manifest, the two Kaggle tables
the seed paper joined ("Movie Genre from its Poster" and "The Movies Dataset"), and `load_source`,
which picks one of those from a single command-line spec. Every reader can fill a `SourceStats`
so the CLI can say how many rows were dropped and why instead of failing on dirty real-world data,
and what it decided on the user's behalf (the encoding of a CSV, how the Kaggle tables joined).
Table files are read by clipposter.ingest.manifest. `write_manifest` writes records in the manifest
format `from_manifest` reads.
"""
from __future__ import annotations

import ast
import contextlib
import csv
import inspect
import io
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

import pandas as pd

from clipposter.errors import ClipposterError
from clipposter.files import atomic_write_bytes
from clipposter.ingest.images import IMAGE_EXTENSIONS
from clipposter.ingest.manifest import read_table
from clipposter.ingest.source_stats import SPLIT_ALIASES, SourceStats  # noqa: F401 (public here too)
from clipposter.ingest.webdataset import WDS_PREFIX, from_webdataset
from clipposter.records import DEFAULT_FRACTIONS, PosterRecord, assign_splits, clean_text, parse_genres

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
MANIFEST_COLUMNS = ("id", "image", "genres", "tagline", "overview", "title", "split")
KAGGLE_GENRE_FILE = "MovieGenre.csv"
KAGGLE_METADATA_FILE = "movies_metadata.csv"
KAGGLE_POSTER_DIR = "posters"

# Column defaults of from_manifest; a name that differs from its default was asked for explicitly
# and must exist, while a missing default column just means the manifest has no such field.
_DEFAULT_COLUMNS = {
    "id": "id", "image": "image", "genres": "genres", "tagline": "tagline",
    "overview": "overview", "split": "split", "title": "title", "url": "url",
}


# --------------------------------------------------------------------------- cell helpers

def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def _text(value: Any) -> str | None:
    """clean_text that also treats pandas' NA markers as missing (str(pd.NA) would be '<NA>')."""
    return None if _is_missing(value) else clean_text(value)


def _id_text(value: Any) -> str | None:
    """An id as text; integral floats (Parquet int columns with gaps) lose their '.0'."""
    if _is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return clean_text(value)


def _genres(value: Any) -> list[str]:
    return [] if _is_missing(value) else parse_genres(value)


def _stem_of(location: str) -> str | None:
    """The file stem of a path or URL, used as the id when a manifest has no id column."""
    path = urlsplit(location).path if _is_url(location) else location
    name = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return stem or None


def _is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def _find_column(columns: Sequence[Any], name: str | None) -> str | None:
    """Exact column name first, then a case- and space-insensitive match."""
    if not name:
        return None
    if name in columns:
        return name
    folded = {str(c).strip().lower(): c for c in columns}
    return folded.get(name.strip().lower())


def _column_list(columns: Sequence[Any]) -> str:
    return ", ".join(repr(str(c)) for c in columns) or "none"


# --------------------------------------------------------------------------- folder

def from_folder(root: str | os.PathLike, recursive: bool = True, *,
                stats: SourceStats | None = None) -> list[PosterRecord]:
    """Every image under `root` (by suffix, hidden files and folders skipped), sorted by path.

    The id is the path relative to root without its suffix, with "/" separators, so the same
    tree gives the same ids on every OS; the image is the absolute path. A sub-folder that cannot
    be read, and a file or folder whose name is not valid UTF-8, is skipped with a warning in
    `stats`: the cache stores ids and paths as UTF-8 text, and no UTF-8 text names such a file,
    so a poster kept under a made-up name could never be opened from its record again.
    """
    stats = stats if stats is not None else SourceStats()
    base = Path(root).expanduser()
    if not base.exists():
        raise ClipposterError(f"{base}: poster folder not found; check the path")
    if not base.is_dir():
        raise ClipposterError(f"{base}: not a folder; pass a folder of images or a manifest file")
    base = base.absolute()
    if not _is_utf8(str(base)):
        raise ClipposterError(f"{_printable(base)}: the folder's path is not valid UTF-8; rename it "
                              f"(convmv converts names from Latin-1)")

    def unreadable(exc: OSError) -> None:
        where = _printable(exc.filename or base)
        if os.path.abspath(exc.filename or base) == str(base):
            raise ClipposterError(f"cannot read folder {where}: {exc.strerror or exc}") from None
        stats.rows_read += 1
        stats.skip("unreadable folder")
        stats.warn(f"cannot read folder {where}: {exc.strerror or exc}; its posters are left out")

    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(base, onerror=unreadable):
        # Pruning in place stops os.walk from descending into hidden, badly named or (non-recursive)
        # subfolders.
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")) if recursive else []:
            if _is_utf8(name):
                kept.append(name)
            else:
                stats.rows_read += 1
                stats.skip("folder name not valid UTF-8")
                stats.warn(f"skipped folder {_printable(os.path.join(dirpath, name))}: {_RENAME}")
        dirnames[:] = kept
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            stats.rows_read += 1
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                stats.skip("not an image file")
                continue
            if not _is_utf8(name):
                stats.skip("file name not valid UTF-8")
                stats.warn(f"skipped {_printable(path)}: {_RENAME}")
                continue
            found.append((path.relative_to(base).as_posix(), path))
    found.sort()

    records: list[PosterRecord] = []
    seen: dict[str, str] = {}
    for rel, path in found:
        record_id = rel[: -len(path.suffix)] if path.suffix else rel
        if record_id in seen:
            raise ClipposterError(f"{base}: {seen[record_id]} and {rel} both give id {record_id!r}; "
                                  f"rename or remove one of them")
        seen[record_id] = rel
        records.append(PosterRecord(id=record_id, image=str(path)))
    return records


_RENAME = "its name is not valid UTF-8; rename it (convmv converts names from Latin-1)"


def _is_utf8(name: str) -> bool:
    """False for a name with bytes the file system encoding could not decode (held as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(path: str | os.PathLike) -> str:
    """A path as printable text: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------- manifest

def normalise_split(value: Any) -> str | None:
    """'val'/'valid'/'validation'/'dev' -> 'validation' etc.; empty -> None; unknown -> ValueError."""
    text = _text(value)
    if text is None:
        return None
    split = SPLIT_ALIASES.get(text.lower())
    if split is None:
        raise ValueError(text)
    return split


def from_manifest(path: str | os.PathLike, *, id_col: str | None = "id", image_col: str | None = "image",
                  genres_col: str | None = "genres", tagline_col: str | None = "tagline",
                  overview_col: str | None = "overview", split_col: str | None = "split",
                  title_col: str | None = "title", url_col: str | None = "url",
                  image_root: str | os.PathLike | None = None, encoding: str | None = None,
                  stats: SourceStats | None = None) -> list[PosterRecord]:
    """Records from a CSV, TSV or Parquet manifest with one row per poster.

    Columns are matched by name (exactly, else ignoring case); a column left at its default name
    may be absent, one named explicitly must exist, and None ignores that field. Without an id
    column the id is the stem of the image path (or URL). Relative image paths resolve against
    `image_root`, else the manifest's folder. Rows with neither image nor URL are skipped and
    counted in `stats`; duplicate ids and unknown split names are errors.
    """
    stats = stats if stats is not None else SourceStats()
    path = Path(path).expanduser()
    if not path.is_file():
        raise ClipposterError(f"{path}: manifest not found; check the path")
    table = read_table(path, encoding=encoding, notes=stats.notes)
    columns = list(table.columns)

    wanted = {"id": id_col, "image": image_col, "genres": genres_col, "tagline": tagline_col,
              "overview": overview_col, "split": split_col, "title": title_col, "url": url_col}
    cols: dict[str, str | None] = {}
    for name, requested in wanted.items():
        cols[name] = _find_column(columns, requested)
        if cols[name] is None and requested and requested != _DEFAULT_COLUMNS[name]:
            raise ClipposterError(f"{path}: no column {requested!r} for {name} (found: {_column_list(columns)}); "
                                  f"pass the right name with --{name}-col")
    if cols["image"] is None and cols["url"] is None:
        raise ClipposterError(f"{path}: no image or url column (found: {_column_list(columns)}); "
                              f"name yours with `image_col` (or `url_col`) and `id_col`")

    base = Path(image_root).expanduser().absolute() if image_root is not None else path.parent.absolute()
    is_csv = path.suffix.lower() in (".csv", ".tsv")

    def where(i: int) -> str:  # CSV line numbers count the header; Parquet rows are 1-based
        return f"line {i + 2}" if is_csv else f"row {i + 1}"

    def column(name: str) -> list[Any]:
        col = cols[name]
        return table[col].tolist() if col is not None else [None] * len(table)

    data = {name: column(name) for name in wanted}
    records: list[PosterRecord] = []
    first_seen: dict[str, int] = {}
    for i in range(len(table)):
        stats.rows_read += 1
        image = _text(data["image"][i])
        url = _text(data["url"][i])
        if image is not None and _is_url(image):
            # An image column holding URLs is a download list, not local files.
            url, image = url or image, None
        if image is not None:
            image_path = Path(image).expanduser()
            image = os.path.normpath(image_path if image_path.is_absolute() else base / image_path)
        if image is None and url is None:
            stats.skip("no image or url")
            continue
        record_id = _id_text(data["id"][i]) or _stem_of(image or url or "")
        if record_id is None:
            stats.skip("no id")
            continue
        if record_id in first_seen:
            raise ClipposterError(f"{path}: duplicate id {record_id!r} ({where(first_seen[record_id])} and {where(i)}); "
                                  f"ids must be unique, remove or rename one")
        first_seen[record_id] = i
        try:
            split = normalise_split(data["split"][i])
        except ValueError as exc:
            raise ClipposterError(f"{path}: {where(i)}: unknown split {str(exc)!r} in column {cols['split']!r}; "
                                  f"use train, validation (or val/valid) or test") from None
        records.append(PosterRecord(
            id=record_id, image=image, genres=_genres(data["genres"][i]),
            tagline=_text(data["tagline"][i]), overview=_text(data["overview"][i]),
            split=split, title=_text(data["title"][i]), url=url))
    return records


# --------------------------------------------------------------------------- Kaggle tables

_IMDB_NUMBER = re.compile(r"(?:tt)?0*(\d{1,9})(?:\.0+)?", re.IGNORECASE)
_IMDB_ID = re.compile(r"tt\d{7,9}")


def write_manifest(records: Iterable[PosterRecord], path: str | os.PathLike) -> Path:
    """Write records as manifest.csv (id,image,genres,tagline,overview,title,split).

    Image paths are written relative to the manifest's folder when they live under it, so the
    folder can be moved as a whole. The file is left untouched when its content would not change.
    """
    path = Path(path)
    root = path.parent.resolve()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for rec in records:
        image = rec.image or ""
        if image:
            with contextlib.suppress(ValueError):  # outside the manifest folder: keep the path as given
                image = Path(image).resolve().relative_to(root).as_posix()
        writer.writerow([rec.id, image, "|".join(rec.genres), rec.tagline or "", rec.overview or "",
                         rec.title or "", rec.split or ""])
    data = buf.getvalue().encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.exists() and path.read_bytes() == data):
        atomic_write_bytes(path, data)
    return path


def imdb_id(value: Any) -> str | None:
    """'tt' + 7-digit zero-padded IMDb number from 114709, '114709', 'tt0114709'; else None."""
    text = _id_text(value)
    if text is None:
        return None
    match = _IMDB_NUMBER.fullmatch(text)
    if match is None or int(match.group(1)) == 0:
        return None
    return f"tt{int(match.group(1)):07d}"


def _metadata_genres(value: Any) -> list[str] | None:
    """Names from "[{'id': 16, 'name': 'Animation'}]"; None when the cell is malformed.

    ast.literal_eval, never eval: the cell is untrusted text.
    """
    text = _text(value)
    if text is None:
        return []
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(parsed, list):
        return None
    names: list[str] = []
    for item in parsed:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        names.append(item["name"].strip())
    return names


def _poster_files(poster_dir: Path) -> dict[str, str]:
    """Stem -> image path in poster_dir, preferring .jpg (the paper's files) over other suffixes."""
    order = [".jpg", ".jpeg"] + sorted(IMAGE_EXTENSIONS - {".jpg", ".jpeg"})
    best: dict[str, tuple[int, str]] = {}
    with os.scandir(poster_dir) as entries:
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            suffix = suffix.lower()
            if entry.name.startswith(".") or suffix not in IMAGE_EXTENSIONS or not entry.is_file():
                continue
            rank = order.index(suffix) if suffix in order else len(order)
            if stem not in best or rank < best[stem][0]:
                best[stem] = (rank, os.path.abspath(entry.path))
    return {stem: p for stem, (_, p) in best.items()}


def _metadata_by_id(path: Path, encoding: str | None, stats: SourceStats) -> dict[str, dict[str, Any]]:
    table = read_table(path, encoding=encoding, notes=stats.notes)
    columns = list(table.columns)
    id_col = _find_column(columns, "imdb_id")
    if id_col is None:
        raise ClipposterError(f"{path}: no 'imdb_id' column (found: {_column_list(columns)}); "
                              f"expected movies_metadata.csv from The Movies Dataset")
    genres_col = _find_column(columns, "genres")
    texts = {name: _find_column(columns, name) for name in ("tagline", "overview", "title")}
    name = path.name
    by_id: dict[str, dict[str, Any]] = {}
    ids = table[id_col].tolist()
    genres = table[genres_col].tolist() if genres_col else [None] * len(table)
    text_values = {k: (table[c].tolist() if c else [None] * len(table)) for k, c in texts.items()}
    for i, raw_id in enumerate(ids):
        stats.rows_read += 1
        text_id = _text(raw_id)
        # Shifted rows in the wild put dates or numbers here; only a real tt-id can be joined.
        if text_id is None or not _IMDB_ID.fullmatch(text_id):
            stats.skip(f"{name}: malformed imdb_id")
            continue
        if _metadata_genres(genres[i]) is None:
            stats.skip(f"{name}: malformed genres")
            continue
        key = imdb_id(text_id)
        if key in by_id:
            stats.skip(f"{name}: duplicate imdb_id")
            continue
        by_id[key] = {k: _text(v[i]) for k, v in text_values.items()}
    return by_id


def from_kaggle(movie_genre_csv: str | os.PathLike, movies_metadata_csv: str | os.PathLike | None = None,
                poster_dir: str | os.PathLike | None = None, join: str = "left", *,
                encoding: str | None = None, stats: SourceStats | None = None) -> list[PosterRecord]:
    """Records from the seed paper's Kaggle tables, joined by IMDb id.

    Poster URL, title and genres come from MovieGenre.csv ("Movie Genre from its Poster"; ids
    become tt + 7 digits, repeated imdbIds keep the first row); tagline and overview come from
    movies_metadata.csv ("The Movies Dataset"), whose malformed rows are skipped and counted.
    `join="left"` (the default) keeps every labelled poster, with no tagline or overview where the
    metadata has no row; `"inner"` keeps only posters with metadata (the paper's setup). The counts
    (labelled, with metadata, kept) go to `stats.join` and a note.
    Genres stay IMDb's (MovieGenre): TMDB's names differ ("Science Fiction" vs "Sci-Fi").
    With `poster_dir`, image is poster_dir/<id>.jpg (or another image suffix) when it exists.
    """
    stats = stats if stats is not None else SourceStats()
    if join not in ("inner", "left"):
        raise ClipposterError(f"unknown join {join!r}; use 'inner' (posters with metadata) or 'left' (all posters)")
    genre_path = Path(movie_genre_csv).expanduser()
    if not genre_path.is_file():
        raise ClipposterError(f"{genre_path}: {KAGGLE_GENRE_FILE} not found; download 'Movie Genre from its Poster' from Kaggle")
    meta_path = Path(movies_metadata_csv).expanduser() if movies_metadata_csv is not None else None
    if meta_path is not None and not meta_path.is_file():
        raise ClipposterError(f"{meta_path}: {KAGGLE_METADATA_FILE} not found; download 'The Movies Dataset' from Kaggle")
    posters: dict[str, str] = {}
    if poster_dir is not None:
        poster_path = Path(poster_dir).expanduser()
        if not poster_path.is_dir():
            raise ClipposterError(f"{poster_path}: poster folder not found; download posters first or omit it")
        posters = _poster_files(poster_path)

    table = read_table(genre_path, encoding=encoding, notes=stats.notes)
    columns = list(table.columns)
    cols = {k: _find_column(columns, k) for k in ("imdbId", "Genre", "Poster", "Title")}
    missing = [k for k in ("imdbId", "Genre", "Poster") if cols[k] is None]
    if missing:
        raise ClipposterError(f"{genre_path}: missing column(s) {', '.join(missing)} (found: {_column_list(columns)}); "
                              f"expected MovieGenre.csv from 'Movie Genre from its Poster'")
    metadata = _metadata_by_id(meta_path, encoding, stats) if meta_path is not None else None

    name = genre_path.name
    values = {k: (table[c].tolist() if c else [None] * len(table)) for k, c in cols.items()}
    records: list[PosterRecord] = []
    seen: set[str] = set()
    matched = 0
    for i in range(len(table)):
        stats.rows_read += 1
        record_id = imdb_id(values["imdbId"][i])
        if record_id is None:
            stats.skip(f"{name}: bad imdbId")
            continue
        if record_id in seen:
            stats.skip(f"{name}: duplicate imdbId")
            continue
        seen.add(record_id)
        meta = metadata.get(record_id) if metadata is not None else None
        matched += meta is not None
        if metadata is not None and meta is None and join == "inner":
            stats.skip(f"{name}: no metadata match (inner join)")
            continue
        meta = meta or {}
        url = _text(values["Poster"][i])
        records.append(PosterRecord(
            id=record_id, image=posters.get(record_id), genres=_genres(values["Genre"][i]),
            tagline=meta.get("tagline"), overview=meta.get("overview"),
            title=_text(values["Title"][i]) or meta.get("title"),
            url=url if url is not None and _is_url(url) else None))
    if metadata is not None:
        labelled, kept = len(seen), len(records)
        stats.join = {"join": join, "labelled": labelled, "with_metadata": matched, "kept": kept}
        what = (f"left join: {labelled - matched} have no tagline or overview" if join == "left"
                else f"inner join: {labelled - matched} without metadata left out; `join` left keeps them")
        stats.notes.append(f"{name}: {labelled} labelled posters, {matched} with metadata in {meta_path.name}; "
                           f"kept {kept} ({what})")
    return records


def require_local_images(records: Sequence[PosterRecord], spec: str | os.PathLike) -> None:
    """ClipposterError when none of `records` has a local image file (only URLs), saying where the
    posters were looked for and how to fetch them; `spec` is the source as given to load_source."""
    if any(r.image for r in records):
        return
    text = os.fspath(spec)
    if text.startswith("kaggle:"):
        posters = Path(text[len("kaggle:"):] or ".").expanduser() / KAGGLE_POSTER_DIR
        example = next((f"e.g. {r.id}.jpg" for r in records), "")
        raise ClipposterError(f"{text}: none of the {len(records)} posters has an image file in {posters} "
                              f"(looked for <imdb id>.jpg, {example}); fetch them with "
                              f"`clipposter download {text} --out {posters}`, or pass `download_dir`")
    raise ClipposterError(f"{text}: none of the {len(records)} posters has a local image file (only URLs); "
                          f"fetch them with `clipposter download {text} --out DIR`, or pass `download_dir`")


# --------------------------------------------------------------------------- dispatch

_FOLDER_OPTIONS = frozenset(inspect.signature(from_folder).parameters) - {"root", "stats"}
_MANIFEST_OPTIONS = frozenset(inspect.signature(from_manifest).parameters) - {"path", "stats"}
_KAGGLE_OPTIONS = frozenset(inspect.signature(from_kaggle).parameters) - {"movie_genre_csv", "stats"}
_WDS_OPTIONS = frozenset(inspect.signature(from_webdataset).parameters) - {"spec", "stats"}
_ALL_OPTIONS = _FOLDER_OPTIONS | _MANIFEST_OPTIONS | _KAGGLE_OPTIONS | _WDS_OPTIONS

SOURCE_FORMS = ("a folder of images, a .csv/.tsv/.parquet manifest, a MovieGenre.csv, "
                "kaggle:DIR (DIR holding MovieGenre.csv, optional movies_metadata.csv and posters/), "
                "or wds:SHARDS (WebDataset tar shards, e.g. wds:DIR/{000000..000009}.tar)")


def load_source(spec: str | os.PathLike, *, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                stats: SourceStats | None = None, **options: Any) -> list[PosterRecord]:
    """Records from one CLI spec, with seeded splits for records that have none.

    `options` are the keyword arguments of from_folder / from_manifest / from_kaggle / from_webdataset
    (clipposter.ingest.webdataset, for `wds:` specs); those that
    do not apply to the chosen reader, and those that are None, are ignored so a CLI can pass all
    of its flags. An empty result is an error, since nothing downstream can use it.
    """
    unknown = set(options) - _ALL_OPTIONS
    if unknown:
        raise TypeError(f"load_source() got unknown option(s): {', '.join(sorted(unknown))}")
    options = {k: v for k, v in options.items() if v is not None}
    stats = stats if stats is not None else SourceStats()
    text = os.fspath(spec)

    def pick(allowed: frozenset[str]) -> dict[str, Any]:
        return {k: v for k, v in options.items() if k in allowed}

    if text.startswith(WDS_PREFIX):
        records = from_webdataset(text, stats=stats, **pick(_WDS_OPTIONS))
    elif text.startswith("kaggle:"):
        folder = Path(text[len("kaggle:"):] or ".").expanduser()
        if not folder.is_dir():
            raise ClipposterError(f"{text}: folder {folder} not found; use kaggle:DIR with DIR holding {KAGGLE_GENRE_FILE}")
        chosen = pick(_KAGGLE_OPTIONS)
        if "movies_metadata_csv" not in chosen and (folder / KAGGLE_METADATA_FILE).is_file():
            chosen["movies_metadata_csv"] = folder / KAGGLE_METADATA_FILE
        if "poster_dir" not in chosen and (folder / KAGGLE_POSTER_DIR).is_dir():
            chosen["poster_dir"] = folder / KAGGLE_POSTER_DIR
        records = from_kaggle(folder / KAGGLE_GENRE_FILE, stats=stats, **chosen)
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            records = from_folder(path, stats=stats, **pick(_FOLDER_OPTIONS))
        elif path.is_file() and path.name.lower() == KAGGLE_GENRE_FILE.lower():
            records = from_kaggle(path, stats=stats, **pick(_KAGGLE_OPTIONS))
        elif path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
            records = from_manifest(path, stats=stats, **pick(_MANIFEST_OPTIONS))
        elif path.exists():
            raise ClipposterError(f"{text}: not a poster source; use {SOURCE_FORMS}")
        else:
            raise ClipposterError(f"{text}: no such file or folder; use {SOURCE_FORMS}")
    if not records:
        raise ClipposterError(f"{text}: no posters found ({stats.summary()}); check the path and column names")
    return assign_splits(records, seed=seed, fractions=fractions)
