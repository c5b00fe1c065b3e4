"""The HTML report: what it shows, that it needs nothing outside itself, that user text cannot inject
markup, and the `clipposter report` command.

Render tests use hand-built analyses and evaluation dicts of the real shape (built with the same
metric functions the evaluators use, and checked against the text formatters); the end-to-end tests
reuse the session's `demo_run` folder."""
from __future__ import annotations

import base64
import html as html_module
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipposter.cli.main as cli
from clipposter.analysis import PosterAnalysis
from clipposter.heads.caption.evaluation import CaptionReport
from clipposter.heads.genre.evaluation import format_genre_per_genre, format_genre_table
from clipposter.heads.genre.metrics import genre_scores
from clipposter.report.build import THUMB_WIDTH, build_report, render_report
from clipposter.search.index import Hit
from weights_fixtures import weights_run

pytestmark = pytest.mark.usefixtures("single_torch_thread")

GENRES = ["Action", "Comedy", "Drama", "Horror"]
NOTICE = "pretrained ViT-B-32/openai weights unavailable: using the tiny random backbone clipposter-tiny"


# ------------------------------------------------------------------------------ built data

def _poster(path, colour=(200, 40, 40), size=(300, 450), fmt="JPEG"):
    Image.new("RGB", size, colour).save(path, format=fmt)
    return str(path)


def _genre_eval() -> dict:
    """A genre report shaped like `evaluate_genres`: the head at 0.5 and calibrated thresholds, the
    zero-shot and linear-probe baselines, and the constant top-k baseline, on three splits."""
    rng = np.random.default_rng(0)
    g = len(GENRES)
    labels = {s: (rng.random((n, g)) < 0.4).astype(np.int8) for s, n in (("train", 40), ("validation", 12),
                                                                       ("test", 12))}
    half = np.full(g, 0.5)

    def model(kind, noise, calibrated):
        results = {}
        for setting, t in (("0.5", half), ("calibrated", calibrated)):
            results[setting] = {s: genre_scores(y, np.clip(y * 0.6 + rng.random(y.shape) * noise, 0, 1), t, GENRES)
                                for s, y in labels.items()}
        return {"kind": kind, "thresholds": {"0.5": half.tolist(), "calibrated": list(calibrated)},
                "results": results}

    freq = labels["train"].mean(0)
    order = [int(i) for i in np.argsort(-freq, kind="stable")]
    cut = np.full(g, 2.0)
    cut[order[:2]] = 0.0
    constant = {"kind": "constant", "k": 2, "genres": [GENRES[i] for i in order[:2]],
                "results": {"top-k": {s: genre_scores(y, np.tile(freq, (len(y), 1)), cut, GENRES)
                                      for s, y in labels.items()}}}
    return {"head": {"name": "ml-decoder", "kind": "ml-decoder", "path": "genres", "genres": GENRES,
                     "threshold_mode": "per-genre"},
            "cache": "cache", "backbone": {"model": "clipposter-tiny", "weights": "random-seed0"},
            "posters": {s: len(y) for s, y in labels.items()}, "warnings": [],
            "models": {"ml-decoder": model("ml-decoder", 0.5, [0.41, 0.45, 0.5, 0.55]),
                       "zero-shot": model("zero-shot", 1.0, [0.3] * g),
                       "linear-probe": model("linear-probe", 0.7, [0.4] * g),
                       "constant": constant},
            "per_genre_split": "test"}


def _caption_eval() -> dict:
    systems = {
        "generated": {"cosine": 0.191, "margin": 0.0213, "retrieval": 0.187, "bleu": 1.73, "distinct_1": 0.46,
                      "distinct_2": 0.68, "identical_share": 0.26},
        "chance": {"cosine": 0.176, "margin": 0.0121, "retrieval": 0.13, "bleu": 0.7, "distinct_1": 0.54,
                   "distinct_2": 0.74, "identical_share": 0.043},
        "constant": {"cosine": 0.2391, "margin": -4e-9, "retrieval": 0.087, "bleu": 0.6, "distinct_1": 0.022,
                     "distinct_2": 0.022, "identical_share": 1.0},
    }
    report = CaptionReport(split="test", target="tagline", posters=46, skipped_references=2,
                           decoding={"strategy": "lstm"}, sentence_model="all-MiniLM-L6-v2",
                           scores={"systems": systems,
                                   "references": {"distinct_1": 0.535, "distinct_2": 0.779, "identical_share": 0.0},
                                   "constant_text": "An endless story of forever.", "constant_train_cosine": 0.232,
                                   "retrieval_chance_level": 0.1, "empty_generated": 0},
                           samples=[{"id": "p1", "reference": "r", "generated": "g"}], texts_per_second=269.4)
    return report.to_dict()


@pytest.fixture()
def analyses(tmp_path):
    red = _poster(tmp_path / "red.jpg")
    blue = _poster(tmp_path / "blue.png", (30, 60, 220), size=(600, 900), fmt="PNG")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")

    def probs(*p):
        return dict(zip(GENRES, p))

    return [
        PosterAnalysis(id="tt001", image=red, title="Red Dawn Rising", genres=["Drama", "Comedy"],
                       tagline="Every dawn has a price.", probabilities=probs(0.1, 0.3, 0.9, 0.7),
                       predicted=["Drama", "Horror"], taglines=["A dawn of blood."],
                       neighbours=[Hit("tt002", 0.931, 1, ["Horror"], "Blue Night", blue),
                                   Hit("zz-missing", 0.5, 7, ["Action"], "Gone", str(tmp_path / "gone.jpg"))]),
        PosterAnalysis(id="tt002", image=blue, title="Blue Night", genres=["Horror"], tagline="Stay inside.",
                       probabilities=probs(0.2, 0.1, 0.3, 0.8), predicted=["Horror"],
                       taglines=["Never go out.", "Lock the door."],
                       neighbours=[Hit("tt001", 0.931, 0, ["Drama", "Comedy"], "Red Dawn Rising", red)]),
        PosterAnalysis(id="tt003", image=str(tmp_path / "absent.jpg"), title="No Picture", genres=["Action"],
                       tagline=None, probabilities=probs(0.6, 0.1, 0.1, 0.1), predicted=["Action"],
                       taglines=["Boom."], neighbours=[]),
        PosterAnalysis(id="tt004", image=str(corrupt), title=None, genres=[], tagline="x",
                       probabilities=probs(0.2, 0.6, 0.1, 0.1), predicted=["Comedy"], taglines=[], neighbours=[]),
    ]


HEADER = {"notice": NOTICE, "backbone": "clipposter-tiny (random-seed0, 64px, dim 64)", "lm": "tiny GPT-2",
          "posters": {"train": 40, "validation": 12, "test": 12}, "date": "2026-01-02 03:04"}


def _render(analyses, **kw):
    args = {"genre_eval": _genre_eval(), "caption_eval": _caption_eval(), "header": HEADER, **kw}
    return render_report(analyses, **args)


def _card(html: str, anchor: str) -> str:
    start = html.index(f'id="{anchor}"')
    end = html.find("<article", start)
    return html[start:end if end > 0 else len(html)]


# ------------------------------------------------------------------------------ render tests

def test_evaluation_fixtures_have_the_real_shape():
    # The text formatters of `evaluate genres` / `evaluate captions` read these dicts without error.
    assert "constant" in format_genre_table(_genre_eval())
    assert "linear-probe F1" in format_genre_per_genre(_genre_eval())
    d = _caption_eval()
    assert "constant (best train)" in CaptionReport(**d).format_text()


def test_grid_shows_every_poster_with_genres_taglines_and_neighbours(analyses):
    html = _render(analyses)
    for a in analyses:
        assert a.id in html
        for t in a.taglines:
            assert t in html
        for h in a.neighbours:
            assert h.id in html
    assert "Red Dawn Rising" in html and "Every dawn has a price." in html
    first = _card(html, "p0")
    # true Drama+Comedy, predicted Drama+Horror: Drama correct, Comedy missed, Horror wrong
    assert re.search(r'class="chip ok"[^>]*>✓ Drama<', first)
    assert re.search(r'class="chip miss"[^>]*>○ Comedy<', first)
    assert re.search(r'class="chip wrong"[^>]*>✗ Horror<', first)
    assert "0.90" in first and "0.70" in first  # probability bars of the top genres
    assert 'href="#p1"' in first and "0.931" in first  # a neighbour in the grid links to its card
    second = _card(html, "p1")
    assert "Never go out." in second and "Lock the door." in second and "Stay inside." in second
    # a poster without labels shows its predictions as plain predictions
    assert re.search(r'class="chip pred"[^>]*>Comedy<', _card(html, "p3"))


def test_report_is_self_contained(analyses):
    html = _render(analyses)
    # the only http(s) text is the SVG namespace, which loads nothing
    assert set(re.findall(r"https?://[^\s\"')]+", html)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(script|link|iframe|object|embed)\b", html, re.IGNORECASE)
    assert "@import" not in html and "@font-face" not in html
    srcs = re.findall(r'\bsrc="([^"]*)"', html)
    assert len(srcs) == 2  # the two readable posters
    assert all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    urls = re.findall(r'url\("([^"]*)"\)', html)
    assert urls and all(u.startswith("data:image/jpeg;base64,") for u in urls)
    assert not re.search(r'href="(?!#)', html)  # links only jump inside the page
    for s in srcs:
        img = Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1])))
        assert img.format == "JPEG" and img.width <= THUMB_WIDTH
    assert html.count("<svg") >= 3  # charts are inline SVG


def test_user_text_is_escaped(analyses):
    evil = '<script>alert("x")</script>'
    a = analyses[0]
    a.title = evil
    a.tagline = 'Say "hi" & <b>bye</b>'
    a.taglines = [evil]
    a.neighbours[0].title = '"><img src=x onerror=alert(1)>'
    ge = _genre_eval()
    ge["warnings"] = ["<script>w</script>"]
    html = _render(analyses, genre_eval=ge, header={**HEADER, "source": evil, "notice": "<b>n</b>"})
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert "Say &#34;hi&#34; &amp; &lt;b&gt;bye&lt;/b&gt;" in html
    assert "<img src=x" not in html and "onerror=alert(1)&gt;" in html
    assert "&lt;b&gt;n&lt;/b&gt;" in html


def test_missing_or_unreadable_images_show_a_placeholder(analyses):
    html = _render(analyses)
    assert 'aria-label="no image"' in _card(html, "p2")  # file does not exist
    assert 'aria-label="no image"' in _card(html, "p3")  # not an image
    assert 'class="nimg ph"' in _card(html, "p0")  # neighbour whose file is gone
    assert "<img" in _card(html, "p0") and "<img" in _card(html, "p1")


def test_header_shows_notice_backbone_lm_and_counts(analyses):
    html = _render(analyses)
    notice = re.search(r'<div class="notice" role="alert">(.*?)</div>', html).group(1)
    assert NOTICE in notice
    assert html.index(NOTICE) < html.index('id="posters"')  # at the top, before the grid
    for text in ("clipposter-tiny (random-seed0, 64px, dim 64)", "tiny GPT-2", "train 40", "test 12",
                 "64 in all", "2026-01-02 03:04"):
        assert text in html
    assert 'class="notice"' not in _render(analyses, header={k: v for k, v in HEADER.items() if k != "notice"})


def test_genre_tables_show_every_model_and_baseline(analyses):
    html = _render(analyses)
    section = html[html.index('id="genres"'):html.index('id="charts"')]
    ge = _genre_eval()
    for label in ("ml-decoder (head)", "zero-shot", "linear-probe", "constant top-2"):
        assert label in section
    assert "the best image-blind answer" in section and "How to read" in section
    for name, setting in (("ml-decoder", "calibrated"), ("zero-shot", "calibrated"), ("constant", "top-k")):
        r = ge["models"][name]["results"][setting]["test"]
        assert f"{r['micro']['f1']:.3f}" in section and f"{r['map']:.3f}" in section
    # one row per model x thresholds x split: 2 x 3 for the three heads, 3 for the constant
    table = section[:section.index("Per genre on")]
    assert table.count("<tr>") == 2 + 3 * 6 + 3
    per_genre = section[section.index("Per genre on test"):]
    for g in GENRES:
        assert f"<th>{g}</th>" in per_genre
    assert "zero-shot F1" in per_genre and "constant top-2 F1" in per_genre


def test_caption_table_shows_chance_and_constant(analyses):
    html = _render(analyses)
    section = html[html.index('id="captions"'):]
    for label in ("generated (head)", "chance (random train tagline)", "constant (best train tagline)",
                  "references (for scale)", "retrieval@10", "margin", "BLEU", "identical"):
        assert label in section
    assert "0.191" in section and "+0.021" in section and "0.239" in section and "+0.000" in section
    assert "An endless story of forever." in section and "chance level 0.100" in section
    assert "the best image-blind answer" in section
    assert "2 skipped" in section
    # the page's summary line puts the headline numbers beside their baselines
    glance = html[html.index('class="glance"'):html.index('id="posters"')]
    assert "margin <b>+0.021</b>" in glance and "constant top-2" in glance


def test_charts_compare_the_head_with_baselines(analyses):
    html = _render(analyses)
    charts = html[html.index('id="charts"'):html.index('id="captions"')]
    svgs = re.findall(r"<svg.*?</svg>", charts, re.DOTALL)
    assert len(svgs) == 3
    assert "Per-genre F1 on test" in svgs[0]
    for label in ("ml-decoder (head)", "zero-shot", "linear-probe", "constant top-2"):
        assert label in svgs[0]
    assert all(f">{g}<" in svgs[0] for g in GENRES)
    assert "labelled" in svgs[1] and "predicted by the head" in svgs[1]
    assert "On the 4 posters shown" in svgs[2]


def test_missing_evaluations_say_why(analyses):
    html = render_report(analyses, genre_eval=None, caption_eval=None,
                         header={"skipped": {"captions": "no usable <tagline>"}})
    assert "Not included in this report." in html  # genres: no reason given
    assert "Not included in this report: no usable &lt;tagline&gt;" in html
    assert html.count("<svg") == 1  # only the chart of the posters shown
    assert all(a.id in html for a in analyses)
    empty = render_report([], genre_eval=None, caption_eval=None, header={})
    assert "No posters to show." in empty and "<html" in empty


# ------------------------------------------------------------------------------ end to end

def _main(argv, monkeypatch=None):
    return cli.main([str(a) for a in argv])


def test_build_report_from_a_run(demo_run, tmp_path):
    from clipposter.analysis import PosterAnalyzer

    genre_eval = json.loads((demo_run / "genres" / "evaluation.json").read_text())
    out = tmp_path / "sub" / "r.html"
    with PosterAnalyzer.from_run(demo_run) as analyzer:
        summary = build_report(analyzer, out, limit=5, k=3, genre_eval=genre_eval, evaluate=False,
                               header_extra={"notice": NOTICE})
        ids = analyzer.sample_ids(5, split="test")
        test_ids = {r.id for r in analyzer.cache.records("test")}
        fallback = build_report(analyzer, tmp_path / "all.html", split="no-such-split", limit=2, k=0,
                                evaluate=False)
    assert summary["path"] == str(out) and summary["posters"] == 5 and summary["split"] == "test"
    assert summary["evaluations"] == ["genres"] and "captions" in summary["skipped"]
    html = out.read_text()
    assert summary["bytes"] == len(html.encode())
    assert set(ids) <= test_ids and all(i in html for i in ids)
    assert NOTICE in html and "constant top-" in html
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]  # no temporary file left
    assert fallback["split"] == "all" and fallback["posters"] == 2
    assert "showing posters of every split" in (tmp_path / "all.html").read_text()


def _chips(card: str) -> dict[str, set[str]]:
    found = re.findall(r'<span class="chip (ok|miss|wrong|pred)"[^>]*>(?:[✓○✗] )?([^<]+)</span>', card)
    return {kind: {g for k, g in found if k == kind} for kind in ("ok", "miss", "wrong", "pred")}


def test_report_chips_show_the_genres_at_or_above_the_heads_thresholds(demo_run, tmp_path):
    """Each card's chips: ✓ labelled and predicted, ○ labelled only, ✗ predicted only, where predicted
    means probability >= the threshold saved in the head's config.json, computed here."""
    from clipposter.analysis import PosterAnalyzer
    from clipposter.run import read_run

    cfg = json.loads((Path(read_run(demo_run)["genre_head"]) / "config.json").read_text())
    th = cfg["thresholds"]
    cut = np.asarray(th["per_genre"] if th["mode"] == "per-genre" else [th["global"]] * len(cfg["genres"]))
    out = tmp_path / "r.html"
    with PosterAnalyzer.from_run(demo_run) as analyzer:
        build_report(analyzer, out, split="train", limit=40, k=0, evaluate=False)
        html = out.read_text()
        ids = re.findall(r'<span class="pid">([^<]+)</span>', html)
        records = {r.id: r for r in analyzer.cache.records()}
        probs = analyzer.genre_head.predict_proba(analyzer.cache.embeddings_for_ids(ids))
    assert len(ids) == 40 and analyzer.genre_head.genres == cfg["genres"]
    cards = html.split('<article class="card"')[1:]
    differs_from_half = 0
    for poster_id, card, p in zip(ids, cards, probs):
        assert f'<span class="pid">{poster_id}</span>' in card
        predicted = {g for g, v, t in zip(cfg["genres"], p, cut) if v >= t}
        true = set(records[poster_id].genres)
        chips = _chips(card)
        assert chips == {"ok": true & predicted, "miss": true - predicted, "wrong": predicted - true, "pred": set()}
        assert ('no genre predicted' in card) == (not true and not predicted)
        differs_from_half += predicted != {g for g, v in zip(cfg["genres"], p) if v >= 0.5}
    # the posters tell the saved thresholds from 0.5 apart: a wrong threshold cannot pass
    assert differs_from_half >= 3, differs_from_half


def test_cli_report_of_a_run(demo_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report.html"
    code = _main(["report", "--run", demo_run, "--out", out, "--limit", 6, "-k", 2, "--no-eval", "--json"],
                 monkeypatch)
    stdout, err = capsys.readouterr()
    assert code == 0, err
    payload = json.loads(stdout)
    assert payload["path"] == str(out) and payload["posters"] == 6
    assert payload["evaluations"] == ["genres", "captions"]  # the run's saved evaluations are reused
    html = out.read_text()
    assert "chance (random train tagline)" in html and "zero-shot" in html
    assert len(re.findall(r'<article class="card"', html)) == 6

    code = _main(["report", "--run", demo_run, "--out", tmp_path / "b.html", "--limit", 2, "--no-eval"],
                 monkeypatch)
    stdout, _ = capsys.readouterr()
    assert code == 0 and stdout.splitlines()[0] == str(tmp_path / "b.html")


def test_cli_report_errors_are_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    for argv, needle in (
        (["report", "--run", tmp_path / "empty"], "run.json"),
        (["report", "--cache", tmp_path], "--genre-head, --caption-head missing"),
        (["report"], "pass --run DIR"),
        (["report", "--genre-head", tmp_path], "--cache, --caption-head missing"),
        (["report", "--run", tmp_path / "empty", "--cache", tmp_path], "not both"),
        (["report", "--run", tmp_path / "empty", "--limit", 0], "--limit"),
    ):
        code = _main(argv, monkeypatch)
        stdout, err = capsys.readouterr()
        assert code == 2, argv
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and needle in err, (argv, err)
        assert not stdout


# ------------------------------------------------------------------------------ random weights

CAVEAT = "the scores show that the pipeline works, not how good"
RANDOM_BACKBONE = ("the backbone clipposter-tiny has random weights (random-seed0): " + CAVEAT + " CLIP is")
RANDOM_LM = ("the caption head's language model started from random weights: " + CAVEAT
             + " a pretrained language model is")


def _notice(html: str) -> str | None:
    found = re.search(r'<div class="notice" role="alert"><b>Notice:</b> (.*?)</div>', html, re.S)
    return html_module.unescape(found.group(1)) if found else None


@pytest.mark.parametrize("backbone, lm, expected", [
    ("random", "loaded", RANDOM_BACKBONE),
    ("checkpoint", "random", RANDOM_LM),
    ("random", "random", "the backbone clipposter-tiny has random weights (random-seed0) and the caption head's "
                         "language model started from random weights: " + CAVEAT
                         + " CLIP or a pretrained language model are"),
    ("checkpoint", "loaded", None),
])
def test_cli_report_says_when_the_weights_are_random(tmp_path_factory, synthetic_set, tiny_backbone, tmp_path,
                                                     capsys, backbone, lm, expected):
    """Not only `demo`'s fallback: any cache embedded with `--pretrained random`, or caption head on a
    randomly initialised LM, gets the notice; a backbone loaded from a checkpoint file and an LM of
    trained weights get none (what the cache and the heads record decides, not the architecture)."""
    parts = weights_run(tmp_path_factory, synthetic_set, tiny_backbone, backbone, lm)
    out = tmp_path / "r.html"
    code = _main(["report", "--cache", parts["cache"], "--genre-head", parts["genre_head"], "--caption-head",
                  parts["caption_head"], "--out", out, "--limit", 2, "-k", 0, "--no-eval", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert _notice(out.read_text()) == expected
    assert json.loads(stdout)["notice"] == expected


def test_a_demo_fallback_run_says_it_once(demo_run, tmp_path, capsys):
    """The demo's own notice (why the real weights were not used) already carries the caveat: the
    report shows it, with no second caveat for the same random weights."""
    out = tmp_path / "r.html"
    code = _main(["report", "--run", demo_run, "--out", out, "--limit", 1, "-k", 0, "--no-eval"])
    assert code == 0, capsys.readouterr().err
    notice = _notice(out.read_text())
    run_notice = json.loads((demo_run / "run.json").read_text())["notice"]
    assert notice == run_notice and "gpt2 weights unavailable" in notice
    assert notice.count("the pipeline works") == 1
