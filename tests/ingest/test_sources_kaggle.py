"""The Kaggle join keeps every labelled poster by default and says how many had metadata; a Kaggle
folder without poster files says where it looked."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from clipposter.errors import ClipposterError
from clipposter.ingest.sources import SourceStats, from_kaggle, load_source, require_local_images

LABELLED, WITH_METADATA = 10, 6


def kaggle_folder(tmp_path: Path) -> Path:
    """MovieGenre.csv with LABELLED posters; movies_metadata.csv knows the first WITH_METADATA of them."""
    folder = tmp_path / "kaggle"
    folder.mkdir()
    ids = [100000 + i for i in range(LABELLED)]
    pd.DataFrame({"imdbId": ids, "Title": [f"Film {i}" for i in ids], "Genre": ["Drama|War"] * LABELLED,
                  "Poster": [f"https://images.example/{i}.jpg" for i in ids]}).to_csv(folder / "MovieGenre.csv",
                                                                                       index=False)
    pd.DataFrame({"imdb_id": [f"tt0{i}" for i in ids[:WITH_METADATA]],
                  "genres": ["[{'id': 18, 'name': 'Drama'}]"] * WITH_METADATA,
                  "tagline": [f"Tagline {i}" for i in ids[:WITH_METADATA]],
                  "overview": [f"Overview {i}" for i in ids[:WITH_METADATA]],
                  "title": ["x"] * WITH_METADATA}).to_csv(folder / "movies_metadata.csv", index=False)
    return folder


def test_the_default_join_keeps_every_labelled_poster_and_counts_them(tmp_path):
    folder = kaggle_folder(tmp_path)
    stats = SourceStats()
    records = from_kaggle(folder / "MovieGenre.csv", folder / "movies_metadata.csv", stats=stats)
    assert len(records) == LABELLED
    assert [r.tagline is not None for r in records] == [True] * WITH_METADATA + [False] * (LABELLED - WITH_METADATA)
    assert all(r.genres == ["Drama", "War"] for r in records)
    assert stats.join == {"join": "left", "labelled": LABELLED, "with_metadata": WITH_METADATA, "kept": LABELLED}
    assert stats.notes == ["MovieGenre.csv: 10 labelled posters, 6 with metadata in movies_metadata.csv; kept 10 "
                           "(left join: 4 have no tagline or overview)"]
    assert stats.rows_skipped == 0


def test_an_inner_join_drops_posters_without_metadata_and_says_so(tmp_path):
    folder = kaggle_folder(tmp_path)
    stats = SourceStats()
    records = from_kaggle(folder / "MovieGenre.csv", folder / "movies_metadata.csv", join="inner", stats=stats)
    assert len(records) == WITH_METADATA and all(r.tagline for r in records)
    assert stats.join == {"join": "inner", "labelled": LABELLED, "with_metadata": WITH_METADATA,
                          "kept": WITH_METADATA}
    assert stats.notes == ["MovieGenre.csv: 10 labelled posters, 6 with metadata in movies_metadata.csv; kept 6 "
                           "(inner join: 4 without metadata left out; `join` left keeps them)"]
    assert stats.reasons == {"MovieGenre.csv: no metadata match (inner join)": 4}


def test_without_metadata_there_is_no_join_to_count(tmp_path):
    folder = kaggle_folder(tmp_path)
    stats = SourceStats()
    assert len(from_kaggle(folder / "MovieGenre.csv", stats=stats)) == LABELLED
    assert stats.join is None and stats.notes == []


def test_load_source_passes_the_join_and_keeps_all_by_default(tmp_path):
    folder = kaggle_folder(tmp_path)
    assert len(load_source(f"kaggle:{folder}")) == LABELLED
    assert len(load_source(f"kaggle:{folder}", join="inner")) == WITH_METADATA


def test_an_empty_poster_folder_says_where_it_looked_and_how_to_fill_it(tmp_path):
    folder = kaggle_folder(tmp_path)
    (folder / "posters").mkdir()
    spec = f"kaggle:{folder}"
    records = load_source(spec)  # the URLs are still there, for `clipposter download`
    assert all(r.image is None and r.url for r in records)
    with pytest.raises(ClipposterError) as info:
        require_local_images(records, spec)
    assert str(info.value) == (
        f"{spec}: none of the 10 posters has an image file in {folder / 'posters'} (looked for <imdb id>.jpg, "
        f"e.g. tt0100000.jpg); fetch them with `clipposter download {spec} --out {folder / 'posters'}`, "
        f"or pass `download_dir`")


def test_a_source_of_urls_only_suggests_downloading(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a"], "url": ["https://h/a.jpg"]}).to_csv(path, index=False)
    records = load_source(path)
    with pytest.raises(ClipposterError, match=r"none of the 1 posters has a local image file \(only URLs\); "
                                              r"fetch them with `clipposter download .*m\.csv --out DIR`"):
        require_local_images(records, str(path))


def test_one_local_image_is_enough(tmp_path):
    folder = kaggle_folder(tmp_path)
    (folder / "posters").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "posters" / "tt0100003.jpg")
    records = load_source(f"kaggle:{folder}")
    require_local_images(records, f"kaggle:{folder}")  # no error
    assert sum(r.image is not None for r in records) == 1
