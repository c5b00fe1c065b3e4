"""What `clipposter app` does, without Gradio: requests (an uploaded file, a sample id, a text) become
`AnalysisView` / `SearchView` objects of plain data and escaped HTML fragments.

`AppHandlers` never raises for bad input: an unusable upload (not an image, over the byte limit,
over the pixel limit) becomes a view whose `error` names the file and says what to do, so the page
shows it and the server stays up. `Thumbnails` keeps the only poster files the server hands out.
`app.page` lays these out in a Gradio page; this module imports no Gradio, so it is tested (and
usable) without it.
"""
from __future__ import annotations

import atexit
import hashlib
import html
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipposter.app.config import (DEFAULT_K, DEFAULT_MAX_UPLOAD_MB, DEFAULT_NUM_RETURN, MAX_K, MAX_NUM_RETURN,
                                   THUMBNAIL_SIZE)
from clipposter.errors import ClipposterError, ConfigError
from clipposter.files import atomic_path

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# views: what a request shows
# ------------------------------------------------------------------------------------------------
@dataclass
class AnalysisView:
    """One analysed poster as the page shows it, or the error that replaced it."""

    error: str | None = None
    status: str = ""  # one line about what was analysed (or the error)
    image: str | None = None  # the poster shown beside the results
    chart_html: str = ""
    taglines_html: str = ""
    neighbours: list[tuple[str, str]] = field(default_factory=list)  # (image, caption)
    details: dict = field(default_factory=dict)  # JSON for API callers

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class SearchView:
    error: str | None = None
    status: str = ""
    results: list[tuple[str, str]] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def status_html(message: str, *, error: bool = False) -> str:
    """The status box: errors stay on the page (a toast would disappear) until the next request."""
    if not message:
        return ""
    kind = "cp-error" if error else "cp-info"
    role = ' role="alert"' if error else ""
    prefix = "<strong>Error:</strong> " if error else ""
    return f'<div class="cp-status {kind}"{role}>{prefix}{html.escape(message)}</div>'


def notice_html(message: str | None) -> str:
    """The box at the top of the page for what every answer should be read with (random weights)."""
    if not message:
        return ""
    return f'<div class="cp-status cp-notice" role="alert"><strong>Notice:</strong> {html.escape(message)}</div>'


def chart_html(probabilities: dict[str, float], predicted: list[str], labels: list[str]) -> str:
    """Horizontal bars, one per genre in the head's order; predicted genres filled and ticked,
    the poster's own labels (when known) marked. Plain HTML: readable without scripts."""
    predicted_set, label_set = set(predicted), set(labels)
    rows = []
    for genre, p in probabilities.items():
        pct = max(0.0, min(100.0, 100.0 * float(p)))
        hit = genre in predicted_set
        mark = "✓ " if hit else ""
        label = ' <span class="cp-label" title="the poster\'s own label">label</span>' if genre in label_set else ""
        rows.append(
            f'<div class="cp-row{" cp-predicted" if hit else ""}" data-genre="{html.escape(genre)}">'
            f'<span class="cp-genre">{mark}{html.escape(genre)}{label}</span>'
            f'<span class="cp-track"><span class="cp-bar" style="width:{pct:.1f}%"></span></span>'
            f'<span class="cp-prob">{float(p):.3f}</span></div>')
    legend = ('<div class="cp-legend">✓ predicted (at or above the head\'s threshold)'
              + (' · <span class="cp-label">label</span> the poster\'s own genres' if label_set else "") + "</div>")
    return f'<div class="cp-chart" id="cp-genre-chart">{"".join(rows)}{legend}</div>'


def taglines_html(taglines: list[str], strategy: str, reference: str | None, note: str = "") -> str:
    items = "".join(f"<li>{html.escape(t) if t.strip() else '<em>(empty text)</em>'}</li>" for t in taglines)
    ref = f'<p class="cp-reference">Reference tagline: {html.escape(reference)}</p>' if reference else ""
    note = f" ({html.escape(note)})" if note else ""
    return (f'<div class="cp-taglines" id="cp-taglines"><p class="cp-strategy">Decoding: '
            f'{html.escape(strategy)}{note}</p><ol>{items}</ol>{ref}</div>')


def _hit_caption(hit) -> str:
    title = f" · {hit.title}" if hit.title else ""
    return f"{hit.id}{title} · {hit.score:.3f}"


# ------------------------------------------------------------------------------------------------
# thumbnails: the only poster files the server hands out
# ------------------------------------------------------------------------------------------------
class Thumbnails:
    """Small JPEG copies of cached posters in one private folder.

    The galleries show these rather than the posters themselves, so the server exposes one folder
    of thumbnails instead of every folder the posters live in, and pages stay light whatever the
    posters' size. Each is made once (decoded with the safe loader) and written atomically."""

    def __init__(self, folder: str | os.PathLike | None = None, size: tuple[int, int] = THUMBNAIL_SIZE):
        if folder is None:
            folder = tempfile.mkdtemp(prefix="clipposter-app-")
            atexit.register(shutil.rmtree, folder, True)
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.size = size

    def get(self, poster_id: str, image: str | None) -> str | None:
        """The thumbnail of a poster, or None when its image cannot be read."""
        if not image:
            return None
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", poster_id)[:80]
        digest = _short_hash(poster_id)
        path = self.folder / f"{safe}-{digest}.jpg"
        if path.exists():
            return str(path)
        from clipposter.ingest.images import load_poster

        try:
            img = load_poster(image, draft_size=max(self.size))
        except ClipposterError as exc:
            log.warning("no thumbnail for %s: %s", poster_id, exc)
            return None
        img.thumbnail(self.size)
        with atomic_path(path, fsync=False) as tmp:  # a thumbnail can be made again: no need to sync
            img.save(tmp, format="JPEG", quality=85)
        return str(path)


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


# ------------------------------------------------------------------------------------------------
# handlers: requests → views
# ------------------------------------------------------------------------------------------------
class AppHandlers:
    """What the page's events call. Every method returns a view; bad input never raises."""

    def __init__(self, analyzer, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, samples: int = 12,
                 k: int = DEFAULT_K, num_return: int = DEFAULT_NUM_RETURN, thumbnails: Thumbnails | None = None):
        if max_upload_mb <= 0:
            raise ConfigError("max_upload_mb", f"must be positive, got {max_upload_mb}")
        self.analyzer = analyzer
        self.max_upload_mb = float(max_upload_mb)
        self.max_upload_bytes = int(self.max_upload_mb * 1024 * 1024)
        self.k = k
        self.num_return = num_return
        self.strategies = tuple(analyzer.strategies)
        self.genres = list(analyzer.genres)
        self.thumbnails = thumbnails or Thumbnails()
        self.sample_ids = list(analyzer.sample_ids(samples)) if samples > 0 else []
        # e.g. random weights: the page shows it at the top and every answer's JSON carries it
        self.notice: str | None = getattr(analyzer, "notice", None)
        self._most: dict[str, int] = {}

    # ----- inputs ---------------------------------------------------------------------------------
    def _options(self, strategy, num_return, k) -> tuple[str, int, int, str]:
        """(strategy, candidates, k, note): the note says when the strategy gives fewer candidates."""
        strategy = strategy or self.strategies[0]
        if strategy not in self.strategies:
            raise ClipposterError(f"unknown decoding strategy {strategy!r}; choose one of "
                                  f"{', '.join(self.strategies)}")
        try:
            num_return = int(num_return if num_return is not None else self.num_return)
            k = int(k if k is not None else self.k)
        except (TypeError, ValueError):
            raise ClipposterError("the number of taglines and of similar posters must be whole numbers") from None
        if not 1 <= num_return <= MAX_NUM_RETURN:
            raise ClipposterError(f"number of taglines must be between 1 and {MAX_NUM_RETURN}, got {num_return}")
        if not 0 <= k <= MAX_K:
            raise ClipposterError(f"number of similar posters must be between 0 and {MAX_K}, got {k}")
        most = self.most_candidates(strategy)
        note = f"{strategy} gives at most {most} candidate{'s' if most > 1 else ''}" if num_return > most else ""
        return strategy, min(num_return, most), k, note

    def most_candidates(self, strategy: str) -> int:
        """How many taglines a strategy can give per poster (greedy one, beam search as many as its
        beams): the page asks for at most that many and says so, instead of failing."""
        if strategy not in self._most:
            from clipposter.heads.caption.decoding import decoding_preset

            most = 1
            for n in range(MAX_NUM_RETURN, 0, -1):
                try:
                    decoding_preset(strategy, num_return=n)
                except ClipposterError:
                    continue
                most = n
                break
            self._most[strategy] = most
        return self._most[strategy]

    def check_upload(self, path: str | os.PathLike | None) -> str:
        """The upload's path once it passes the checks made before any decoding: it exists and is
        within the byte limit. (Pixel limits and the format are the analyzer's loader's to check.)"""
        if path is None or path == "":
            raise ClipposterError("no poster uploaded; choose a JPEG, PNG or WebP file")
        if isinstance(path, dict):  # a FileData payload from an API client
            path = path.get("path")
        path = str(path)
        name = Path(path).name
        try:
            size = os.path.getsize(path)
        except OSError:
            raise ClipposterError(f"{name}: the upload is missing on the server; upload it again") from None
        if size > self.max_upload_bytes:
            raise ClipposterError(f"{name}: {size / 2**20:.1f} MB is over the {self.max_upload_mb:g} MB upload "
                                  f"limit; upload a smaller poster (resize it or save it as JPEG)")
        return path

    # ----- requests -------------------------------------------------------------------------------
    def analyse_upload(self, path, strategy=None, num_return=None, k=None) -> AnalysisView:
        """An uploaded file: the status and error messages name it by its own file name, never by
        the server's temporary path."""
        shown_name = Path(str(path.get("path") if isinstance(path, dict) else path or "")).name
        try:
            options = self._options(strategy, num_return, k)
            checked = self.check_upload(path)
            return self._run(lambda s, n, kk: self.analyzer.analyze_files([checked], strategy=s, num_return=n,
                                                                              k=kk)[0],
                             options, query={"type": "upload", "name": shown_name}, preview=checked,
                             rename={checked: shown_name, str(Path(checked).parent) + os.sep: ""})
        except ClipposterError as exc:
            return self._error_view(_rename(str(exc), {str(path): shown_name}), {"type": "upload",
                                                                                 "name": shown_name})

    def analyse_sample(self, poster_id: str | None, strategy=None, num_return=None, k=None) -> AnalysisView:
        query = {"type": "id", "id": poster_id}
        try:
            if not poster_id:
                raise ClipposterError("no poster picked; click a sample poster or upload one")
            options = self._options(strategy, num_return, k)
            self.analyzer.record(poster_id)  # a clear error for an unknown id
            return self._run(lambda s, n, kk: self.analyzer.analyze_ids([poster_id], strategy=s, num_return=n,
                                                                            k=kk)[0],
                             options, query=query)
        except ClipposterError as exc:
            return self._error_view(str(exc), query)

    def search(self, text: str | None, k=None) -> SearchView:
        text = (text or "").strip()
        try:
            if not text:
                raise ClipposterError("type a text to search posters, e.g. \"a haunted house at night\"")
            k = self._options(None, None, k)[2]
            k = max(k, 1)
            start = time.perf_counter()
            hits = self.analyzer.search_text(text, k=k)
            elapsed = time.perf_counter() - start
        except ClipposterError as exc:
            return SearchView(error=str(exc), status=str(exc), details={"error": str(exc), "query": text})
        except Exception as exc:  # a bug: keep serving, say where to look
            log.exception("text search failed")
            msg = f"unexpected error ({type(exc).__name__}); see the server log"
            return SearchView(error=msg, status=msg, details={"error": msg, "query": text})
        results = [(thumb, _hit_caption(h)) for h in hits if (thumb := self.thumbnails.get(h.id, h.image))]
        status = f"{len(hits)} posters for {text!r} ({elapsed * 1000:.0f} ms)"
        details = {"query": text, "k": k, "results": [h.to_dict() for h in hits],
                   "elapsed_ms": round(elapsed * 1000, 1)}
        if self.notice:
            details["notice"] = self.notice
        return SearchView(status=status, results=results, details=details)

    def samples(self) -> list[tuple[str, str]]:
        """(thumbnail, caption) of the sample posters, in `sample_ids` order (unreadable ones dropped)."""
        out = []
        for poster_id in self.sample_ids:
            rec = self.analyzer.record(poster_id)
            thumb = self.thumbnails.get(poster_id, rec.image)
            if thumb:
                out.append((thumb, f"{poster_id} · {rec.title}" if rec.title else poster_id))
        return out

    # ----- shared ---------------------------------------------------------------------------------
    def _run(self, analyse, options, *, query: dict, rename: dict | None = None,
             preview: str | None = None) -> AnalysisView:
        strategy, num_return, k, note = options
        start = time.perf_counter()
        try:
            result = analyse(strategy, num_return, k)
        except ClipposterError as exc:
            return self._error_view(_rename(str(exc), rename or {}), query)
        except Exception as exc:  # a bug: keep serving, say where to look
            log.exception("analysis failed")
            return self._error_view(f"unexpected error ({type(exc).__name__}); see the server log", query)
        elapsed = time.perf_counter() - start
        label = result.id or query.get("name") or "poster"
        title = f" — {result.title}" if result.title else ""
        source = "cached embedding" if result.source == "cache" else "encoded now"
        predicted = ", ".join(result.predicted) or "none above threshold"
        status = f"{label}{title} ({source}, {elapsed * 1000:.0f} ms). Predicted genres: {predicted}"
        neighbours = [(thumb, _hit_caption(h)) for h in result.neighbours if (thumb := self.thumbnails.get(h.id, h.image))]
        details = result.to_dict()
        if query.get("type") == "upload":
            details["image"] = query.get("name")  # not the server's temporary path
        details.update(query=query, strategy=strategy, num_return=num_return, k=k,
                       elapsed_ms=round(elapsed * 1000, 1))
        if self.notice:
            details["notice"] = self.notice
        if preview is None and result.id:
            preview = self.thumbnails.get(result.id, result.image)
        return AnalysisView(status=status, image=preview,
                            chart_html=chart_html(result.probabilities, result.predicted, result.genres),
                            taglines_html=taglines_html(result.taglines, strategy, result.tagline, note),
                            neighbours=neighbours, details=details)

    @staticmethod
    def _error_view(message: str, query: dict) -> AnalysisView:
        return AnalysisView(error=message, status=message, details={"error": message, "query": query})


def _rename(message: str, rename: dict[str, str]) -> str:
    for old, new in sorted(rename.items(), key=lambda kv: -len(kv[0])):
        if old:
            message = message.replace(old, new)
    return message


def result_of(outputs: Any) -> dict:
    """The JSON result inside an API answer of the analyse or search endpoints (their last output)."""
    if isinstance(outputs, (list, tuple)) and outputs:
        value = outputs[-1]
        return value if isinstance(value, dict) else {"error": f"unexpected answer {value!r:.200}"}
    return {"error": f"unexpected answer {outputs!r:.200}"}
