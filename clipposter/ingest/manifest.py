"""Reading one table file (CSV, TSV or Parquet) as spreadsheets and other tools write them.

The text encoding of a CSV is found from its bytes: UTF-8 (with or without a byte-order mark), UTF-16
or UTF-32 by their byte-order mark, else cp1252 when the file decodes as cp1252 and holds a character
only cp1252 has (curly quotes, dashes, €: bytes 0x80-0x9F), else Latin-1, which decodes any byte.
Anything but UTF-8 is said in a note, since a wrong guess garbles text quietly. A row with more
fields than the header is an error naming its line: pandas would otherwise shift every column
(reading the first field as an index) or drop the extra cells without a word.
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import io
import os
import re
import warnings
from pathlib import Path

import pandas as pd

from clipposter.errors import ClipposterError

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".tsv")

# Longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8-sig", None),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"), (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)
_CP1252_ONLY = re.compile(rb"[\x80-\x9f]")  # printable in cp1252, control codes in Latin-1
_FIELD_COUNT = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def read_table(path: str | os.PathLike, *, encoding: str | None = None,
               notes: list[str] | None = None) -> pd.DataFrame:
    """A CSV/TSV (all cells as text; only empty cells are missing) or Parquet table.

    `encoding` forces the codec of a CSV; without it the codec is detected, and a line saying which
    one was used is appended to `notes` when it is not UTF-8.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise ClipposterError(f"{path}: cannot read as Parquet ({exc}); check the file is a Parquet table") from exc
    if suffix not in CSV_SUFFIXES:
        raise ClipposterError(f"{path}: unsupported table type {suffix or '(none)'}; use .csv, .tsv or .parquet")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ClipposterError(f"{path}: cannot read file: {exc.strerror or exc}") from exc
    text, note = decode_text(data, path, encoding)
    if note is not None and notes is not None:
        notes.append(f"{path}: {note}; pass `encoding` if the text looks wrong")
    return _parse_csv(text, path, "\t" if suffix == ".tsv" else ",")


def decode_text(data: bytes, path: str | os.PathLike, encoding: str | None = None) -> tuple[str, str | None]:
    """The text of a file's bytes and, when it was not UTF-8, a note on the codec used (None for an
    `encoding` given, which is used as it is)."""
    if encoding:
        try:
            codec = codecs.lookup(encoding).name
        except LookupError:
            raise ClipposterError(f"{path}: unknown encoding {encoding!r}; pass a Python codec name as "
                                  f"`encoding` (utf-8, cp1252, latin-1, utf-16)") from None
        if codec == "utf-8" and data.startswith(codecs.BOM_UTF8):
            codec = "utf-8-sig"  # the mark is not text: it would become part of the first column's name
        return _decode(data, path, codec, encoding), None

    for mark, codec, label in _BYTE_ORDER_MARKS:
        if data.startswith(mark):
            return _decode(data, path, codec, label or "UTF-8"), (f"read as {label} (byte-order mark)" if label
                                                                   else None)
    if b"\x00" in data[:4096]:
        raise ClipposterError(f"{path}: holds NUL bytes, as UTF-16 or UTF-32 text without a byte-order mark "
                              f"does; pass its codec as `encoding` (utf-16-le, say)")
    with contextlib.suppress(UnicodeDecodeError):  # not UTF-8: cp1252, else Latin-1 (which decodes any bytes)
        return data.decode("utf-8"), None
    if _CP1252_ONLY.search(data):
        # one of the five bytes cp1252 leaves undefined means it is not cp1252 either
        with contextlib.suppress(UnicodeDecodeError):
            return data.decode("cp1252"), "read as cp1252 (Windows) since it is not valid UTF-8"
    return data.decode("latin-1"), "read as Latin-1 since it is not valid UTF-8"


def _decode(data: bytes, path, codec: str, label: str) -> str:
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ClipposterError(f"{path}: not readable as {label} (byte 0x{data[exc.start]:02x} on line {line}); "
                              f"pass the right `encoding`") from None


def _parse_csv(text: str, path: Path, sep: str) -> pd.DataFrame:
    kind = "TSV" if sep == "\t" else "CSV"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        try:
            # index_col=False: a first row longer than the header must not become an index column.
            table = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, na_values=[""],
                                index_col=False, low_memory=False)
        except pd.errors.EmptyDataError:
            raise ClipposterError(f"{path}: the file is empty; expected a header row and data rows") from None
        except pd.errors.ParserError as exc:
            match = _FIELD_COUNT.search(str(exc))
            if match:
                expected, line, seen = (int(g) for g in match.groups())
                raise ClipposterError(_extra_fields(path, line, seen, expected, sep)) from None
            detail = " ".join(str(exc).split())
            raise ClipposterError(f"{path}: malformed {kind} ({detail}); fix the quoting of that line") from None
    if any(issubclass(w.category, pd.errors.ParserWarning) and "Length of header" in str(w.message)
           for w in caught):
        # pandas warns (and drops the cells) when the first data row is the long one; find it.
        reader = csv.reader(io.StringIO(text), delimiter=sep)
        header = len(next(reader))
        for row in reader:
            if len(row) > header:
                raise ClipposterError(_extra_fields(path, reader.line_num, len(row), header, sep))
        raise ClipposterError(f"{path}: a row has more fields than the header's {header}; quote cells that "
                              f"hold {_separator(sep)}, or remove the extra fields")
    return table


def _separator(sep: str) -> str:
    return "a tab" if sep == "\t" else "a comma"


def _extra_fields(path: Path, line: int, seen: int, expected: int, sep: str) -> str:
    return (f"{path}: line {line} has {seen} fields but the header has {expected}; "
            f"quote cells that hold {_separator(sep)}, or remove the extra fields")
