"""`clipposter report`: one self-contained HTML file about a set of posters and the heads' scores.

The file holds a poster grid (true vs predicted genres with their probabilities, generated taglines
beside the reference, each poster's nearest neighbours), the genre and caption evaluation tables
with their baselines, and per-genre charts. It needs nothing outside itself: thumbnails are JPEG
data URIs, charts are inline SVG, styles are inline CSS, and there is no script, font or remote
resource, so it can be mailed, archived or opened offline.

Every score is printed beside the baseline that makes it readable (the constant image-blind answer,
chance, the zero-shot and linear-probe heads), and a run made with random weights says so at the top.

This module gathers the data: `report_context` turns analyses and evaluation dicts into the plain
values the templates (`report/templates/*.html.j2`, rendered by `report.render` with autoescaping)
print, `render_report` renders them, and `build_report` picks the posters, runs the analyzer and
(optionally) the evaluations, renders, and writes the file atomically. Charts come from `report.charts`.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from clipposter.analysis import random_weights_notice, with_weights_notice
from clipposter.errors import ClipposterError, ConfigError, PosterError
from clipposter.files import atomic_write_bytes
from clipposter.report.charts import (CHART_CSS, HEAD_COLOUR, bar_chart, compared_setting, genre_f1_chart,
                                      model_label)
from clipposter.report.render import render, trusted

log = logging.getLogger(__name__)

THUMB_WIDTH = 160  # poster thumbnails in the grid (pixels of the embedded JPEG)
NEIGHBOUR_WIDTH = 64  # neighbour thumbnails
JPEG_QUALITY = 78
TOP_GENRES = 5  # probability bars per poster
SPLIT_ORDER = ("train", "validation", "test")

MODEL_NOTES = {
    "zero-shot": "CLIP similarity to the genre prompts, no training",
    "linear-probe": "one logistic regression per genre on the same embeddings",
    "constant": "the k most frequent training genres for every poster: the best image-blind answer",
}
# Caption table columns: (key in the scores, heading, digits, signed).
CAPTION_COLUMNS = (("cosine", "cosine", 3, False), ("margin", "margin", 3, True),
                   ("retrieval", "retrieval@10", 3, False), ("bleu", "BLEU", 1, False),
                   ("distinct_1", "distinct-1", 3, False), ("distinct_2", "distinct-2", 3, False),
                   ("identical_share", "identical", 3, False))
CAPTION_SYSTEMS = {"generated": "generated (head)", "chance": "chance (random train tagline)",
                   "constant": "constant (best train tagline)"}
HEADER_KEYS = (("backbone", "backbone"), ("lm", "language model"), ("posters", "posters"),
               ("source", "source"), ("shown", "shown"), ("strategy", "decoding"),
               ("genre_head", "genre head"), ("caption_head", "caption head"), ("cache", "cache"),
               ("run", "run"), ("date", "date"))
HEADER_SPECIAL = {"title", "notice", "notes", "skipped"}


def _as_dict(report: Any) -> dict | None:
    """Evaluation reports may come as dicts or as objects with to_dict() (CaptionReport)."""
    if report is None:
        return None
    if hasattr(report, "to_dict"):
        return report.to_dict()
    return dict(report)


def _split_key(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else 9, str(split))


class Thumbnails:
    """Poster files → small JPEG data URIs, each file and width encoded once; None when unusable."""

    def __init__(self):
        self._done: dict[tuple[str, int], str | None] = {}
        self._classes: dict[str, str] = {}  # data URI -> CSS class (neighbours repeat: each is stored once)

    def css_class(self, path: str | os.PathLike | None, width: int) -> str | None:
        """A CSS class whose background is the thumbnail, so a poster shown many times is embedded once."""
        uri = self.uri(path, width)
        if uri is None:
            return None
        if uri not in self._classes:
            self._classes[uri] = f"t{len(self._classes)}"
        return self._classes[uri]

    def css(self) -> str:
        return "".join(f'.{c}{{background-image:url("{u}")}}' for u, c in self._classes.items())

    def uri(self, path: str | os.PathLike | None, width: int) -> str | None:
        if not path:
            return None
        key = (str(path), width)
        if key not in self._done:
            self._done[key] = self._encode(str(path), width)
        return self._done[key]

    @staticmethod
    def _encode(path: str, width: int) -> str | None:
        from PIL import Image

        from clipposter.ingest.images import load_poster

        try:
            img = load_poster(path, draft_size=width)
            w, h = img.size
            # Posters are tall; cap extreme aspect ratios so a strip image cannot blow up the grid.
            new_w = min(width, w)
            new_h = max(1, min(round(h * new_w / w), 3 * width))
            img = img.resize((new_w, new_h), Image.LANCZOS)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        except PosterError as exc:
            log.info("report: no thumbnail for %s (%s)", path, exc.reason)
            return None
        except Exception as exc:  # a thumbnail is decoration: any failure shows the placeholder
            log.info("report: no thumbnail for %s (%s)", path, exc)
            return None
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------- evaluations

def genre_headline(report: Mapping) -> dict | None:
    """Micro-F1 and mAP of the head and of each baseline on the per-genre split."""
    split = report.get("per_genre_split")
    if not split:
        return None
    head_name = report.get("head", {}).get("name")
    parts = []
    for name, model in report.get("models", {}).items():
        r = compared_setting(model)[1].get(split)
        if r:
            parts.append({"label": model_label(name, model, head_name), "f1": r["micro"]["f1"], "map": r.get("map")})
    return {"split": split, "parts": parts} if parts else None


def _genre_tables(report: Mapping) -> dict:
    """The genre section: one table body per model (thresholds x split rows) and the per-genre table."""
    head_name = report.get("head", {}).get("name")
    models = report.get("models", {})
    bodies = []
    for name, model in models.items():
        rows = []
        for setting, by_split in model.get("results", {}).items():
            label = setting if setting != "top-k" else f"top-{model.get('k')}"
            for split in sorted(by_split, key=_split_key):
                rows.append({"setting": label, "split": split, "scores": by_split[split]})
        if rows:
            bodies.append({"main": name == head_name, "label": model_label(name, model, head_name),
                           "genres": model.get("genres"), "rows": rows})
    notes = {k: v for k, v in MODEL_NOTES.items() if any(n == k or m.get("kind") == k for n, m in models.items())}
    return {"notes": notes, "posters": report.get("posters"), "warnings": report.get("warnings") or [],
            "bodies": bodies, "per_genre": _per_genre_table(report)}


def _per_genre_table(report: Mapping) -> dict:
    split = report.get("per_genre_split")
    head_name = report.get("head", {}).get("name")
    models = report.get("models", {})
    if not split or head_name not in models:
        return {"missing": "No labelled validation or test posters: no per-genre table."}
    main_rows = (models[head_name].get("results", {}).get("calibrated", {}) or {}).get(split)
    if not main_rows:
        return {"missing": "No per-genre scores for the head."}
    others = []
    for name, model in models.items():
        if name != head_name and compared_setting(model)[1].get(split):
            others.append((model_label(name, model, head_name), compared_setting(model)[1][split]["per_genre"]))
    rows = []
    for g, r in enumerate(main_rows["per_genre"]):
        f1s = [r.get("f1")] + [o[g].get("f1") if g < len(o) else None for _, o in others]
        best = max((v for v in f1s if v is not None), default=None)
        rows.append({**r, "f1s": [(v, best is not None and v is not None and abs(v - best) < 1e-12 and best > 0)
                                  for v in f1s]})
    return {"split": split, "others": [label for label, _ in others], "rows": rows}


def _genre_charts(report: Mapping | None, analyses: Sequence) -> list[str]:
    charts = []
    f1 = genre_f1_chart(report) if report else None
    if f1 is not None:
        split = report["per_genre_split"]
        rows = report["models"][report["head"]["name"]]["results"]["calibrated"][split]["per_genre"]
        charts.append(f1)
        charts.append(bar_chart(
            [row["genre"] for row in rows], {"labelled": [row.get("support") for row in rows],
                                            "predicted by the head": [row.get("predicted") for row in rows]},
            title=f"Posters per genre on {split}: labelled vs predicted by the head",
            ylabel="posters", colours={"labelled": "#64748b", "predicted by the head": HEAD_COLOUR},
            value_digits=0))
    shown = [a for a in analyses if getattr(a, "probabilities", None)]
    if shown:
        genres = list(shown[0].probabilities)
        series = {"mean predicted probability": [sum(a.probabilities.get(g, 0.0) for a in shown) / len(shown)
                                                 for g in genres]}
        labelled = [a for a in shown if a.genres]
        if labelled:
            series["share labelled"] = [sum(g in a.genres for a in labelled) / len(labelled) for g in genres]
        series["share predicted"] = [sum(g in (a.predicted or []) for a in shown) / len(shown) for g in genres]
        charts.append(bar_chart(
            genres, series, ylabel="share of posters", ymax=1.0,
            title=f"On the {len(shown)} posters shown: probabilities vs labels",
            colours={"mean predicted probability": "#93c5fd", "share labelled": "#64748b",
                     "share predicted": HEAD_COLOUR}))
    return charts


# ----------------------------------------------------------------------------------- posters

def _chips(true: Sequence[str], predicted: Sequence[str]) -> list[tuple[str, str, str]]:
    """(CSS kind, tooltip, text) per genre chip: ✓ correct, ○ missed, ✗ wrong, or plain predictions."""
    pred = set(predicted)
    if not true:
        return [("pred", "predicted (no labels known)", g) for g in predicted]
    return ([("ok", "labelled and predicted", f"✓ {g}") if g in pred else ("miss", "labelled, not predicted", f"○ {g}")
             for g in true]
            + [("wrong", "predicted, not labelled", f"✗ {g}") for g in predicted if g not in true])


def _bars(a, thresholds: Mapping[str, float] | None) -> list[dict]:
    probs = getattr(a, "probabilities", None) or {}
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])[:TOP_GENRES]
    pred, true = set(a.predicted or []), set(a.genres or [])
    return [{"genre": g, "p": float(p), "on": g in pred, "true": g in true,
             "threshold": None if (thresholds or {}).get(g) is None else float(thresholds[g])}
            for g, p in ranked]


def _card(a, index: int, anchors: Mapping[str, str], thumbs: Thumbnails,
          thresholds: Mapping[str, float] | None) -> dict:
    pid = a.id if a.id is not None else os.path.basename(str(a.image or "")) or f"poster {index + 1}"
    neighbours = []
    for h in getattr(a, "neighbours", None) or []:
        genres = getattr(h, "genres", None) or []
        tip = " · ".join(x for x in (h.id, getattr(h, "title", None), ", ".join(genres),
                                      f"cosine {float(h.score):.3f}") if x)
        neighbours.append({"id": h.id, "score": float(h.score), "tip": tip, "anchor": anchors.get(h.id),
                           "shared": bool(set(genres) & set(a.genres or [])),
                           "css": thumbs.css_class(getattr(h, "image", None), NEIGHBOUR_WIDTH)})
    source = getattr(a, "source", "cache")
    return {"anchor": anchors.get(a.id) if a.id is not None else None, "pid": pid, "title": a.title,
            "label": a.title or pid, "uri": thumbs.uri(a.image, THUMB_WIDTH),
            "file": os.path.basename(str(a.image or "")), "source": source if source != "cache" else None,
            "chips": _chips(a.genres or [], a.predicted or []), "bars": _bars(a, thresholds),
            "taglines": list(getattr(a, "taglines", None) or []), "reference": getattr(a, "tagline", None),
            "neighbours": neighbours}


def _grid_summary(analyses: Sequence) -> dict | None:
    labelled = [a for a in analyses if a.genres]
    if not labelled:
        return None
    gens = [a.taglines[0] for a in analyses if getattr(a, "taglines", None)]
    distinct = len({t.strip().lower() for t in gens})
    return {"labelled": len(labelled),
            "ok": sum(len(set(a.genres) & set(a.predicted or [])) for a in labelled),
            "missed": sum(len(set(a.genres) - set(a.predicted or [])) for a in labelled),
            "wrong": sum(len(set(a.predicted or []) - set(a.genres)) for a in labelled),
            "exact": sum(set(a.genres) == set(a.predicted or []) for a in labelled),
            "generated": len(gens), "distinct": distinct, "repeated": len(gens) - distinct}


# ------------------------------------------------------------------------------------ header

def _header_value(key: str, value: Any) -> str:
    if key == "posters" and isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: _split_key(kv[0]))
        total = sum(int(v) for _, v in items if isinstance(v, (int, float)))
        return " · ".join(f"{k} {v}" for k, v in items) + f" ({total} in all)"
    if key == "backbone" and isinstance(value, Mapping):
        return f"{value.get('model')} ({value.get('weights')})"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _header_rows(header: Mapping) -> list[tuple[str, str]]:
    rows, seen = [], set(HEADER_SPECIAL)
    for key, label in HEADER_KEYS:
        seen.add(key)
        if header.get(key) not in (None, "", {}, []):
            rows.append((label, _header_value(key, header[key])))
    for key, value in header.items():
        if key not in seen and value not in (None, "", {}, []):
            rows.append((key.replace("_", " "), _header_value(key, value)))
    return rows


# ------------------------------------------------------------------------------------ render

def report_context(analyses: Sequence, *, genre_eval: Mapping | None, caption_eval: Mapping | Any | None,
                   header: Mapping, thresholds: Mapping[str, float] | None = None) -> dict:
    """Everything `report.html.j2` prints, as plain values (see `render_report` for the arguments)."""
    from clipposter import __version__

    genre_eval = _as_dict(genre_eval)
    caption_eval = _as_dict(caption_eval)
    header = dict(header or {})
    header.setdefault("date", time.strftime("%Y-%m-%d %H:%M"))
    if thresholds is None and genre_eval:
        name = genre_eval.get("head", {}).get("name")
        cal = (genre_eval.get("models", {}).get(name, {}).get("thresholds") or {}).get("calibrated")
        genres = genre_eval.get("head", {}).get("genres")
        if cal and genres and len(cal) == len(genres):
            thresholds = dict(zip(genres, cal))
    analyses = list(analyses)
    thumbs = Thumbnails()
    anchors = {a.id: f"p{i}" for i, a in enumerate(analyses) if a.id is not None}
    cards = [_card(a, i, anchors, thumbs, thresholds) for i, a in enumerate(analyses)]
    return {
        "title": header.get("title") or "clipposter report", "notice": header.get("notice"),
        "header_rows": _header_rows(header), "notes": list(header.get("notes") or []),
        "skipped": dict(header.get("skipped") or {}), "date": header["date"], "version": __version__,
        "genre_headline": genre_headline(genre_eval) if genre_eval else None,
        "caption_eval": caption_eval, "caption_columns": CAPTION_COLUMNS, "caption_systems": CAPTION_SYSTEMS,
        "genre": _genre_tables(genre_eval) if genre_eval else None,
        "cards": cards, "summary": _grid_summary(analyses), "top_genres": TOP_GENRES,
        "charts": [trusted(c) for c in _genre_charts(genre_eval, analyses)],
        "thumbnail_css": trusted(thumbs.css()), "chart_css": trusted(CHART_CSS),
    }


def render_report(analyses: Sequence, *, genre_eval: Mapping | None, caption_eval: Mapping | Any | None,
                  header: Mapping, thresholds: Mapping[str, float] | None = None) -> str:
    """One self-contained HTML page about `analyses` (PosterAnalysis-like objects) and the evaluations.

    genre_eval: the dict of `heads.genre.evaluate_genres` (or its saved JSON); caption_eval: the dict of
    `CaptionReport.to_dict()` (or the report itself); either may be None (its section says so).
    header: shown at the top — `title`, `notice` (a prominent warning line, e.g. random weights),
    `backbone`, `lm`, `posters` (a split → count dict or a number), `source`, `shown`, `strategy`,
    `date`, `notes` (warning lines), `skipped` ({"genres"|"captions": why an evaluation is missing}),
    and any other key as a plain row. thresholds: genre → the head's threshold, drawn on the
    probability bars (default: the head's calibrated thresholds in genre_eval, when given).
    """
    return render("report.html.j2", **report_context(analyses, genre_eval=genre_eval, caption_eval=caption_eval,
                                                     header=header, thresholds=thresholds))


# ------------------------------------------------------------------------------------- build

def build_report(analyzer, out_path: str | os.PathLike, *, split: str = "test", limit: int = 60, k: int = 5,
                 strategy: str = "lstm", genre_eval: Mapping | None = None, caption_eval: Mapping | Any | None = None,
                 evaluate: bool = True, sentence_model: str = "all-MiniLM-L6-v2",
                 header_extra: Mapping | None = None, progress: bool = False) -> dict:
    """Analyse up to `limit` posters of `split` (all posters when the split has none), evaluate the heads
    when no evaluation is given and `evaluate` is true, render, and write `out_path` atomically.

    A missing evaluation does not stop the report: its section says why. Returns a summary:
    {"path", "posters", "bytes", "split", "notice", "evaluations": [...], "skipped": {...}}. The notice
    (shown at the top) is the run's own, with one added when the backbone or the caption head's LM
    has random weights."""
    if limit < 1:
        raise ConfigError("limit", f"must be at least 1, got {limit}")
    if k < 0:
        raise ConfigError("k", f"must be zero or more, got {k}")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ClipposterError(f"{out_path}: is a folder; give a file name such as {out_path / 'report.html'}")
    cache = analyzer.cache
    notes: list[str] = []
    in_split = cache.records(split)
    shown_split = split if in_split else None
    if not in_split:
        notes.append(f"the cache has no posters in split {split!r}: showing posters of every split")
    elif split == "train":
        notes.append("these posters are from the training split: the heads were trained on them, so their "
                     "predictions look better than on unseen posters")
    ids = analyzer.sample_ids(limit, split=shown_split)
    analyses = analyzer.analyze_ids(ids, strategy=strategy, num_return=1, k=k)

    skipped: dict[str, str] = {}
    off = "evaluation turned off and no saved evaluation given"
    if genre_eval is None:
        if evaluate:
            from clipposter.heads.genre.evaluation import evaluate_genres

            try:
                genre_eval = evaluate_genres(analyzer.genre_head, cache, progress=progress)
            except ClipposterError as exc:
                skipped["genres"] = str(exc)
        else:
            skipped["genres"] = off
    if caption_eval is None:
        if evaluate:
            from clipposter.heads.caption.decoding import decoding_preset
            from clipposter.heads.caption.evaluation import evaluate_captions, load_sentence_scorer

            eval_split = split if in_split else ("test" if cache.records("test") else "validation")
            try:
                caption_eval = evaluate_captions(analyzer.caption_head, cache, split=eval_split,
                                                 decoding=decoding_preset(strategy),
                                                 scorer=load_sentence_scorer(sentence_model),
                                                 progress=progress).to_dict()
            except ClipposterError as exc:
                skipped["captions"] = str(exc)
        else:
            skipped["captions"] = off

    info = dict(getattr(analyzer, "run_info", None) or {})
    identity = cache.identity
    caption_cfg = getattr(analyzer.caption_head, "config", None)
    genre_head = analyzer.genre_head
    header: dict = {
        "title": "clipposter report",
        "notice": info.get("notice"),
        "backbone": info.get("backbone") or identity.describe(),
        "lm": info.get("lm") or getattr(caption_cfg, "lm_source", None),
        "posters": cache.info().splits,
        "source": info.get("source"),
        "shown": f"{len(analyses)} posters " + (f"of split {split}" if shown_split else "(all splits)"),
        "strategy": strategy,
        "genre_head": (f"{genre_head.kind}, {len(genre_head.genres)} genres, "
                       f"thresholds {genre_head.thresholds['mode']}"),
        "caption_head": (f"{caption_cfg.mapper} prefix ({caption_cfg.prefix_length} tokens), {caption_cfg.mode}, "
                         f"target {caption_cfg.target}") if caption_cfg is not None else None,
        "run": info.get("run_dir"),
    }
    header.update(header_extra or {})
    header["notice"] = with_weights_notice(header.get("notice"), random_weights_notice(identity, caption_cfg))
    header["notes"] = list(header.get("notes") or []) + notes
    header["skipped"] = {**skipped, **dict(header.get("skipped") or {})}
    thresholds = dict(zip(genre_head.genres, (float(t) for t in genre_head.thresholds_for())))

    data = render_report(analyses, genre_eval=genre_eval, caption_eval=caption_eval, header=header,
                         thresholds=thresholds).encode("utf-8")
    atomic_write_bytes(out_path, data)
    return {"path": str(out_path), "posters": len(analyses), "bytes": len(data),
            "split": shown_split or "all", "notice": header["notice"],
            "evaluations": [name for name, ev in (("genres", genre_eval), ("captions", caption_eval)) if ev],
            "skipped": skipped}
