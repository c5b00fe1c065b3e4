"""The app's handlers without Gradio: importable where Gradio is not, and answering requests from a
stand-in analyzer (so these run without the `app` extra and without a trained model)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clipposter.analysis import PosterAnalysis
from clipposter.app.handlers import AppHandlers, Thumbnails, status_html
from clipposter.errors import ClipposterError, ConfigError
from clipposter.records import PosterRecord

ROOT = Path(__file__).resolve().parents[2]
GENRES = ["Action", "Drama", "Horror"]
EVIL = "<script>alert(1)</script>"


def test_handlers_import_without_gradio():
    # gradio blocked: importing it would fail, so a module-level import anywhere in the chain shows
    code = ("import sys; sys.modules['gradio'] = None\n"
            "import clipposter.app, clipposter.app.handlers\n"
            "heavy = [m for m in ('gradio', 'torch', 'transformers', 'open_clip', 'faiss') if sys.modules.get(m)]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


class StubAnalyzer:
    """The part of PosterAnalyzer the handlers use, answering with fixed analyses."""

    strategies = ("greedy",)
    genres = GENRES

    def __init__(self, image: str):
        self.records = {"p1": PosterRecord(id="p1", image=image, genres=["Drama"], title=EVIL)}

    def sample_ids(self, n):
        return list(self.records)[:n]

    def record(self, poster_id):
        if poster_id not in self.records:
            raise ClipposterError(f"poster id {poster_id!r} is not in the cache")
        return self.records[poster_id]

    def _analysis(self, poster_id, image, source):
        return PosterAnalysis(id=poster_id, image=image, title=EVIL if poster_id else None,
                              genres=["Drama"] if poster_id else [], tagline=None,
                              probabilities={"Action": 0.2, "Drama": 0.7, "Horror": 0.6},
                              predicted=["Drama", "Horror"], taglines=[EVIL], source=source)

    def analyze_ids(self, ids, **kw):
        return [self._analysis(i, self.records[i].image, "cache") for i in ids]

    def analyze_files(self, paths, **kw):
        return [self._analysis(None, p, "encoded") for p in paths]


@pytest.fixture()
def handlers(tmp_path):
    from PIL import Image

    poster = tmp_path / "poster.jpg"
    Image.new("RGB", (60, 90), (200, 30, 30)).save(poster)
    return AppHandlers(StubAnalyzer(str(poster)), max_upload_mb=0.01, samples=1, k=0, num_return=1,
                       thumbnails=Thumbnails(tmp_path / "thumbs"))


def test_an_upload_shows_the_predicted_genres_escaped(handlers, tmp_path):
    upload = tmp_path / "uploads" / "mine.jpg"
    upload.parent.mkdir()
    upload.write_bytes(Path(handlers.analyzer.records["p1"].image).read_bytes())
    view = handlers.analyse_upload(str(upload), "greedy", 1, 0)
    assert view.ok, view.error
    assert view.status.startswith("mine.jpg (encoded now") and view.status.endswith("Predicted genres: Drama, Horror")
    assert view.details["image"] == "mine.jpg"  # never the server's own path
    ticked = [g for g in GENRES if f'<div class="cp-row cp-predicted" data-genre="{g}">' in view.chart_html]
    assert ticked == ["Drama", "Horror"]
    assert EVIL not in view.taglines_html and "&lt;script&gt;alert(1)&lt;/script&gt;" in view.taglines_html


def test_a_sample_title_is_escaped_in_the_status_box(handlers):
    view = handlers.analyse_sample("p1", "greedy", 1, 0)
    assert view.ok and EVIL in view.status  # plain text ...
    shown = status_html(view.status)
    assert EVIL not in shown and "&lt;script&gt;alert(1)&lt;/script&gt;" in shown  # ... escaped in the page
    thumb = Path(view.image)
    assert thumb.parent == handlers.thumbnails.folder and thumb.is_file()
    assert not list(thumb.parent.glob(".*.tmp"))  # written through a temporary file, renamed


def test_bad_requests_are_messages_not_exceptions(handlers, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 20_000)
    view = handlers.analyse_upload(str(big), "greedy", 1, 0)
    assert not view.ok and view.error.startswith("big.jpg: ") and "over the 0.01 MB upload limit" in view.error
    assert "telepathy" in handlers.analyse_sample("p1", "telepathy").error
    assert "not in the cache" in handlers.analyse_sample("nope", "greedy", 1, 0).error
    assert "no poster uploaded" in handlers.analyse_upload(None).error


def test_a_bad_upload_limit_names_the_parameter(tmp_path):
    with pytest.raises(ConfigError, match="max_upload_mb must be positive") as info:
        AppHandlers(StubAnalyzer(str(tmp_path / "x.jpg")), max_upload_mb=0)
    assert info.value.field == "max_upload_mb"
