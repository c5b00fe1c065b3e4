"""The cell parsers behind every source, seen through the manifest and Kaggle readers users call:
ids taken from file names, ids from Parquet number columns, missing-value markers, column lookup,
split names, IMDb ids and TMDB genre cells."""
import math

import numpy as np
import pandas as pd
import pytest

from clipposter.ingest.sources import _metadata_genres, from_manifest, imdb_id, normalise_split


def _manifest(tmp_path, name="m.csv", **columns):
    path = tmp_path / name
    frame = pd.DataFrame(columns)
    if name.endswith(".csv"):
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("location, expected_id", [
    ("posters/alien.jpg", "alien"),
    ("posters/the.thing.1982.png", "the.thing.1982"),  # only the last suffix goes
    ("posters/.hidden", ".hidden"),  # a dot file has no suffix to drop
    ("posters/noext", "noext"),
    ("C:\\posters\\heat.jpg", "heat"),  # Windows separators in a manifest written on Windows
    ("https://img.example/p/w500/big.jpg?size=2", "big"),  # URL: the path's stem, no query
    ("HTTPS://IMG.EXAMPLE/p/Up.JPG", "Up"),
    ("https://img.example/p/film.tar.gz", "film.tar"),
    ("https://img.example/p/alien/", "alien"),  # a trailing slash: the last path segment
    ("https://img.example/p/REX/", "REX"),
    ("posters/Who?.jpg", "Who?"),  # a local file name is not parsed as a URL
    ("posters/No#1.jpg", "No#1"),
    ("posters/X.jpg", "X"),
])
def test_id_is_the_file_stem_when_the_manifest_has_no_id_column(tmp_path, location, expected_id):
    (record,) = from_manifest(_manifest(tmp_path, image=[location]))
    assert record.id == expected_id
    if location.lower().startswith("http"):
        assert record.url == location and record.image is None


def test_url_without_a_file_name_has_no_id_and_is_skipped(tmp_path):
    from clipposter.ingest.sources import SourceStats

    stats = SourceStats()
    records = from_manifest(_manifest(tmp_path, url=["https://img.example/", "https://img.example/a/b.jpg"]),
                            stats=stats)
    assert [r.id for r in records] == ["b"]
    assert stats.reasons == {"no id": 1}


def test_parquet_number_ids_lose_the_float_suffix_and_missing_cells_are_none(tmp_path):
    path = _manifest(tmp_path, "m.parquet", id=[114709.0, np.nan, 7.5], image=["a.jpg", "b.jpg", "c.jpg"],
                     tagline=[None, "Run.", pd.NA], genres=[["Drama", "War"], None, np.array(["Horror"])])
    records = from_manifest(path)
    assert [r.id for r in records] == ["114709", "b", "7.5"]
    assert [r.tagline for r in records] == [None, "Run.", None]
    assert [r.genres for r in records] == [["Drama", "War"], [], ["Horror"]]


def test_csv_cells_that_look_like_missing_markers_are_text(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,image,title,tagline\nNA,a.jpg,None,nan\n")
    (record,) = from_manifest(path)
    assert (record.id, record.title, record.tagline) == ("NA", "None", "nan")


def test_an_exact_column_name_wins_over_a_case_insensitive_one(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,Image,image, TITLE \na,upper.jpg,lower.jpg,T\n")
    (record,) = from_manifest(path)
    assert record.image.endswith("lower.jpg") and record.title == "T"
    (record,) = from_manifest(path, image_col="Image")
    assert record.image.endswith("upper.jpg")
    (record,) = from_manifest(path, title_col="title")  # no exact match: case and spaces ignored
    assert record.title == "T"


def test_every_split_alias():
    aliases = {"train": "train", "Training": "train", " TRAIN ": "train", "val": "validation",
               "valid": "validation", "validation": "validation", "DEV": "validation", "test": "test",
               "testing": "test"}
    for text, split in aliases.items():
        assert normalise_split(text) == split, text
    for missing in (None, "", "  ", float("nan"), pd.NA):
        assert normalise_split(missing) is None
    with pytest.raises(ValueError, match="^holdout$"):
        normalise_split(" holdout ")


@pytest.mark.parametrize("value, expected", [
    (114709, "tt0114709"), ("0114709", "tt0114709"), ("TT0114709", "tt0114709"), (" tt114709 ", "tt0114709"),
    ("114709.00", "tt0114709"), (114709.0, "tt0114709"), ("123456789", "tt123456789"), ("1", "tt0000001"),
    ("1234567890", None), ("tt0", None), ("0", None), ("tt", None), ("114709x", None), ("11.5", None),
    (None, None), (float("nan"), None), ("", None),
])
def test_imdb_id_forms(value, expected):
    assert imdb_id(value) == expected


@pytest.mark.parametrize("cell, expected", [
    ("[{'id': 16, 'name': 'Animation'}, {'id': 35, 'name': ' Comedy '}]", ["Animation", "Comedy"]),
    ("[]", []),
    ("", []),
    (None, []),
    (float("nan"), []),
    ("[16, 35]", None),  # not dicts
    ("[{'id': 16}]", None),  # no name
    ("[{'id': 16, 'name': 3}]", None),  # a name that is not text
    ("{'id': 16, 'name': 'Animation'}", None),  # not a list
    ("1997-08-20", None),  # a shifted column
    ("[{'id': 16, 'name': 'Animation'}", None),  # cut off
    ("__import__('os').system('true')", None),  # never evaluated
])
def test_tmdb_genre_cells(cell, expected):
    assert _metadata_genres(cell) == expected


def test_missing_values_of_every_kind_give_no_genres_or_text(tmp_path):
    path = _manifest(tmp_path, "m.parquet", id=["a", "b", "c"], image=["a.jpg", "b.jpg", "c.jpg"],
                     title=[None, float("nan"), "  "], genres=[None, None, None])
    records = from_manifest(path)
    assert [r.title for r in records] == [None, None, None] and all(r.genres == [] for r in records)
    assert not any(isinstance(r.title, float) and math.isnan(r.title) for r in records)


def test_missing_cells_of_pandas_string_columns_are_none_not_na_text(tmp_path):
    # Parquet files written from pandas' "string" dtype read back with pd.NA for missing cells.
    path = _manifest(tmp_path, "m.parquet", id=pd.array(["a", "b"], dtype="string"),
                     image=pd.array(["a.jpg", "b.jpg"], dtype="string"),
                     genres=pd.array(["Drama|War", None], dtype="string"),
                     tagline=pd.array([None, "Run."], dtype="string"))
    records = from_manifest(path)
    assert [r.genres for r in records] == [["Drama", "War"], []]
    assert [r.tagline for r in records] == [None, "Run."]


def test_plain_http_images_are_urls(tmp_path):
    (record,) = from_manifest(_manifest(tmp_path, id=["a"], image=["http://img.example/a.jpg"]))
    assert record.url == "http://img.example/a.jpg" and record.image is None
