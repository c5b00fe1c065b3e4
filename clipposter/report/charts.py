"""Charts as inline SVG: the one chart implementation of clipposter.

A chart is a string of SVG markup with no script and no remote resource, so the report embeds it
as it is and `write_genre_f1_chart` writes the same chart as a standalone `.svg` file (which carries
its own styles). Each bar has a <title> with its exact value, shown on hover.
"""
from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from clipposter.files import atomic_write_text

__all__ = ["HEAD_COLOUR", "bar_chart", "model_colour", "model_label", "genre_f1_series", "genre_f1_chart",
           "write_genre_f1_chart", "CHART_CSS"]

# One colour per model in tables and charts; the head is always the first, strongest colour.
HEAD_COLOUR = "#2563eb"
BASELINE_COLOURS = {"zero-shot": "#f59e0b", "linear-probe": "#10b981", "constant": "#9ca3af"}
EXTRA_COLOURS = ("#a855f7", "#ef4444", "#0ea5e9", "#84cc16")

# The chart's text and line styles; the report has them in its stylesheet, a standalone file inside.
CHART_CSS = (".ct{font-size:13px;font-weight:600;fill:#111827}.cl{font-size:11px;fill:#374151}"
             ".cy{font-size:10px;fill:#6b7280;text-anchor:end}.cyl{font-size:11px;fill:#6b7280;text-anchor:middle}"
             ".cx{font-size:11px;fill:#374151;text-anchor:end}.cg{stroke:#eef2f7}.ca{stroke:#9ca3af}"
             ".cna{font-size:10px;fill:#9ca3af;text-anchor:middle}")
STANDALONE_FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def model_colour(name: str, index: int, head_name: str | None) -> str:
    """The colour of a model: the head's, a baseline's by its kind, else one of the extra colours."""
    if name == head_name or (head_name is None and index == 0):
        return HEAD_COLOUR
    for key, colour in BASELINE_COLOURS.items():
        if name.startswith(key):
            return colour
    return EXTRA_COLOURS[index % len(EXTRA_COLOURS)]


def model_label(name: str, model: Mapping, head_name: str | None) -> str:
    """How a model of a genre evaluation is named in tables and charts."""
    if name == head_name:
        return f"{name} (head)"
    if model.get("kind") == "constant" or name == "constant":
        return f"constant top-{model.get('k')}" if model.get("k") is not None else "constant"
    return name


def compared_setting(model: Mapping) -> tuple[str | None, Mapping]:
    """The setting a model is compared at: calibrated thresholds, or top-k for the constant."""
    results = model.get("results", {})
    setting = "calibrated" if "calibrated" in results else next(iter(results), None)
    return setting, results.get(setting, {})


def bar_chart(categories: Sequence[str], series: Mapping[str, Sequence[float | None]], *, title: str,
              ylabel: str, ymax: float | None = None, colours: Mapping[str, str] | None = None,
              value_digits: int = 3, standalone: bool = False) -> str:
    """A grouped bar chart as SVG: one group per category, one bar per series; None or NaN values
    show a dash. ymax fixes the axis (scores); without it the axis is rounded up in 1-2-5 steps
    (counts). standalone: carry its own styles and font, for a chart written as a file of its own."""
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

    def colour_of(i: int, name: str) -> str:
        return (colours or {}).get(name, EXTRA_COLOURS[i % len(EXTRA_COLOURS)])

    style = f' style="{STANDALONE_FONT}"' if standalone else ""
    out = [f'<svg class="chart" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
           f'role="img" aria-label="{_e(title)}" xmlns="http://www.w3.org/2000/svg"{style}>']
    if standalone:
        out.append(f"<style>{CHART_CSS}</style>")
    out.append(f'<text x="{left}" y="16" class="ct">{_e(title)}</text>')
    x = left
    for i, name in enumerate(names):  # legend
        out.append(f'<rect x="{x:.1f}" y="{top_pad - 2}" width="10" height="10" fill="{colour_of(i, name)}"/>'
                   f'<text x="{x + 14:.1f}" y="{top_pad + 7}" class="cl">{_e(name)}</text>')
        x += 26 + 6.4 * len(name)
    for t in range(round(top / tick_step) + 1):  # grid and y axis
        v = tick_step * t
        yy = y(v)
        label = f"{v:.1f}" if ymax is not None else f"{v:.0f}"
        out.append(f'<line x1="{left}" x2="{plot_end}" y1="{yy:.1f}" y2="{yy:.1f}" class="cg"/>'
                   f'<text x="{left - 6}" y="{yy + 4:.1f}" class="cy">{label}</text>')
    out.append(f'<text transform="translate(14 {top_pad + legend_h + plot_h / 2:.0f}) rotate(-90)" '
               f'class="cyl">{_e(ylabel)}</text>')
    for c, cat in enumerate(categories):  # bars
        gx = left + c * group + 7
        for i, name in enumerate(names):
            v = values[i][c] if c < len(values[i]) else None
            bx = gx + i * bar
            tip = f"{cat} · {name}: {'n/a' if v is None else f'{v:.{value_digits}f}'}"
            if v is None:
                out.append(f'<text x="{bx + bar / 2:.1f}" y="{y0 - 3:.1f}" class="cna"><title>{_e(tip)}</title>'
                           f'–</text>')
                continue
            h = max(y0 - y(v), 0.0)
            out.append(f'<rect x="{bx:.1f}" y="{y0 - max(h, 1.0):.1f}" width="{bar - 1:.1f}" '
                       f'height="{max(h, 1.0):.1f}" fill="{colour_of(i, name)}"><title>{_e(tip)}</title></rect>')
        cx = gx + bar * m / 2
        out.append(f'<text transform="translate({cx:.1f} {y0 + 12:.1f}) rotate(-35)" class="cx">{_e(cat)}</text>')
    out.append(f'<line x1="{left}" x2="{plot_end}" y1="{y0:.1f}" y2="{y0:.1f}" class="ca"/>')
    out.append("</svg>")
    return "".join(out)


def genre_f1_series(report: Mapping) -> tuple[list[str], dict[str, list], dict[str, str]] | None:
    """(genres, {model label: per-genre F1}, {model label: colour}) of a genre evaluation on its
    per-genre split, every model at the setting it is compared at; None without a per-genre split."""
    split = report.get("per_genre_split")
    if not split:
        return None
    head_name = report.get("head", {}).get("name")
    series, colours, head_rows = {}, {}, None
    for i, (name, model) in enumerate(report.get("models", {}).items()):
        _, by_split = compared_setting(model)
        rows = by_split.get(split)
        if not rows:
            continue
        label = model_label(name, model, head_name)
        series[label] = [row.get("f1") for row in rows["per_genre"]]
        colours[label] = model_colour(name, i, head_name)
        if name == head_name:
            head_rows = rows["per_genre"]
    if not head_rows:
        return None
    return [row["genre"] for row in head_rows], series, colours


def genre_f1_chart(report: Mapping, *, standalone: bool = False) -> str | None:
    """The per-genre F1 chart of a genre evaluation, head vs baselines; None without a per-genre split."""
    found = genre_f1_series(report)
    if found is None:
        return None
    genres, series, colours = found
    return bar_chart(genres, series, title=f"Per-genre F1 on {report['per_genre_split']}: head vs baselines",
                     ylabel="F1", ymax=1.0, colours=colours, standalone=standalone)


def write_genre_f1_chart(report: Mapping, path: str | os.PathLike) -> Path | None:
    """Write the per-genre F1 chart of a genre evaluation as a standalone SVG file (atomically);
    returns its path, or None (and writes nothing) when the evaluation has no per-genre split."""
    svg = genre_f1_chart(report, standalone=True)
    if svg is None:
        return None
    return atomic_write_text(path, '<?xml version="1.0" encoding="UTF-8"?>\n' + svg + "\n")
