"""`clipposter report`: one self-contained HTML file about a set of posters and the heads' scores.

The file holds a poster grid (true vs predicted genres with their probabilities, generated taglines
beside the reference, each poster's nearest neighbours), the genre and caption evaluation tables
with their baselines, and per-genre charts. It needs nothing outside itself: thumbnails are JPEG
data URIs, charts are inline SVG, styles are inline CSS, and there is no script, font or remote
resource, so it can be mailed, archived or opened offline.

Every score is printed beside the baseline that makes it readable (the constant image-blind answer,
chance, the zero-shot and linear-probe heads), and a run made with random weights says so at the top.

`render_report` only turns data into HTML; `build_report` picks the posters, runs the analyzer and
(optionally) the evaluations, renders, and writes the file atomically.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

THUMB_WIDTH = 160  # poster thumbnails in the grid (pixels of the embedded JPEG)
NEIGHBOUR_WIDTH = 64  # neighbour thumbnails
JPEG_QUALITY = 78
TOP_GENRES = 5  # probability bars per poster
SPLIT_ORDER = ("train", "validation", "test")

# One colour per model in tables and charts; the head is always the first, strongest colour.
_HEAD_COLOUR = "#2563eb"
_BASELINE_COLOURS = {"zero-shot": "#f59e0b", "linear-probe": "#10b981", "constant": "#9ca3af"}
_EXTRA_COLOURS = ("#a855f7", "#ef4444", "#0ea5e9", "#84cc16")

_MODEL_NOTES = {
    "zero-shot": "CLIP similarity to the genre prompts, no training",
    "linear-probe": "one logistic regression per genre on the same embeddings",
    "constant": "the k most frequent training genres for every poster: the best image-blind answer",
}


# ------------------------------------------------------------------------------------ helpers

def _e(value: Any) -> str:
    """HTML-escape any value (quotes included, so the result is safe inside attributes too)."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(x: Any, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _e(x)
    if math.isnan(v):
        return "n/a"
    if signed and abs(v) < 0.5 * 10 ** -digits:
        v = 0.0  # no "-0.000" for a constant output's margin
    text = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return text.replace("-", "\u2212")


def _as_dict(report: Any) -> dict | None:
    """Evaluation reports may come as dicts or as objects with to_dict() (CaptionReport)."""
    if report is None:
        return None
    if hasattr(report, "to_dict"):
        return report.to_dict()
    return dict(report)


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class _Thumbnails:
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

        from clipposter.errors import PosterError
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


def _colour(name: str, index: int, head_name: str | None) -> str:
    if name == head_name or (head_name is None and index == 0):
        return _HEAD_COLOUR
    for key, colour in _BASELINE_COLOURS.items():
        if name.startswith(key):
            return colour
    return _EXTRA_COLOURS[index % len(_EXTRA_COLOURS)]


# ------------------------------------------------------------------------------------- charts

def _bar_chart(categories: Sequence[str], series: Mapping[str, Sequence[float | None]], *, title: str,
               ylabel: str, ymax: float | None = None, colours: Mapping[str, str] | None = None,
               value_digits: int = 3) -> str:
    """A grouped bar chart as inline SVG: one group per category, one bar per series.

    Each bar carries a <title> with its exact value (shown on hover); the SVG scales to its box."""
    names = list(series)
    n, m = len(categories), max(1, len(names))
    values = [[(None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v))
               for v in series[name]] for name in names]
    if ymax is not None:
        top, tick_step = float(ymax), float(ymax) / 5
    else:  # counts: a round axis maximum with 1-2-5 steps, at most 6 intervals
        peak = max([v for vs in values for v in vs if v is not None] + [1.0])
        tick_step = next(b * 10 ** e for e in range(12) for b in (1, 2, 5) if peak / (b * 10 ** e) <= 6)
        top = math.ceil(peak / tick_step) * tick_step
    bar = max(6.0, min(18.0, 60.0 / m))
    group = bar * m + 14
    left, right, top_pad, legend_h = 52, 16, 34, 22
    label_h = 8 + 6.2 * max([len(c) for c in categories] + [4]) * 0.72
    plot_h = 190
    plot_end = left + max(n, 1) * group
    legend_w = sum(26 + 6.4 * len(name) for name in names)
    width = max(left + right + max(n, 1) * group, left + legend_w, left + 8.0 * len(title))
    height = top_pad + legend_h + plot_h + label_h
    y0 = top_pad + legend_h + plot_h  # the baseline of the bars

    def y(v: float) -> float:
        return y0 - plot_h * min(max(v, 0.0), top) / top

    out = [f'<svg class="chart" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
           f'role="img" aria-label="{_e(title)}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{left}" y="16" class="ct">{_e(title)}</text>']
    # legend
    x = left
    for i, name in enumerate(names):
        colour = (colours or {}).get(name, _EXTRA_COLOURS[i % len(_EXTRA_COLOURS)])
        out.append(f'<rect x="{x:.1f}" y="{top_pad - 2}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 14:.1f}" y="{top_pad + 7}" class="cl">{_e(name)}</text>')
        x += 26 + 6.4 * len(name)
    # grid and y axis
    ticks = round(top / tick_step)
    for t in range(ticks + 1):
        v = tick_step * t
        yy = y(v)
        label = f"{v:.1f}" if ymax is not None else f"{v:.0f}"
        out.append(f'<line x1="{left}" x2="{plot_end}" y1="{yy:.1f}" y2="{yy:.1f}" class="cg"/>'
                   f'<text x="{left - 6}" y="{yy + 4:.1f}" class="cy">{label}</text>')
    out.append(f'<text transform="translate(14 {top_pad + legend_h + plot_h / 2:.0f}) rotate(-90)" '
               f'class="cyl">{_e(ylabel)}</text>')
    # bars
    for c, cat in enumerate(categories):
        gx = left + c * group + 7
        for i, name in enumerate(names):
            v = values[i][c] if c < len(values[i]) else None
            colour = (colours or {}).get(name, _EXTRA_COLOURS[i % len(_EXTRA_COLOURS)])
            bx = gx + i * bar
            tip = f"{cat} · {name}: {'n/a' if v is None else f'{v:.{value_digits}f}'}"
            if v is None:
                out.append(f'<text x="{bx + bar / 2:.1f}" y="{y0 - 3:.1f}" class="cna"><title>{_e(tip)}</title>'
                           f'–</text>')
                continue
            h = max(y0 - y(v), 0.0)
            out.append(f'<rect x="{bx:.1f}" y="{y0 - max(h, 1.0):.1f}" width="{bar - 1:.1f}" '
                       f'height="{max(h, 1.0):.1f}" fill="{colour}"><title>{_e(tip)}</title></rect>')
        cx = gx + bar * m / 2
        out.append(f'<text transform="translate({cx:.1f} {y0 + 12:.1f}) rotate(-35)" class="cx">{_e(cat)}</text>')
    out.append(f'<line x1="{left}" x2="{plot_end}" y1="{y0:.1f}" y2="{y0:.1f}" class="ca"/>')
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------------------- evaluations

def _genre_rows_by_setting(model: Mapping) -> tuple[str, Mapping]:
    """The setting a model is compared at: calibrated thresholds, or top-k for the constant."""
    results = model.get("results", {})
    setting = "calibrated" if "calibrated" in results else next(iter(results), None)
    return setting, results.get(setting, {})


def _model_label(name: str, model: Mapping, head_name: str | None) -> str:
    if name == head_name:
        return f"{name} (head)"
    if model.get("kind") == "constant" or name == "constant":
        return f"constant top-{model.get('k')}" if model.get("k") is not None else "constant"
    return name


def _genre_headline(report: Mapping) -> str | None:
    """One sentence: micro-F1 and mAP of the head vs each baseline on the per-genre split."""
    split = report.get("per_genre_split")
    if not split:
        return None
    head_name = report.get("head", {}).get("name")
    parts = []
    for name, model in report.get("models", {}).items():
        _, by_split = _genre_rows_by_setting(model)
        r = by_split.get(split)
        if not r:
            continue
        parts.append(f"<b>{_e(_model_label(name, model, head_name))}</b> {_num(r['micro']['f1'])}"
                     + (f" (mAP {_num(r.get('map'))})" if r.get("map") is not None else ""))
    if not parts:
        return None
    return f"Genres, micro-F1 on {_e(split)}: " + " · ".join(parts)


def _caption_headline(report: Mapping) -> str | None:
    systems = report.get("scores", {}).get("systems", {})
    gen = systems.get("generated")
    if not gen:
        return None
    chance, const = systems.get("chance", {}), systems.get("constant", {})
    level = report.get("scores", {}).get("retrieval_chance_level")
    return (f"Taglines on {_e(report.get('split'))}: margin <b>{_num(gen.get('margin'), signed=True)}</b> "
            f"(chance {_num(chance.get('margin'), signed=True)}, constant {_num(const.get('margin'), signed=True)}), "
            f"retrieval@10 <b>{_num(gen.get('retrieval'))}</b> (chance level {_num(level)}), "
            f"cosine {_num(gen.get('cosine'))} (constant {_num(const.get('cosine'))})")


def _genre_tables(report: Mapping) -> str:
    head_name = report.get("head", {}).get("name")
    models = report.get("models", {})
    parts = ['<p class="how"><b>How to read:</b> every model is scored on the same posters. '
             + "; ".join(f"<b>{_e(k)}</b> = {_e(v)}" for k, v in _MODEL_NOTES.items()
                         if any(n == k or m.get("kind") == k for n, m in models.items()))
             + ". A head that does not beat <b>constant</b> has learned nothing from the image. "
               "Thresholds <b>0.5</b> is the paper's fixed cut; <b>calibrated</b> thresholds were chosen per "
               "genre on validation. Micro averages count every label, macro averages every genre equally, "
               "sample averages every poster.</p>"]
    posters = report.get("posters")
    if posters:
        parts.append('<p class="small">Posters per split: '
                     + ", ".join(f"{_e(s)} {_e(n)}" for s, n in posters.items()) + "</p>")
    for w in report.get("warnings") or []:
        parts.append(f'<p class="warn">{_e(w)}</p>')
    head = ('<thead><tr><th rowspan="2">model</th><th rowspan="2">thresholds</th><th rowspan="2">split</th>'
            '<th colspan="3" class="grp">micro</th><th colspan="3" class="grp">macro</th>'
            '<th colspan="3" class="grp">per sample</th><th rowspan="2">mAP</th>'
            '<th rowspan="2" title="true labels per poster">labels</th>'
            '<th rowspan="2" title="predicted labels per poster">pred.</th></tr>'
            '<tr>' + '<th>P</th><th>R</th><th>F1</th>' * 3 + '</tr></thead>')
    bodies = []
    for name, model in models.items():
        rows = []
        for setting, by_split in model.get("results", {}).items():
            label = setting if setting != "top-k" else f"top-{model.get('k')}"
            for split in sorted(by_split, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s)):
                r = by_split[split]
                cells = [f"<td>{_e(label)}</td>", f"<td>{_e(split)}</td>"]
                if r is None:
                    cells.append('<td colspan="12" class="na">no posters</td>')
                else:
                    for avg in ("micro", "macro", "samples"):
                        a = r.get(avg, {})
                        cells += [f"<td>{_num(a.get('precision'))}</td>", f"<td>{_num(a.get('recall'))}</td>",
                                  f"<td class=\"f1\">{_num(a.get('f1'))}</td>"]
                    cells += [f"<td>{_num(r.get('map'))}</td>", f"<td>{_num(r.get('labels_per_poster'), 2)}</td>",
                              f"<td>{_num(r.get('predicted_per_poster'), 2)}</td>"]
                rows.append(cells)
        if not rows:
            continue
        cls = "main" if name == head_name else "base"
        first = (f'<th rowspan="{len(rows)}" class="mn">{_e(_model_label(name, model, head_name))}'
                 + (f'<div class="small">{_e(", ".join(model["genres"]))}</div>' if model.get("genres") else "")
                 + "</th>")
        body = [f'<tr>{first}{"".join(rows[0])}</tr>'] + [f'<tr>{"".join(r)}</tr>' for r in rows[1:]]
        bodies.append(f'<tbody class="{cls}">{"".join(body)}</tbody>')
    parts.append(f'<div class="scroll"><table class="tbl num">{head}{"".join(bodies)}</table></div>')
    parts.append(_per_genre_table(report))
    return "".join(parts)


def _per_genre_table(report: Mapping) -> str:
    split = report.get("per_genre_split")
    head_name = report.get("head", {}).get("name")
    models = report.get("models", {})
    if not split or head_name not in models:
        return '<p class="na">No labelled validation or test posters: no per-genre table.</p>'
    main_rows = (models[head_name].get("results", {}).get("calibrated", {}) or {}).get(split)
    if not main_rows:
        return '<p class="na">No per-genre scores for the head.</p>'
    main_rows = main_rows["per_genre"]
    others = []
    for name, model in models.items():
        if name == head_name:
            continue
        _, by_split = _genre_rows_by_setting(model)
        if by_split.get(split):
            others.append((_model_label(name, model, head_name), by_split[split]["per_genre"]))
    out = [f'<h3>Per genre on {_e(split)}</h3>',
           ('<p class="how">The head at its calibrated thresholds, with each baseline\'s F1 on the same posters; '
            'the best F1 of each row is bold. <b>support</b> = posters labelled with the genre, '
            '<b>predicted</b> = posters the head gave it.</p>'),
           '<div class="scroll"><table class="tbl num"><thead><tr><th>genre</th><th>support</th><th>predicted</th>'
           '<th>threshold</th><th>P</th><th>R</th><th>F1</th><th>AP</th>'
           + "".join(f"<th>{_e(n)} F1</th>" for n, _ in others) + "</tr></thead><tbody>"]
    for g, r in enumerate(main_rows):
        f1s = [r.get("f1")] + [o[g].get("f1") if g < len(o) else None for _, o in others]
        best = max((v for v in f1s if v is not None), default=None)

        def cell(v, extra="", best=best):
            bold = best is not None and v is not None and abs(v - best) < 1e-12 and best > 0
            return f'<td class="{extra}{" best" if bold else ""}">{_num(v)}</td>'

        out.append(f"<tr><th>{_e(r.get('genre'))}</th><td>{_e(r.get('support'))}</td>"
                   f"<td>{_e(r.get('predicted', ''))}</td><td>{_num(r.get('threshold'))}</td>"
                   f"<td>{_num(r.get('precision'))}</td><td>{_num(r.get('recall'))}</td>{cell(f1s[0], 'f1')}"
                   f"<td>{_num(r.get('ap'))}</td>" + "".join(cell(v) for v in f1s[1:]) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _genre_charts(report: Mapping | None, analyses: Sequence) -> str:
    charts = []
    split = report.get("per_genre_split") if report else None
    if split:
        head_name = report.get("head", {}).get("name")
        series, colours, head_rows = {}, {}, None
        for i, (name, model) in enumerate(report.get("models", {}).items()):
            _, by_split = _genre_rows_by_setting(model)
            r = by_split.get(split)
            if not r:
                continue
            label = _model_label(name, model, head_name)
            series[label] = [row.get("f1") for row in r["per_genre"]]
            colours[label] = _colour(name, i, head_name)
            if name == head_name:
                head_rows = r["per_genre"]
        if head_rows:
            genres = [row["genre"] for row in head_rows]
            charts.append(_bar_chart(genres, series, title=f"Per-genre F1 on {split}: head vs baselines",
                                     ylabel="F1", ymax=1.0, colours=colours))
            charts.append(_bar_chart(
                genres, {"labelled": [row.get("support") for row in head_rows],
                         "predicted by the head": [row.get("predicted") for row in head_rows]},
                title=f"Posters per genre on {split}: labelled vs predicted by the head",
                ylabel="posters", colours={"labelled": "#64748b", "predicted by the head": _HEAD_COLOUR},
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
        charts.append(_bar_chart(
            genres, series, ylabel="share of posters", ymax=1.0,
            title=f"On the {len(shown)} posters shown: probabilities vs labels",
            colours={"mean predicted probability": "#93c5fd", "share labelled": "#64748b",
                     "share predicted": _HEAD_COLOUR}))
    if not charts:
        return ""
    return '<div class="charts">' + "".join(f"<figure>{c}</figure>" for c in charts) + "</div>"


def _caption_table(report: Mapping) -> str:
    scores = report.get("scores", {})
    systems = scores.get("systems", {})
    dec = report.get("decoding") or {}
    parts = [f'<p class="small">Split <b>{_e(report.get("split"))}</b>: {_e(report.get("posters"))} posters scored'
             + (f" ({_e(report.get('skipped_references'))} skipped: no usable {_e(report.get('target'))})"
                if report.get("skipped_references") else "")
             + f", target {_e(report.get('target'))}, decoding {_e(dec.get('strategy'))}, "
               f"sentence model {_e(report.get('sentence_model'))}"
             + (f", {_num(report.get('texts_per_second'), 1)} texts/s" if report.get("texts_per_second") else "")
             + "</p>",
             '<p class="how"><b>How to read:</b> <b>cosine</b> is the paper\'s score (sentence-embedding similarity '
             'of text and reference); it rewards generic text, so <b>constant</b> = the single training tagline '
             'that scores best on train, given to every poster: the best image-blind answer. <b>chance</b> = a '
             'random training tagline per poster. Only <b>margin</b> (own reference minus other posters\' '
             'references; 0 for any constant output) and <b>retrieval@10</b> (own reference ranked first among '
             f'10; chance level {_num(scores.get("retrieval_chance_level"))}) say whether a text fits '
             '<i>its</i> poster. <b>identical</b> = share of posters whose text equals another poster\'s '
             '(collapse).</p>']
    cols = [("cosine", "cosine", 3, False), ("margin", "margin", 3, True), ("retrieval", "retrieval@10", 3, False),
            ("bleu", "BLEU", 1, False), ("distinct_1", "distinct-1", 3, False), ("distinct_2", "distinct-2", 3, False),
            ("identical_share", "identical", 3, False)]
    rows = ['<thead><tr><th>system</th>' + "".join(f"<th>{_e(label)}</th>" for _, label, _, _ in cols)
            + "</tr></thead><tbody>"]
    labels = {"generated": "generated (head)", "chance": "chance (random train tagline)",
              "constant": "constant (best train tagline)"}
    for key, label in labels.items():
        m = systems.get(key)
        if m is None:
            continue
        cls = "main" if key == "generated" else "base"
        rows.append(f'<tr class="{cls}"><th>{_e(label)}</th>'
                    + "".join(f"<td>{_num(m.get(k), d, signed=s)}</td>" for k, _, d, s in cols) + "</tr>")
    refs = scores.get("references")
    if refs:
        rows.append('<tr class="ref"><th>references (for scale)</th><td></td><td></td><td></td><td></td>'
                    f"<td>{_num(refs.get('distinct_1'))}</td><td>{_num(refs.get('distinct_2'))}</td>"
                    f"<td>{_num(refs.get('identical_share'))}</td></tr>")
    rows.append("</tbody>")
    parts.append(f'<div class="scroll"><table class="tbl num">{"".join(rows)}</table></div>')
    if scores.get("constant_text") is not None:
        parts.append(f'<p class="small">constant text: “{_e(scores["constant_text"])}” (mean cosine '
                     f'{_num(scores.get("constant_train_cosine"))} on train)</p>')
    if scores.get("empty_generated"):
        parts.append(f'<p class="warn">{_e(scores["empty_generated"])} generated texts were empty.</p>')
    return "".join(parts)


# ----------------------------------------------------------------------------------- posters

def _genre_chips(true: Sequence[str], predicted: Sequence[str]) -> str:
    chips = []
    pred = set(predicted)
    if true:
        for g in true:
            if g in pred:
                chips.append(f'<span class="chip ok" title="labelled and predicted">✓ {_e(g)}</span>')
            else:
                chips.append(f'<span class="chip miss" title="labelled, not predicted">○ {_e(g)}</span>')
        for g in predicted:
            if g not in true:
                chips.append(f'<span class="chip wrong" title="predicted, not labelled">✗ {_e(g)}</span>')
    else:
        chips += [f'<span class="chip pred" title="predicted (no labels known)">{_e(g)}</span>' for g in predicted]
    if not chips:
        chips.append('<span class="chip none">no genre predicted</span>')
    return "".join(chips)


def _prob_bars(a, thresholds: Mapping[str, float] | None) -> str:
    probs = getattr(a, "probabilities", None) or {}
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])[:TOP_GENRES]
    pred, true = set(a.predicted or []), set(a.genres or [])
    rows = []
    for g, p in ranked:
        p = float(p)
        t = (thresholds or {}).get(g)
        tick = (f'<i class="th" style="left:{100 * min(max(float(t), 0), 1):.1f}%" '
                f'title="threshold {float(t):.2f}"></i>') if t is not None else ""
        cls = "on" if g in pred else "off"
        name_cls = ' class="true"' if g in true else ""
        rows.append(f'<div class="pb"><span{name_cls}>{_e(g)}</span>'
                    f'<span class="bar"><i class="{cls}" style="width:{100 * min(max(p, 0), 1):.1f}%"></i>{tick}</span>'
                    f'<span class="pv">{p:.2f}</span></div>')
    return "".join(rows)


def _poster_card(a, index: int, anchors: Mapping[str, str], thumbs: _Thumbnails,
                 thresholds: Mapping[str, float] | None) -> str:
    pid = a.id if a.id is not None else os.path.basename(str(a.image or "")) or f"poster {index + 1}"
    anchor = anchors.get(a.id) if a.id is not None else None
    uri = thumbs.uri(a.image, THUMB_WIDTH)
    label = a.title or pid
    name = os.path.basename(str(a.image or ""))
    img = (f'<img class="poster" src="{uri}" alt="poster: {_e(label)}">' if uri else
           f'<div class="poster ph" role="img" aria-label="no image">no image<br><small>{_e(name)}</small></div>')
    gen = list(getattr(a, "taglines", None) or [])
    tag_lines = "".join(f'<p class="gen"><span class="lab">{"generated" if i == 0 else f"#{i + 1}"}</span>'
                        f'“{_e(t)}”</p>' for i, t in enumerate(gen)) or \
        '<p class="gen"><span class="lab">generated</span><span class="na">(nothing generated)</span></p>'
    ref = getattr(a, "tagline", None)
    tag_lines += (f'<p class="ref"><span class="lab">reference</span>“{_e(ref)}”</p>' if ref else
                  '<p class="ref"><span class="lab">reference</span><span class="na">(none)</span></p>')
    nbs = []
    for h in getattr(a, "neighbours", None) or []:
        ncls = thumbs.css_class(getattr(h, "image", None), NEIGHBOUR_WIDTH)
        genres = getattr(h, "genres", None) or []
        shared = set(genres) & set(a.genres or [])
        tip = " · ".join(x for x in (h.id, getattr(h, "title", None), ", ".join(genres),
                                      f"cosine {float(h.score):.3f}") if x)
        pic = f'<span class="nimg {ncls}"></span>' if ncls else '<span class="nimg ph"></span>'
        tag = "a" if h.id in anchors else "span"
        href = f' href="#{anchors[h.id]}"' if h.id in anchors else ""
        nbs.append(f'<{tag} class="nb{" share" if shared else ""}"{href} title="{_e(tip)}">{pic}'
                   f'<span class="nid">{_e(h.id)}</span><span class="ns">{float(h.score):.3f}</span></{tag}>')
    nb_html = ('<div class="nbs"><span class="lab">nearest posters (cosine)</span><div class="nbrow">'
               + "".join(nbs) + "</div></div>") if nbs else ""
    source = getattr(a, "source", "cache")
    src = f' <span class="src">{_e(source)}</span>' if source and source != "cache" else ""
    id_attr = f' id="{anchor}"' if anchor else ""
    return (f'<article class="card"{id_attr}>'
            f'<div class="top">{img}<div class="info">'
            f'<h3><span class="pid">{_e(pid)}</span>{src}</h3>'
            + (f'<p class="title">{_e(a.title)}</p>' if a.title else "")
            + f'<div class="chips">{_genre_chips(a.genres or [], a.predicted or [])}</div>'
            f'<div class="probs">{_prob_bars(a, thresholds)}</div></div></div>'
            f'<div class="tags">{tag_lines}</div>{nb_html}</article>')


def _grid_summary(analyses: Sequence) -> str:
    labelled = [a for a in analyses if a.genres]
    if not labelled:
        return ""
    ok = sum(len(set(a.genres) & set(a.predicted or [])) for a in labelled)
    missed = sum(len(set(a.genres) - set(a.predicted or [])) for a in labelled)
    wrong = sum(len(set(a.predicted or []) - set(a.genres)) for a in labelled)
    exact = sum(set(a.genres) == set(a.predicted or []) for a in labelled)
    gens = [a.taglines[0] for a in analyses if getattr(a, "taglines", None)]
    dup = len(gens) - len({t.strip().lower() for t in gens}) if gens else 0
    return (f'<p class="small">On these {len(labelled)} labelled posters: <span class="chip ok">✓ {ok} correct</span>'
            f'<span class="chip miss">○ {missed} missed</span><span class="chip wrong">✗ {wrong} wrong</span> '
            f'genre labels; {exact} posters with exactly the true set.'
            + (f' {len({t.strip().lower() for t in gens})} distinct first taglines for {len(gens)} posters'
               f'{f" ({dup} repeated)" if dup else ""}.' if gens else "")
            + "</p>")


# ------------------------------------------------------------------------------------ header

_HEADER_KEYS = (("backbone", "backbone"), ("lm", "language model"), ("posters", "posters"),
                ("source", "source"), ("shown", "shown"), ("strategy", "decoding"),
                ("genre_head", "genre head"), ("caption_head", "caption head"), ("cache", "cache"),
                ("run", "run"), ("date", "date"))
_HEADER_SPECIAL = {"title", "notice", "notes", "skipped"}


def _header_value(key: str, value: Any) -> str:
    if key == "posters" and isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: (SPLIT_ORDER.index(kv[0]) if kv[0] in SPLIT_ORDER else 9,
                                                       str(kv[0])))
        total = sum(int(v) for _, v in items if isinstance(v, (int, float)))
        return " · ".join(f"{_e(k)} {_e(v)}" for k, v in items) + f" ({total} in all)"
    if key == "backbone" and isinstance(value, Mapping):
        return _e(f"{value.get('model')} ({value.get('weights')})")
    if isinstance(value, Mapping):
        return _e(", ".join(f"{k}: {v}" for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return _e(", ".join(str(v) for v in value))
    return _e(value)


def _header(header: Mapping) -> str:
    title = header.get("title") or "clipposter report"
    rows = []
    seen = set(_HEADER_SPECIAL)
    for key, label in _HEADER_KEYS:
        seen.add(key)
        if header.get(key) not in (None, "", {}, []):
            rows.append(f"<tr><th>{_e(label)}</th><td>{_header_value(key, header[key])}</td></tr>")
    for key, value in header.items():
        if key not in seen and value not in (None, "", {}, []):
            rows.append(f"<tr><th>{_e(key.replace('_', ' '))}</th><td>{_header_value(key, value)}</td></tr>")
    notice = header.get("notice")
    out = [f"<header><h1>{_e(title)}</h1>"]
    if notice:
        out.append(f'<div class="notice" role="alert"><b>Notice:</b> {_e(notice)}</div>')
    out.append(f'<table class="meta">{"".join(rows)}</table>')
    for note in header.get("notes") or []:
        out.append(f'<p class="warn">{_e(note)}</p>')
    out.append("</header>")
    return "".join(out)


_CSS = """
:root{--fg:#1f2937;--mute:#6b7280;--line:#e5e7eb;--bg:#f8fafc;--card:#fff;--head:#2563eb;--ok:#15803d;
--okbg:#dcfce7;--miss:#b45309;--missbg:#fef3c7;--bad:#b91c1c;--badbg:#fee2e2}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--fg);background:var(--bg)}
main{max-width:1440px;margin:0 auto;padding:16px 20px 40px}
h1{font-size:24px;margin:8px 0 10px}h2{font-size:19px;margin:28px 0 8px;padding-top:8px;
border-top:1px solid var(--line)}h3{font-size:15px;margin:16px 0 6px}
nav{position:sticky;top:0;z-index:2;background:var(--bg);padding:6px 0;border-bottom:1px solid var(--line)}
nav a{margin-right:16px;color:var(--head);text-decoration:none;font-weight:600}
.notice{background:#fff7ed;border:2px solid #f97316;color:#7c2d12;padding:10px 14px;border-radius:8px;
margin:8px 0 12px;font-size:15px}
.warn{background:#fefce8;border-left:4px solid #eab308;padding:6px 10px;margin:6px 0}
.meta{border-collapse:collapse;margin:4px 0}.meta th{text-align:left;color:var(--mute);font-weight:500;
padding:2px 16px 2px 0;vertical-align:top}.meta td{padding:2px 0}
.glance{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 14px;margin:10px 0}
.glance p{margin:4px 0}
.small{color:var(--mute);font-size:13px}.na{color:var(--mute);font-style:italic}
.how{background:#eff6ff;border-left:4px solid var(--head);padding:6px 10px;margin:8px 0;font-size:13px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:14px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:10px;
display:flex;flex-direction:column;gap:8px;scroll-margin-top:48px}
.card:target{outline:3px solid var(--head)}
.top{display:flex;gap:12px}.info{flex:1;min-width:0}
.poster{width:120px;height:auto;border-radius:4px;flex:none;align-self:flex-start;border:1px solid var(--line)}
.poster.ph{height:170px;display:flex;align-items:center;justify-content:center;text-align:center;
background:repeating-linear-gradient(45deg,#f3f4f6,#f3f4f6 8px,#e5e7eb 8px,#e5e7eb 16px);
color:var(--mute);font-size:12px;overflow-wrap:anywhere}
.card h3{margin:0;font-size:14px}.pid{font-family:ui-monospace,Menlo,Consolas,monospace}
.src{font-size:11px;color:var(--mute);border:1px solid var(--line);border-radius:4px;padding:0 4px}
.title{margin:2px 0 6px;font-weight:600}
.chips{display:flex;flex-wrap:wrap;gap:4px;margin:4px 0 6px}
.chip{display:inline-block;border-radius:999px;padding:1px 8px;font-size:12px;margin-right:4px;
border:1px solid transparent;white-space:nowrap}
.chip.ok{background:var(--okbg);color:var(--ok)}.chip.miss{background:var(--missbg);color:var(--miss);
border-style:dashed;border-color:var(--miss)}.chip.wrong{background:var(--badbg);color:var(--bad)}
.chip.pred{background:#e0e7ff;color:#3730a3}.chip.none{background:#f3f4f6;color:var(--mute)}
.pb{display:grid;grid-template-columns:86px 1fr 34px;align-items:center;gap:6px;font-size:12px;margin:2px 0}
.pb span:first-child{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}.pb .true{font-weight:700}
.bar{position:relative;height:10px;background:#f1f5f9;border-radius:3px;overflow:visible}
.bar i.on,.bar i.off{position:absolute;left:0;top:0;bottom:0;border-radius:3px}
.bar i.on{background:var(--head)}.bar i.off{background:#bfdbfe}
.bar i.th{position:absolute;top:-3px;bottom:-3px;width:2px;background:#111827;margin-left:-1px}
.pv{text-align:right;font-variant-numeric:tabular-nums}
.tags p{margin:2px 0}.tags .gen{font-weight:600}.tags .ref{color:var(--mute)}
.lab{display:inline-block;min-width:70px;font-size:11px;text-transform:uppercase;letter-spacing:.03em;
color:var(--mute);font-weight:500;margin-right:6px}
.nbs .nbrow{display:flex;gap:6px;margin-top:4px;overflow-x:auto}
.nb{display:flex;flex-direction:column;align-items:center;width:64px;font-size:11px;color:inherit;
text-decoration:none;border-radius:4px;padding:2px}
a.nb:hover{background:#eff6ff}.nimg{display:block;width:52px;height:76px;border-radius:3px;
border:1px solid var(--line);background-color:#f3f4f6;background-size:cover;background-position:center;
-webkit-print-color-adjust:exact;print-color-adjust:exact}.nb.share .nimg{border:2px solid var(--ok)}
.nid{max-width:62px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;
font-family:ui-monospace,Menlo,Consolas,monospace}.ns{color:var(--mute);font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}
.tbl{border-collapse:collapse;background:var(--card);margin:6px 0;font-size:13px}
.tbl th,.tbl td{border:1px solid var(--line);padding:3px 8px}.tbl thead th{background:#f1f5f9;font-weight:600}
.tbl.num td{text-align:right;font-variant-numeric:tabular-nums}.tbl th.grp{text-align:center}
.tbl tbody th{text-align:left;font-weight:600}.tbl .main{background:#eff6ff}.tbl tr.ref{color:var(--mute)}
.tbl tbody.base th.mn{font-weight:500}.tbl td.f1{font-weight:600}.tbl td.best{font-weight:800;color:var(--ok)}
.tbl tbody+tbody{border-top:2px solid #cbd5e1}
.charts{display:flex;flex-wrap:wrap;gap:16px}.charts figure{margin:0;background:var(--card);
border:1px solid var(--line);border-radius:8px;padding:8px;overflow-x:auto;max-width:100%}
svg.chart{max-width:100%;height:auto;font-family:inherit}
.ct{font-size:13px;font-weight:600;fill:#111827}.cl{font-size:11px;fill:#374151}
.cy{font-size:10px;fill:#6b7280;text-anchor:end}.cyl{font-size:11px;fill:#6b7280;text-anchor:middle}
.cx{font-size:11px;fill:#374151;text-anchor:end}.cg{stroke:#eef2f7}.ca{stroke:#9ca3af}
.cna{font-size:10px;fill:#9ca3af;text-anchor:middle}
footer{margin-top:30px;color:var(--mute);font-size:12px}
@media (max-width:520px){.grid{grid-template-columns:1fr}.poster{width:96px}}
"""


# ------------------------------------------------------------------------------------ render

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
    genre_eval = _as_dict(genre_eval)
    caption_eval = _as_dict(caption_eval)
    header = dict(header or {})
    header.setdefault("date", time.strftime("%Y-%m-%d %H:%M"))
    skipped = dict(header.get("skipped") or {})
    if thresholds is None and genre_eval:
        name = genre_eval.get("head", {}).get("name")
        cal = (genre_eval.get("models", {}).get(name, {}).get("thresholds") or {}).get("calibrated")
        genres = genre_eval.get("head", {}).get("genres")
        if cal and genres and len(cal) == len(genres):
            thresholds = dict(zip(genres, cal))
    analyses = list(analyses)
    thumbs = _Thumbnails()
    anchors = {a.id: f"p{i}" for i, a in enumerate(analyses) if a.id is not None}

    glance = [x for x in (_genre_headline(genre_eval) if genre_eval else None,
                          _caption_headline(caption_eval) if caption_eval else None) if x]
    body = [_header(header),
            '<nav><a href="#posters">Posters</a><a href="#genres">Genre evaluation</a>'
            '<a href="#charts">Per-genre charts</a><a href="#captions">Tagline evaluation</a></nav>']
    if glance:
        body.append('<div class="glance">' + "".join(f"<p>{g}</p>" for g in glance) + "</div>")

    body.append(f'<h2 id="posters">Posters ({len(analyses)})</h2>')
    body.append('<p class="how"><b>Genres:</b> <span class="chip ok">✓ correct</span> labelled and predicted · '
                '<span class="chip miss">○ missed</span> labelled, not predicted · '
                '<span class="chip wrong">✗ wrong</span> predicted, not labelled. Bars: the head\'s '
                f'probabilities for its top {TOP_GENRES} genres (dark = predicted; black tick = the genre\'s '
                'threshold; bold name = a true genre). Neighbours: the most similar other posters by CLIP '
                'embedding, with their cosine similarity (green frame = shares a true genre).</p>')
    body.append(_grid_summary(analyses))
    if analyses:
        body.append('<div class="grid">' + "".join(_poster_card(a, i, anchors, thumbs, thresholds)
                                                   for i, a in enumerate(analyses)) + "</div>")
    else:
        body.append('<p class="na">No posters to show.</p>')

    def evaluation(report, render, name: str) -> str:
        if report:
            return render(report)
        why = skipped.get(name)
        return f'<p class="na">Not included in this report{": " + _e(why) if why else "."}</p>'

    body.append('<h2 id="genres">Genre evaluation</h2>')
    body.append(evaluation(genre_eval, _genre_tables, "genres"))

    body.append('<h2 id="charts">Per-genre charts</h2>')
    charts = _genre_charts(genre_eval, analyses)
    body.append(charts or '<p class="na">Nothing to chart.</p>')

    body.append('<h2 id="captions">Tagline evaluation</h2>')
    body.append(evaluation(caption_eval, _caption_table, "captions"))

    from clipposter import __version__ as version

    body.append(f'<footer>Written by clipposter {_e(version)} on {_e(header["date"])}. This file is '
                f'self-contained: images, charts and styles are embedded.</footer>')
    title = header.get("title") or "clipposter report"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style><style>{thumbs.css()}</style></head><body><main>"
            + "".join(body) + "</main></body></html>\n")


# ------------------------------------------------------------------------------------- build

def _write_atomic(path: Path, text: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(data)


def build_report(analyzer, out_path: str | os.PathLike, *, split: str = "test", limit: int = 60, k: int = 5,
                 strategy: str = "lstm", genre_eval: Mapping | None = None, caption_eval: Mapping | Any | None = None,
                 evaluate: bool = True, sentence_model: str = "all-MiniLM-L6-v2",
                 header_extra: Mapping | None = None, progress: bool = False) -> dict:
    """Analyse up to `limit` posters of `split` (all posters when the split has none), evaluate the heads
    when no evaluation is given and `evaluate` is true, render, and write `out_path` atomically.

    A missing evaluation does not stop the report: its section says why. Returns a summary:
    {"path", "posters", "bytes", "split", "evaluations": [...], "skipped": {...}}."""
    from clipposter.embedding.backbone import TINY_MODEL
    from clipposter.errors import ClipposterError

    if limit < 1:
        raise ClipposterError(f"--limit must be at least 1, got {limit}")
    if k < 0:
        raise ClipposterError(f"-k must be zero or more, got {k}")
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
    if genre_eval is None:
        if evaluate:
            from clipposter.heads.genre.head import evaluate_genres

            try:
                genre_eval = evaluate_genres(analyzer.genre_head, cache, progress=progress)
            except ClipposterError as exc:
                skipped["genres"] = str(exc)
        else:
            skipped["genres"] = "evaluation turned off (--no-eval) and no saved evaluation given"
    if caption_eval is None:
        if evaluate:
            from clipposter.heads.caption.evaluate import evaluate_captions, load_sentence_scorer
            from clipposter.heads.caption.decoding import decoding_preset

            eval_split = split if in_split else ("test" if cache.records("test") else "validation")
            try:
                caption_eval = evaluate_captions(analyzer.caption_head, cache, split=eval_split,
                                                 decoding=decoding_preset(strategy),
                                                 scorer=load_sentence_scorer(sentence_model),
                                                 progress=progress).to_dict()
            except ClipposterError as exc:
                skipped["captions"] = str(exc)
        else:
            skipped["captions"] = "evaluation turned off (--no-eval) and no saved evaluation given"

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
    if not header.get("notice") and identity.model == TINY_MODEL:
        header["notice"] = (f"this cache was embedded with the tiny random backbone {TINY_MODEL}, not real CLIP "
                            f"weights: the figures show that the pipeline works, not how good CLIP is")
    header["notes"] = list(header.get("notes") or []) + notes
    header["skipped"] = {**skipped, **dict(header.get("skipped") or {})}
    thresholds = dict(zip(genre_head.genres, (float(t) for t in genre_head.thresholds_for())))

    text = render_report(analyses, genre_eval=genre_eval, caption_eval=caption_eval, header=header,
                         thresholds=thresholds)
    size = _write_atomic(out_path, text)
    return {"path": str(out_path), "posters": len(analyses), "bytes": size,
            "split": shown_split or "all",
            "evaluations": [name for name, ev in (("genres", genre_eval), ("captions", caption_eval)) if ev],
            "skipped": skipped}
