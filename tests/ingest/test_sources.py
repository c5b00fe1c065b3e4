"""Sources: folder, manifest (CSV/Parquet), Kaggle tables, dispatch and splits. All data is built in tmp_path."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from clipposter.errors import ClipposterError
from clipposter.records import PosterRecord, assign_splits, split_for
from clipposter.ingest.sources import (SourceStats, from_folder, from_kaggle, from_manifest, imdb_id, load_source,
                                normalise_split)


def _image(path: Path, color=(200, 30, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 12), color).save(path, format=fmt)
    return path


# --------------------------------------------------------------------------- folder

def test_folder_recursive_ids_hidden_and_non_images(tmp_path):
    root = tmp_path / "posters"
    _image(root / "b.jpg")
    _image(root / "a.PNG")
    _image(root / "drama" / "c.jpeg")
    _image(root / "drama" / "deep" / "d.webp", fmt="WEBP")
    _image(root / ".hidden.jpg")
    _image(root / ".cache" / "e.jpg")
    (root / "notes.txt").write_text("not a poster")
    (root / "drama" / "readme.md").write_text("x")

    stats = SourceStats()
    records = from_folder(root, stats=stats)
    assert [r.id for r in records] == ["a", "b", "drama/c", "drama/deep/d"]
    assert all(os.path.isabs(r.image) and Path(r.image).is_file() for r in records)
    assert records[2].image == str((root / "drama" / "c.jpeg").absolute())
    assert stats.reasons == {"not an image file": 2}

    flat = from_folder(root, recursive=False)
    assert [r.id for r in flat] == ["a", "b"]


def test_folder_missing_root_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ClipposterError, match="nope"):
        from_folder(missing)


def test_folder_same_id_twice_is_an_error(tmp_path):
    _image(tmp_path / "x.jpg")
    _image(tmp_path / "x.png")
    with pytest.raises(ClipposterError, match=r"x\.jpg and x\.png"):
        from_folder(tmp_path)


# --------------------------------------------------------------------------- manifest

def test_manifest_csv_all_genre_formats_relative_paths_and_texts(tmp_path):
    _image(tmp_path / "img" / "one.jpg")
    rows = [
        {"id": "m1", "image": "img/one.jpg", "genres": "Action|Drama", "tagline": "  Big.  ", "overview": "",
         "split": "train", "title": "One"},
        {"id": "m2", "image": "img/two.jpg", "genres": "Comedy, Romance", "tagline": "", "overview": "Story.",
         "split": "val", "title": "Two"},
        {"id": "m3", "image": str(tmp_path / "abs.jpg"), "genres": json.dumps(["Horror", "Sci-Fi"]),
         "tagline": "T", "overview": "O", "split": "", "title": ""},
    ]
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)

    records = from_manifest(path)
    by_id = {r.id: r for r in records}
    assert by_id["m1"].genres == ["Action", "Drama"]
    assert by_id["m2"].genres == ["Comedy", "Romance"]
    assert by_id["m3"].genres == ["Horror", "Sci-Fi"]
    assert by_id["m1"].image == str(tmp_path / "img" / "one.jpg")  # relative to the manifest's folder
    assert by_id["m3"].image == str(tmp_path / "abs.jpg")
    assert by_id["m1"].tagline == "Big." and by_id["m1"].overview is None
    assert by_id["m2"].tagline is None and by_id["m3"].title is None
    assert [r.split for r in records] == ["train", "validation", None]


def test_manifest_image_root_overrides_manifest_folder(tmp_path):
    path = tmp_path / "meta" / "m.csv"
    path.parent.mkdir()
    pd.DataFrame({"id": ["a"], "image": ["a.jpg"]}).to_csv(path, index=False)
    root = tmp_path / "images"
    assert from_manifest(path, image_root=root)[0].image == str(root / "a.jpg")
    assert from_manifest(path)[0].image == str(path.parent / "a.jpg")


def test_manifest_parquet_with_list_genres_and_custom_columns(tmp_path):
    table = pd.DataFrame({
        "poster_id": [101, 102],
        "file": ["p/101.jpg", "p/102.jpg"],
        "labels": [["Action", "Thriller"], []],
        "slogan": ["Run.", None],
        "subset": ["valid", "test"],
    })
    path = tmp_path / "m.parquet"
    table.to_parquet(path)
    records = from_manifest(path, id_col="poster_id", image_col="file", genres_col="labels", tagline_col="slogan",
                            split_col="subset")
    assert [r.id for r in records] == ["101", "102"]
    assert records[0].genres == ["Action", "Thriller"] and records[1].genres == []
    assert records[0].tagline == "Run." and records[1].tagline is None
    assert [r.split for r in records] == ["validation", "test"]
    assert records[0].image == str(tmp_path / "p" / "101.jpg")


def test_manifest_latin1_csv_is_read_by_fallback(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("id,image,title\nx,x.jpg,Am\xe9lie\n".encode("latin-1"))
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")
    assert from_manifest(path)[0].title == "Amélie"
    assert from_manifest(path, encoding="latin-1")[0].title == "Amélie"


def test_manifest_tsv_and_id_from_image_stem(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("image\tgenres\nposters/tt001.jpg\tDrama\nhttps://ex.com/img/tt002.png?x=1\tComedy\n")
    records = from_manifest(path)
    assert [r.id for r in records] == ["tt001", "tt002"]
    assert records[1].image is None and records[1].url == "https://ex.com/img/tt002.png?x=1"


def test_manifest_url_only_and_rows_without_location_are_counted(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a", "b"], "url": ["http://h/a.jpg", ""]}).to_csv(path, index=False)
    stats = SourceStats()
    records = from_manifest(path, stats=stats)
    assert [(r.id, r.url, r.image) for r in records] == [("a", "http://h/a.jpg", None)]
    assert stats.rows_read == 2 and stats.rows_skipped == 1 and stats.reasons == {"no image or url": 1}


def test_manifest_without_image_or_url_column_names_the_parameters(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"movie": ["a"], "poster_file": ["a.jpg"]}).to_csv(path, index=False)
    with pytest.raises(ClipposterError) as info:
        from_manifest(path)
    message = str(info.value)
    assert "bad.csv" in message and "'movie'" in message and "'poster_file'" in message
    assert "`image_col`" in message and "`id_col`" in message and "--" not in message
    assert "\n" not in message


def test_manifest_explicit_column_must_exist(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a"], "image": ["a.jpg"]}).to_csv(path, index=False)
    with pytest.raises(ClipposterError, match=r"m\.csv: no column 'labels' for genres .*--genres-col"):
        from_manifest(path, genres_col="labels")
    # A default column that is absent simply means no genres.
    assert from_manifest(path)[0].genres == []


def test_manifest_columns_match_case_insensitively(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"ID": ["a"], "Image": ["a.jpg"], "Genres": ["War"]}).to_csv(path, index=False)
    record = from_manifest(path)[0]
    assert (record.id, record.genres) == ("a", ["War"])


def test_manifest_duplicate_id_is_an_error(tmp_path):
    path = tmp_path / "dup.csv"
    pd.DataFrame({"id": ["a", "b", "a"], "image": ["1.jpg", "2.jpg", "3.jpg"]}).to_csv(path, index=False)
    with pytest.raises(ClipposterError, match=r"dup\.csv: duplicate id 'a' \(line 2 and line 4\)"):
        from_manifest(path)


def test_split_normalisation_and_unknown_split(tmp_path):
    assert [normalise_split(v) for v in ["train", " VAL ", "valid", "Validation", "test", "", None]] == \
        ["train", "validation", "validation", "validation", "test", None, None]
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a", "b"], "image": ["a.jpg", "b.jpg"], "split": ["train", "holdout"]}).to_csv(path, index=False)
    with pytest.raises(ClipposterError, match=r"m\.csv: line 3: unknown split 'holdout'"):
        from_manifest(path)


def test_manifest_missing_and_unsupported_files(tmp_path):
    with pytest.raises(ClipposterError, match="manifest not found"):
        from_manifest(tmp_path / "none.csv")
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(ClipposterError, match="unsupported table type .json"):
        from_manifest(tmp_path / "m.json")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ClipposterError, match="empty"):
        from_manifest(tmp_path / "empty.csv")


# --------------------------------------------------------------------------- Kaggle

MOVIE_GENRE = (
    "imdbId,Imdb Link,Title,IMDB Score,Genre,Poster\n"
    "114709,http://www.imdb.com/title/tt114709,Toy Story (1995),8.3,Animation|Adventure|Comedy,"
    "https://images.example/toy.jpg\n"
    "113497,http://www.imdb.com/title/tt113497,Jumanji (1995),6.9,Action|Adventure|Family,"
    "https://images.example/jumanji.jpg\n"
    "114709,http://www.imdb.com/title/tt114709,Toy Story again,8.3,Drama,https://images.example/dup.jpg\n"
    "211915,http://www.imdb.com/title/tt211915,Le fabuleux destin d'Am\xe9lie Poulain (2001),8.4,Comedy|Romance,"
    "https://images.example/amelie.jpg\n"
    "1234567,http://www.imdb.com/title/tt1234567,No Genre Film (2010),5.0,,https://images.example/none.jpg\n"
    "not-a-number,x,Broken,1,Drama,https://images.example/b.jpg\n"
)

MOVIES_METADATA = [
    {"adult": "False", "genres": "[{'id': 16, 'name': 'Animation'}, {'id': 35, 'name': 'Comedy'}]",
     "id": "862", "imdb_id": "tt0114709", "overview": "Led by Woody, Andy's toys live happily.",
     "tagline": "", "title": "Toy Story"},
    {"adult": "False", "genres": "[{'id': 12, 'name': 'Adventure'}]", "id": "8844", "imdb_id": "tt0113497",
     "overview": "When siblings Judy and Peter discover a board game...", "tagline": "Roll the dice and unleash the excitement!",
     "title": "Jumanji"},
    {"adult": "False", "genres": "[{'id': 35, 'name': 'Comedy'}, {'id': 10749, 'name': 'Romance'}]",
     "id": "194", "imdb_id": "tt0211915", "overview": "Amélie helps people.",
     "tagline": "She'll change your life.", "title": "Amélie"},
    {"adult": "False", "genres": "[{'id': 18, 'name': 'Drama'}]", "id": "999", "imdb_id": "tt9999999",
     "overview": "A film nobody postered.", "tagline": "Unmatched.", "title": "Lonely"},
    # Shifted columns as in the real file: a date where the id should be.
    {"adult": " - Written by Ørnås", "genres": "1997-08-20", "id": "1997-08-20", "imdb_id": "0",
     "overview": "", "tagline": "", "title": ""},
    # A real-looking id but genres that are not a list of dicts.
    {"adult": "False", "genres": "[16, 35]", "id": "5", "imdb_id": "tt0000005", "overview": "x",
     "tagline": "y", "title": "z"},
]


@pytest.fixture
def kaggle_dir(tmp_path) -> Path:
    folder = tmp_path / "kaggle"
    folder.mkdir()
    (folder / "MovieGenre.csv").write_bytes(MOVIE_GENRE.encode("latin-1"))
    pd.DataFrame(MOVIES_METADATA).to_csv(folder / "movies_metadata.csv", index=False)
    return folder


def test_imdb_id_normalisation():
    assert imdb_id(114709) == "tt0114709"
    assert imdb_id("114709") == "tt0114709"
    assert imdb_id("tt0114709") == "tt0114709"
    assert imdb_id(114709.0) == "tt0114709"
    assert imdb_id("12345678") == "tt12345678"
    assert imdb_id("1997-08-20") is None and imdb_id("0") is None and imdb_id(None) is None


def test_kaggle_inner_join(kaggle_dir):
    stats = SourceStats()
    records = from_kaggle(kaggle_dir / "MovieGenre.csv", kaggle_dir / "movies_metadata.csv", join="inner",
                          stats=stats)
    by_id = {r.id: r for r in records}
    assert list(by_id) == ["tt0114709", "tt0113497", "tt0211915"]
    toy = by_id["tt0114709"]
    assert toy.genres == ["Animation", "Adventure", "Comedy"]  # IMDb genres from MovieGenre, first row kept
    assert toy.title == "Toy Story (1995)" and toy.url == "https://images.example/toy.jpg"
    assert toy.tagline is None and toy.overview.startswith("Led by Woody")
    assert by_id["tt0113497"].tagline == "Roll the dice and unleash the excitement!"
    assert by_id["tt0211915"].title == "Le fabuleux destin d'Amélie Poulain (2001)"
    assert all(r.image is None for r in records)

    assert stats.rows_read == 6 + 6
    assert stats.reasons == {
        "MovieGenre.csv: duplicate imdbId": 1,
        "MovieGenre.csv: bad imdbId": 1,
        "MovieGenre.csv: no metadata match (inner join)": 1,  # tt1234567
        "movies_metadata.csv: malformed imdb_id": 1,
        "movies_metadata.csv: malformed genres": 1,
    }
    assert stats.rows_skipped == 5


def test_kaggle_left_join_keeps_posters_without_metadata(kaggle_dir):
    records = from_kaggle(kaggle_dir / "MovieGenre.csv", kaggle_dir / "movies_metadata.csv", join="left")
    by_id = {r.id: r for r in records}
    assert list(by_id) == ["tt0114709", "tt0113497", "tt0211915", "tt1234567"]
    lonely = by_id["tt1234567"]
    assert lonely.genres == [] and lonely.tagline is None and lonely.overview is None
    assert lonely.url == "https://images.example/none.jpg"


def test_kaggle_movie_genre_only(kaggle_dir):
    stats = SourceStats()
    records = from_kaggle(kaggle_dir / "MovieGenre.csv", stats=stats)
    assert len(records) == 4
    assert all(r.tagline is None and r.overview is None for r in records)
    assert stats.rows_read == 6 and stats.rows_skipped == 2


def test_kaggle_poster_dir(kaggle_dir):
    posters = kaggle_dir / "posters"
    _image(posters / "tt0114709.jpg")
    _image(posters / "tt0113497.png")
    records = from_kaggle(kaggle_dir / "MovieGenre.csv", kaggle_dir / "movies_metadata.csv", poster_dir=posters)
    by_id = {r.id: r for r in records}
    assert by_id["tt0114709"].image == str(posters / "tt0114709.jpg")
    assert by_id["tt0113497"].image == str(posters / "tt0113497.png")
    assert by_id["tt0211915"].image is None and by_id["tt0211915"].url == "https://images.example/amelie.jpg"


def test_kaggle_errors(kaggle_dir, tmp_path):
    with pytest.raises(ClipposterError, match="unknown join 'outer'"):
        from_kaggle(kaggle_dir / "MovieGenre.csv", join="outer")
    wrong = tmp_path / "wrong.csv"
    pd.DataFrame({"id": [1], "Genre": ["Drama"]}).to_csv(wrong, index=False)
    with pytest.raises(ClipposterError, match=r"wrong\.csv: missing column\(s\) imdbId, Poster"):
        from_kaggle(wrong)


# --------------------------------------------------------------------------- load_source

def test_load_source_dispatch(tmp_path, kaggle_dir):
    folder = tmp_path / "folder"
    _image(folder / "a.jpg")
    assert [r.id for r in load_source(folder)] == ["a"]

    manifest = tmp_path / "m.csv"
    pd.DataFrame({"poster": ["a"], "image": ["folder/a.jpg"]}).to_csv(manifest, index=False)
    records = load_source(manifest, id_col="poster", recursive=True, join=None)
    assert [r.id for r in records] == ["a"] and records[0].split in ("train", "validation", "test")

    assert len(load_source(kaggle_dir / "MovieGenre.csv")) == 4  # MovieGenre.csv alone: no metadata join

    _image(kaggle_dir / "posters" / "tt0113497.jpg")
    stats = SourceStats()
    records = load_source(f"kaggle:{kaggle_dir}", stats=stats)
    by_id = {r.id: r for r in records}
    # the metadata joined by default, every labelled poster kept (tt1234567 has no metadata row)
    assert list(by_id) == ["tt0114709", "tt0113497", "tt0211915", "tt1234567"]
    assert by_id["tt0113497"].image == str(kaggle_dir / "posters" / "tt0113497.jpg")
    assert by_id["tt0113497"].tagline == "Roll the dice and unleash the excitement!"
    assert stats.rows_skipped == 4


def test_load_source_errors(tmp_path):
    with pytest.raises(ClipposterError, match="no such file or folder.*kaggle:DIR"):
        load_source(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ClipposterError, match="not a poster source"):
        load_source(tmp_path / "notes.txt")
    with pytest.raises(ClipposterError, match="kaggle:"):
        load_source(f"kaggle:{tmp_path / 'nothing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipposterError, match="no posters found"):
        load_source(tmp_path / "empty")
    with pytest.raises(TypeError, match="bogus"):
        load_source(tmp_path, bogus=1)


def test_load_source_keeps_given_splits_and_seeds_the_rest(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a", "b"], "image": ["a.jpg", "b.jpg"], "split": ["test", ""]}).to_csv(path, index=False)
    records = load_source(path, seed=3)
    assert records[0].split == "test"
    assert records[1].split == split_for("b", seed=3)


# --------------------------------------------------------------------------- splits

def test_splits_deterministic_stable_and_roughly_80_10_10():
    ids = [f"tt{i:07d}" for i in range(2000)]
    first = {r.id: r.split for r in assign_splits([PosterRecord(id=i) for i in ids], seed=0)}
    again = {r.id: r.split for r in assign_splits([PosterRecord(id=i) for i in reversed(ids)], seed=0)}
    assert first == again

    grown = ids + [f"new{i}" for i in range(500)]
    grown_splits = {r.id: r.split for r in assign_splits([PosterRecord(id=i) for i in grown], seed=0)}
    assert all(grown_splits[i] == first[i] for i in ids)

    counts = Counter(first.values())
    assert 1520 <= counts["train"] <= 1680
    assert 140 <= counts["validation"] <= 260
    assert 140 <= counts["test"] <= 260

    other_seed = {r.id: r.split for r in assign_splits([PosterRecord(id=i) for i in ids], seed=1)}
    assert other_seed != first
