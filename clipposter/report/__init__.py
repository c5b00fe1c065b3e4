"""The HTML report: `build_report` (gathers the data and writes the file), `render_report` (jinja2
templates with autoescaping) and the one chart implementation (`charts`, inline SVG)."""
from clipposter.report.build import build_report, render_report, report_context
from clipposter.report.charts import bar_chart, genre_f1_chart, write_genre_f1_chart

__all__ = ["build_report", "render_report", "report_context", "bar_chart", "genre_f1_chart", "write_genre_f1_chart"]
