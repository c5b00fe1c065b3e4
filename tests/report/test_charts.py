"""The one chart implementation: inline SVG bars whose heights are the values, in the report and as a file."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from clipposter.report.charts import bar_chart, genre_f1_chart, write_genre_f1_chart

SVG = "{http://www.w3.org/2000/svg}"
PLOT_HEIGHT = 190  # pixels of the plot area: a bar of value v on an axis to 1.0 is v * 190 high


def _bars(svg: str) -> dict[str, float]:
    """Bar tooltip ("category · series: value") → drawn height."""
    root = ET.fromstring(svg)
    return {rect.find(f"{SVG}title").text: float(rect.get("height")) for rect in root.iter(f"{SVG}rect")
            if rect.find(f"{SVG}title") is not None}


def _evaluation(split="test"):
    def model(kind, f1s, k=None):
        rows = [{"genre": g, "f1": f, "support": 3, "predicted": 2} for g, f in zip(["Drama", "Horror <x>"], f1s)]
        setting = "top-k" if kind == "constant" else "calibrated"
        return {"kind": kind, "k": k, "results": {setting: {split: {"micro": {"f1": 0.5}, "per_genre": rows}}}}

    return {"head": {"name": "ml-decoder"}, "per_genre_split": split,
            "models": {"ml-decoder": model("ml-decoder", [0.8, 0.25]), "constant": model("constant", [0.5, None], 2)}}


def test_bar_heights_are_the_values():
    svg = bar_chart(["a", "b"], {"x": [0.5, 1.0], "y": [0.1, float("nan")]}, title="t", ylabel="F1", ymax=1.0)
    bars = _bars(svg)
    assert bars == pytest.approx({"a · x: 0.500": 0.5 * PLOT_HEIGHT, "b · x: 1.000": PLOT_HEIGHT,
                                  "a · y: 0.100": 0.1 * PLOT_HEIGHT})
    assert "b · y: n/a" in svg  # a missing value is a dash with its tooltip, not a bar


def test_genre_f1_chart_file_is_standalone_svg(tmp_path):
    path = write_genre_f1_chart(_evaluation(), tmp_path / "eval" / "genres.svg")
    assert path == tmp_path / "eval" / "genres.svg"
    text = path.read_text()
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>') and "<style>" in text
    bars = _bars(text.split("\n", 1)[1])  # parses as XML: user text (a genre name) is escaped
    assert bars == pytest.approx({"Drama · ml-decoder (head): 0.800": 0.8 * PLOT_HEIGHT,
                                  "Horror <x> · ml-decoder (head): 0.250": 0.25 * PLOT_HEIGHT,
                                  "Drama · constant top-2: 0.500": 0.5 * PLOT_HEIGHT})
    assert not list(path.parent.glob(".*.tmp"))
    # the report embeds the same chart, without the file's own styles
    inline = genre_f1_chart(_evaluation())
    assert "<style>" not in inline and _bars(inline) == bars


def test_no_per_genre_split_writes_no_chart(tmp_path):
    assert write_genre_f1_chart(_evaluation(split=None), tmp_path / "c.svg") is None
    assert not (tmp_path / "c.svg").exists()
