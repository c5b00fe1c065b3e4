"""The report's jinja2 environment: templates shipped in `report/templates`, autoescaping on, filters.

Every value a template prints is HTML-escaped (titles, taglines, file names and evaluation warnings
come from users' data); only markup made here or in `charts` is passed through, wrapped in `Markup`
by `trusted`.
"""
from __future__ import annotations

import functools
import math
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

__all__ = ["environment", "render", "number", "trusted"]


def number(x: Any, digits: int = 3, signed: bool = False) -> str:
    """A score as the report prints it: fixed digits, a true minus sign, "n/a" for none or NaN."""
    if x is None:
        return "n/a"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "n/a"
    if signed and abs(v) < 0.5 * 10 ** -digits:
        v = 0.0  # no "-0.000" for a constant output's margin
    text = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return text.replace("-", "\u2212")


def percent(x: float) -> str:
    """A share in [0, 1] as a CSS width or offset in percent."""
    return f"{100 * min(max(float(x), 0.0), 1.0):.1f}%"


def trusted(markup: str) -> Markup:
    """Markup this package built itself (SVG charts, the thumbnails' CSS): printed as it is."""
    return Markup(markup)


@functools.lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(loader=PackageLoader("clipposter.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["num"] = number
    env.filters["percent"] = percent
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)
