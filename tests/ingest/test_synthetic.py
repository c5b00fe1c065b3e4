"""Synthetic posters: deterministic, resumable, well-formed, and genre-learnable from pixels."""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipposter.errors import ClipposterError
from clipposter.records import SPLITS, PosterRecord
from clipposter.ingest.sources import MANIFEST_COLUMNS, write_manifest
from clipposter.ingest.synthetic import SYNTHETIC_GENRES, generate_posters


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> list[PosterRecord]:
    # One shared run of 450 posters serves the statistics and the learnability test.
    return generate_posters(tmp_path_factory.mktemp("big"), n=450, seed=0)


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_records(tmp_path):
    a = generate_posters(tmp_path / "a", n=12, seed=3)
    b = generate_posters(tmp_path / "b", n=12, seed=3)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a.keys() == files_b.keys()
    assert files_a == files_b
    assert "manifest.csv" in files_a and len(files_a) == 13
    strip = lambda recs: [{**r.to_dict(), "image": Path(r.image).name} for r in recs]  # noqa: E731
    assert strip(a) == strip(b)

    c = generate_posters(tmp_path / "c", n=12, seed=4)
    files_c = _files(tmp_path / "c")
    assert files_c["manifest.csv"] != files_a["manifest.csv"]
    assert files_c["posters/syn-00000.jpg"] != files_a["posters/syn-00000.jpg"]
    assert strip(c) != strip(a)


def test_rerun_keeps_existing_files_and_records(tmp_path):
    first = generate_posters(tmp_path, n=8, seed=1)
    paths = sorted((tmp_path / "posters").glob("*.jpg")) + [tmp_path / "manifest.csv"]
    before = {p: p.stat().st_mtime_ns for p in paths}
    again = generate_posters(tmp_path, n=8, seed=1)
    assert {p: p.stat().st_mtime_ns for p in paths} == before
    assert [r.to_dict() for r in again] == [r.to_dict() for r in first]


def test_resume_fills_in_missing_posters_only(tmp_path):
    full = generate_posters(tmp_path / "full", n=6, seed=2)
    part = tmp_path / "part"
    generate_posters(part, n=6, seed=2)
    missing = part / "posters" / "syn-00004.jpg"
    missing.unlink()
    kept = part / "posters" / "syn-00001.jpg"
    kept_mtime = kept.stat().st_mtime_ns
    resumed = generate_posters(part, n=6, seed=2)
    assert missing.read_bytes() == Path(full[4].image).read_bytes()
    assert kept.stat().st_mtime_ns == kept_mtime
    assert [r.tagline for r in resumed] == [r.tagline for r in full]


def test_genre_counts_and_frequencies(big):
    records = big[:400]
    for rec in records:
        assert 1 <= len(rec.genres) <= 3
        assert len(set(rec.genres)) == len(rec.genres)
        assert set(rec.genres) <= set(SYNTHETIC_GENRES)
    counts = Counter(g for rec in records for g in rec.genres)
    assert set(counts) == set(SYNTHETIC_GENRES)
    for genre in SYNTHETIC_GENRES:
        assert counts[genre] / len(records) >= 0.08, (genre, counts)
    # Drama and Comedy lead, as in real catalogues.
    assert {g for g, _ in counts.most_common(2)} == {"Drama", "Comedy"}
    sizes = Counter(len(rec.genres) for rec in records)
    assert sizes[1] + sizes[2] > sizes[3] * 3


def test_images_and_manifest(tmp_path):
    records = generate_posters(tmp_path, n=10, seed=0, size=(120, 180))
    for rec in records:
        path = Path(rec.image)
        assert path.is_absolute() and path == tmp_path.resolve() / "posters" / f"{rec.id}.jpg"
        with Image.open(path) as img:
            assert img.format == "JPEG"
            assert img.mode == "RGB"
            assert img.size == (120, 180)
            img.load()
        assert rec.split in SPLITS
        assert rec.title and rec.overview
    assert [r.id for r in records] == [f"syn-{i:05d}" for i in range(10)]

    with open(tmp_path / "manifest.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == MANIFEST_COLUMNS == (
        "id", "image", "genres", "tagline", "overview", "title", "split")
    assert len(rows) == 10
    for row, rec in zip(rows, records):
        assert row["id"] == rec.id
        assert row["image"] == f"posters/{rec.id}.jpg"
        assert (tmp_path / row["image"]).resolve() == Path(rec.image)
        assert row["genres"].split("|") == rec.genres
        assert (row["tagline"], row["overview"], row["title"], row["split"]) == (
            rec.tagline, rec.overview, rec.title, rec.split)
    assert any("|" in row["genres"] for row in rows) or all(len(r.genres) == 1 for r in records)


def test_write_manifest_keeps_outside_paths(tmp_path):
    recs = [PosterRecord(id="x", image=str(tmp_path / "elsewhere" / "x.jpg"), genres=["Drama", "Horror"]),
            PosterRecord(id="y", image=None, genres=[])]
    path = write_manifest(recs, tmp_path / "m" / "manifest.csv")
    rows = list(csv.DictReader(open(path, newline="", encoding="utf-8")))
    assert rows[0]["image"] == str((tmp_path / "elsewhere" / "x.jpg").resolve())
    assert rows[0]["genres"] == "Drama|Horror"
    assert rows[1]["image"] == "" and rows[1]["genres"] == ""


def test_genre_subset_and_bad_genre(tmp_path):
    recs = generate_posters(tmp_path / "sub", n=20, seed=0, genres=("Horror", "Western"))
    assert {g for r in recs for g in r.genres} <= {"Horror", "Western"}
    with pytest.raises(ClipposterError):
        generate_posters(tmp_path / "bad", n=2, genres=("Musical",))


def test_taglines_vary(big):
    taglines = [r.tagline for r in big[:300]]
    assert all(t and t.strip() for t in taglines)
    assert len(set(taglines)) / len(taglines) >= 0.7


def test_genre_learnable_from_pixels(big):
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.multiclass import OneVsRestClassifier
    assert sklearn

    def features(recs):
        out = []
        for rec in recs:
            with Image.open(rec.image) as img:
                out.append(np.asarray(img.convert("RGB").resize((16, 16), Image.BILINEAR), dtype=np.float32)
                           .reshape(-1) / 255.0)
        return np.stack(out)

    def labels(recs):
        return np.array([[g in rec.genres for g in SYNTHETIC_GENRES] for rec in recs], dtype=int)

    train, test = big[:300], big[300:450]
    x_train, y_train, x_test, y_test = features(train), labels(train), features(test), labels(test)
    model = OneVsRestClassifier(LogisticRegression(max_iter=2000)).fit(x_train, y_train)
    probe_f1 = f1_score(y_test, model.predict(x_test), average="micro")

    # Best constant: the k most frequent training genres for every poster, k in 1..3.
    order = np.argsort(-y_train.sum(axis=0), kind="stable")
    baseline = 0.0
    for k in (1, 2, 3):
        const = np.zeros_like(y_test)
        const[:, order[:k]] = 1
        baseline = max(baseline, f1_score(y_test, const, average="micro"))
    assert probe_f1 >= baseline + 0.15, (probe_f1, baseline)
