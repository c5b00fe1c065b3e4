"""Manifest text as it arrives from spreadsheets: encodings, rows with extra fields, null genres.

A manifest is read as UTF-8 (with or without a byte-order mark), UTF-16 by its byte-order mark, else
cp1252 when it decodes and holds a character only cp1252 has (curly quotes, dashes, €), else Latin-1;
whatever is not plain UTF-8 is said in a note. `encoding` forces one codec.
"""
from __future__ import annotations

import pandas as pd
import pytest

from clipposter.errors import ClipposterError
from clipposter.ingest.sources import SourceStats, from_kaggle, from_manifest

TAGLINE = "\u201cDon\u2019t look back\u201d \u2013 a \u20ac1 film"  # “Don’t look back” – a €1 film
TEXT = f"id,image,tagline,genres\na,a.jpg,{TAGLINE},Drama\nb,b.jpg,Caf\u00e9,Comedy\n"


def write(tmp_path, data: bytes, name: str = "m.csv"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read(path, **kwargs):
    stats = SourceStats()
    records = from_manifest(path, stats=stats, **kwargs)
    return records, stats


@pytest.mark.parametrize("codec, data, note", [
    ("utf-8", TEXT.encode("utf-8"), None),
    ("utf-8 with BOM", b"\xef\xbb\xbf" + TEXT.encode("utf-8"), None),
    ("utf-16 LE with BOM", TEXT.encode("utf-16"), "read as UTF-16 (byte-order mark)"),
    ("utf-16 BE with BOM", b"\xfe\xff" + TEXT.encode("utf-16-be"), "read as UTF-16 (byte-order mark)"),
    ("cp1252", TEXT.encode("cp1252"), "read as cp1252 (Windows) since it is not valid UTF-8"),
], ids=["utf-8", "utf-8-bom", "utf-16le-bom", "utf-16be-bom", "cp1252"])
def test_each_encoding_is_detected_and_named_in_a_note(tmp_path, codec, data, note):
    records, stats = read(write(tmp_path, data))
    assert [r.id for r in records] == ["a", "b"]
    assert records[0].tagline == TAGLINE and records[1].tagline == "Caf\u00e9"
    assert records[0].genres == ["Drama"]
    expected = [f"{tmp_path / 'm.csv'}: {note}; pass `encoding` if the text looks wrong"] if note else []
    assert stats.notes == expected


def test_latin1_without_cp1252_characters_is_read_as_latin1(tmp_path):
    path = write(tmp_path, "id,image,title\nx,x.jpg,Am\u00e9lie \u00bd\n".encode("latin-1"))
    records, stats = read(path)
    assert records[0].title == "Am\u00e9lie \u00bd"
    assert stats.notes == [f"{path}: read as Latin-1 since it is not valid UTF-8; pass `encoding` if the text looks wrong"]


def test_bytes_cp1252_leaves_undefined_fall_back_to_latin1(tmp_path):
    # 0x81 has no cp1252 character: such a file is not cp1252 at all.
    path = write(tmp_path, b"id,image,title\nx,x.jpg,\x93Hi\x94 \x81\n")
    records, stats = read(path)
    assert records[0].title == "\x93Hi\x94 \x81"
    assert "Latin-1" in stats.notes[0]


def test_an_explicit_encoding_wins_and_says_nothing(tmp_path):
    path = write(tmp_path, TEXT.encode("cp1252"))
    records, stats = read(path, encoding="cp1252")
    assert records[0].tagline == TAGLINE and stats.notes == []
    # Latin-1 forced on cp1252 text: what was asked for, C1 characters and all.
    assert read(path, encoding="latin-1")[0][0].tagline.startswith("\x93Don\x92t")


def test_a_wrong_explicit_encoding_names_the_file_the_line_and_the_parameter(tmp_path):
    path = write(tmp_path, ("id,image,title\nx,x.jpg,ok\ny,y.jpg,Am\u00e9lie\n").encode("latin-1"))
    with pytest.raises(ClipposterError) as info:
        from_manifest(path, encoding="utf-8")
    message = str(info.value)
    assert message.startswith(f"{path}: not readable as utf-8 (byte 0xe9 on line 3)")
    assert "`encoding`" in message and "\n" not in message
    with pytest.raises(ClipposterError, match=r"m\.csv: unknown encoding 'klingon'.*`encoding`"):
        from_manifest(path, encoding="klingon")


def test_utf16_without_a_byte_order_mark_is_refused_with_a_hint(tmp_path):
    path = write(tmp_path, TEXT.encode("utf-16-le"))
    with pytest.raises(ClipposterError) as info:
        from_manifest(path)
    message = str(info.value)
    assert str(path) in message and "UTF-16" in message and "`encoding`" in message
    assert from_manifest(path, encoding="utf-16-le")[0].tagline == TAGLINE


def test_kaggle_tables_are_detected_the_same_way(tmp_path):
    genre = tmp_path / "MovieGenre.csv"
    genre.write_bytes(("imdbId,Title,Genre,Poster\n114709,\u201cToy\u201d Story,Animation,https://h/t.jpg\n")
                      .encode("cp1252"))
    stats = SourceStats()
    records = from_kaggle(genre, stats=stats)
    assert records[0].title == "\u201cToy\u201d Story"
    assert len(stats.notes) == 1 and "cp1252" in stats.notes[0]


# --------------------------------------------------------------------------- rows with extra fields

@pytest.mark.parametrize("line", [2, 3])
def test_a_row_with_extra_fields_is_an_error_naming_file_and_line(tmp_path, line):
    rows = ["a,a.jpg,Drama", "b,b.jpg,Comedy"]
    rows[line - 2] += ",EXTRA"
    path = write(tmp_path, ("id,image,genres\n" + "\n".join(rows) + "\n").encode())
    with pytest.raises(ClipposterError) as info:
        from_manifest(path)
    assert str(info.value) == (f"{path}: line {line} has 4 fields but the header has 3; "
                               "quote cells that hold a comma, or remove the extra fields")


def test_a_tsv_row_with_extra_fields_names_the_tab(tmp_path):
    path = write(tmp_path, b"id\timage\na\ta.jpg\tx\n", "m.tsv")
    with pytest.raises(ClipposterError, match=r"m\.tsv: line 2 has 3 fields but the header has 2; quote cells "
                                              r"that hold a tab"):
        from_manifest(path)


def test_short_rows_and_quoted_separators_are_fine(tmp_path):
    path = write(tmp_path, b'id,image,title\na,a.jpg\nb,b.jpg,"Me, Myself"\n')
    records = from_manifest(path)
    assert [(r.id, r.title) for r in records] == [("a", None), ("b", "Me, Myself")]


# --------------------------------------------------------------------------- null genres

def test_null_and_empty_entries_of_a_json_genre_list_are_dropped(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a", "b"], "image": ["a.jpg", "b.jpg"],
                  "genres": ['["Drama", null, "", " ", "Comedy"]', "[null]"]}).to_csv(path, index=False)
    records = from_manifest(path)
    assert [r.genres for r in records] == [["Drama", "Comedy"], []]


def test_null_entries_of_a_parquet_genre_list_are_dropped(tmp_path):
    path = tmp_path / "m.parquet"
    pd.DataFrame({"id": ["a"], "image": ["a.jpg"], "genres": [["Drama", None, "War"]]}).to_parquet(path)
    assert from_manifest(path)[0].genres == ["Drama", "War"]
