"""`clipposter app`: a Gradio page over a `PosterAnalyzer`.

Upload a poster or pick a sample, and the page shows the genre probabilities as a bar chart (the
predicted genres marked), generated taglines (decoding strategy and number of candidates
selectable), and a gallery of the most similar posters; a text box searches posters by text.

The work is split in two so that it can be tested without a browser or a server:

- `AppHandlers` turns requests (an uploaded file, a sample id, a text) into `AnalysisView` /
  `SearchView` objects: plain data and escaped HTML fragments. It never raises for bad input: an
  unusable upload (not an image, over the byte limit, over the pixel limit) becomes a view whose
  `error` names the file and says what to do, so the page shows it and the server stays up.
- `build_app` lays out the Gradio Blocks and wires the handlers to it; `launch` / `serve` start
  it on 127.0.0.1 with analytics off, no share link, system fonts only (the page makes no request
  outside the server), and an upload limit that the server enforces too.

Gradio is imported inside functions only: the CLI stays importable without it.
"""
from __future__ import annotations

import atexit
import html
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from clipposter.errors import ClipposterError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 10.0
DEFAULT_K = 8
DEFAULT_NUM_RETURN = 3
MAX_NUM_RETURN = 8
MAX_K = 32
# Named API endpoints (POST /gradio_api/call/<name>); scripts/bench/app_load.py calls them.
ANALYSE_API = "analyse_poster"
SAMPLE_API = "analyse_sample"
SEARCH_API = "search_text"
# The models run one request at a time (the analyzer serialises its calls anyway, and on a small
# CPU two concurrent forward passes only contend for the same cores); the queue holds the rest.
DEFAULT_CONCURRENCY = 1
DEFAULT_QUEUE_SIZE = 256
THUMBNAIL_SIZE = (320, 480)
# Gradio's own upload limit (enforced by the server while the upload streams in, and checked by
# the page before sending) is this many times --max-upload-mb: files between the two limits reach
# the handler, which answers with a message in the page; beyond it the page refuses the file itself.
TRANSPORT_FACTOR = 4
# Uploads and Gradio's copies of served files are deleted after an hour (checked hourly).
DELETE_CACHE = (3600, 3600)
GRADIO_MISSING = "gradio is not installed; pip install 'clipposter[app]'"


def _gradio():
    """Import gradio with telemetry off (it reads the variable when Blocks are created)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise ClipposterError(GRADIO_MISSING) from None
    return gradio


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
        self._lock = threading.Lock()

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
        with self._lock:
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            img.save(tmp, format="JPEG", quality=85)
            os.replace(tmp, path)
        return str(path)


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


# ------------------------------------------------------------------------------------------------
# handlers: requests → views, gradio-free
# ------------------------------------------------------------------------------------------------
class AppHandlers:
    """What the page's events call. Every method returns a view; bad input never raises."""

    def __init__(self, analyzer, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, samples: int = 12,
                 k: int = DEFAULT_K, num_return: int = DEFAULT_NUM_RETURN, thumbnails: Thumbnails | None = None):
        if max_upload_mb <= 0:
            raise ClipposterError(f"--max-upload-mb must be positive, got {max_upload_mb}")
        self.analyzer = analyzer
        self.max_upload_mb = float(max_upload_mb)
        self.max_upload_bytes = int(self.max_upload_mb * 1024 * 1024)
        self.k = k
        self.num_return = num_return
        self.strategies = tuple(analyzer.strategies)
        self.genres = list(analyzer.genres)
        self.thumbnails = thumbnails or Thumbnails()
        self.sample_ids = list(analyzer.sample_ids(samples)) if samples > 0 else []
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
        return SearchView(status=status, results=results,
                          details={"query": text, "k": k, "results": [h.to_dict() for h in hits],
                                   "elapsed_ms": round(elapsed * 1000, 1)})

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


# ------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------
CSS = """
.cp-status { padding: 0.6em 0.9em; border-radius: 6px; margin: 0.2em 0; }
.cp-info { background: #eef4ff; border: 1px solid #b6cdf5; color: #1d3561; }
.cp-error { background: #fdecea; border: 1px solid #e0a39b; color: #8a1f11; font-weight: 600; }
.cp-chart { display: flex; flex-direction: column; gap: 4px; }
.cp-row { display: grid; grid-template-columns: 11em 1fr 4em; align-items: center; gap: 8px; }
.cp-genre { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.cp-track { background: #eceff3; height: 1.1em; border-radius: 3px; overflow: hidden; }
.cp-bar { display: block; height: 100%; background: #a9b4c2; }
.cp-predicted .cp-bar { background: #2f6fdf; }
.cp-predicted .cp-genre { font-weight: 700; }
.cp-prob { text-align: right; font-variant-numeric: tabular-nums; }
.cp-label { font-size: 0.75em; border: 1px solid #999; border-radius: 3px; padding: 0 3px; }
.cp-legend, .cp-strategy, .cp-reference { font-size: 0.85em; opacity: 0.8; }
"""


# Gradio shows the page's own refusals (a file over the transport limit) in a toast that fades
# after a few seconds; this copies their text into a box above the status line, where it stays
# until the next answer replaces the status. It relies only on the toast's data-testid.
CLIENT_ERRORS_JS = """
() => {
  const status = () => document.getElementById("cp-status");
  const show = (text) => {
    const anchor = status();
    if (!anchor) return;
    let box = document.getElementById("cp-client-error");
    if (!box) {
      box = document.createElement("div");
      box.id = "cp-client-error";
      box.className = "cp-status cp-error";
      box.setAttribute("role", "alert");
      anchor.parentElement.insertBefore(box, anchor);
    }
    box.textContent = "Error: " + text;
    box.style.display = "";
  };
  const seen = new WeakSet();
  new MutationObserver(() => {
    for (const el of document.querySelectorAll('[data-testid="toast-text"].error')) {
      if (!seen.has(el)) { seen.add(el); show(el.textContent.trim()); }
    }
  }).observe(document.body, {childList: true, subtree: true});
  const watch = () => {
    const anchor = status();
    if (!anchor) return setTimeout(watch, 200);
    new MutationObserver(() => {
      const box = document.getElementById("cp-client-error");
      if (box) box.style.display = "none";
    }).observe(anchor, {childList: true, subtree: true, characterData: true});
  };
  watch();
}
"""


def _theme(gr):
    # System fonts only: the default themes load web fonts, and the page must not reach outside.
    return gr.themes.Base(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_app(analyzer, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, samples: int = 12, k: int = DEFAULT_K,
              num_return: int = DEFAULT_NUM_RETURN, concurrency: int = DEFAULT_CONCURRENCY,
              queue_size: int = DEFAULT_QUEUE_SIZE, title: str = "clipposter",
              thumbnails: Thumbnails | None = None):
    """The Gradio Blocks of the app. Start it with `launch(blocks)` (which applies the theme, the
    upload limit and the served folders), or `serve(analyzer)` to do both."""
    gr = _gradio()
    handlers = AppHandlers(analyzer, max_upload_mb=max_upload_mb, samples=samples, k=k, num_return=num_return,
                           thumbnails=thumbnails)
    sample_items = handlers.samples()

    def analysis_outputs(view: AnalysisView, query=None):
        # The upload box is emptied after each request, so the next poster can be dropped at once
        # (the status line names the file, the preview shows it).
        return (None, status_html(view.status, error=not view.ok), view.image if view.ok else None,
                view.chart_html, view.taglines_html, view.neighbours, query if view.ok else gr.skip(),
                view.details)

    def on_upload(path, strategy, num_return, k_):
        view = handlers.analyse_upload(path, strategy, num_return, k_)
        return analysis_outputs(view, ("upload", path))

    def on_sample(poster_id, strategy, num_return, k_):
        return analysis_outputs(handlers.analyse_sample(poster_id, strategy, num_return, k_), ("id", poster_id))

    def on_pick(strategy, num_return, k_, evt):
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        poster_id = handlers.sample_ids[index] if 0 <= index < len(handlers.sample_ids) else None
        return on_sample(poster_id, strategy, num_return, k_)

    # Gradio passes the clicked item to a parameter annotated SelectData; with postponed
    # annotations the hint is a string it cannot resolve here, so set the real class.
    on_pick.__annotations__["evt"] = gr.SelectData

    def on_again(last, strategy, num_return, k_):
        if not last:
            view = AnalysisView(error="nothing to analyse yet; upload a poster or click a sample",
                                status="nothing to analyse yet; upload a poster or click a sample")
            return analysis_outputs(view)
        kind, value = last
        return on_upload(value, strategy, num_return, k_) if kind == "upload" else \
            on_sample(value, strategy, num_return, k_)

    def on_search(text, k_):
        view = handlers.search(text, k_)
        return status_html(view.status, error=not view.ok), view.results, view.details

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=DELETE_CACHE) as blocks:
        gr.Markdown(f"# {html.escape(title)}\nGenres, taglines and similar posters from frozen CLIP embeddings. "
                    f"Upload a poster (JPEG, PNG or WebP, at most {handlers.max_upload_mb:g} MB) or click a "
                    f"sample.")
        last = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label=f"Poster file (at most {handlers.max_upload_mb:g} MB)", file_count="single",
                                 type="filepath", elem_id="cp-upload")
                strategy = gr.Radio(list(handlers.strategies), value=handlers.strategies[0],
                                    label="Tagline decoding strategy", elem_id="cp-strategy")
                candidates = gr.Slider(1, MAX_NUM_RETURN, value=num_return, step=1, label="Tagline candidates")
                k_slider = gr.Slider(0, MAX_K, value=k, step=1, label="Similar posters")
                again = gr.Button("Analyse again", variant="secondary")
                preview = gr.Image(label="Poster", type="filepath", interactive=False, height=360,
                                   elem_id="cp-preview")
            with gr.Column(scale=2):
                status = gr.HTML(status_html("Upload a poster or click a sample below."), elem_id="cp-status",
                                 js_on_load=None)
                gr.Markdown("### Genre probabilities")
                chart = gr.HTML(elem_id="cp-chart", js_on_load=None)
                gr.Markdown("### Generated taglines")
                taglines = gr.HTML(elem_id="cp-taglines-box", js_on_load=None)
                neighbours = gr.Gallery(label="Similar posters", columns=4, height=None, object_fit="contain",
                                        elem_id="cp-neighbours", interactive=False)
                with gr.Accordion("Result as JSON", open=False):
                    details = gr.JSON(elem_id="cp-details")
        sample_gallery = gr.Gallery(sample_items, label="Samples from the cache (click one)", columns=6,
                                    height=None, object_fit="contain", allow_preview=False,
                                    elem_id="cp-samples", interactive=False)
        sample_id = gr.Textbox(visible=False)  # the API's way in: analyse a cached poster by id
        gr.Markdown("## Search posters by text")
        with gr.Row():
            query = gr.Textbox(label="Text", placeholder="a haunted house at night", scale=4, elem_id="cp-query")
            search_button = gr.Button("Search", variant="primary", scale=1, elem_id="cp-search-button")
        search_status = gr.HTML(elem_id="cp-search-status", js_on_load=None)
        results = gr.Gallery(label="Posters matching the text", columns=6, height=None, object_fit="contain",
                             elem_id="cp-results", interactive=False)
        search_details = gr.JSON(visible=False)

        # The JSON result is the last output an API client sees.
        outputs = [upload, status, preview, chart, taglines, neighbours, last, details]
        options = [strategy, candidates, k_slider]
        # Every model call shares one concurrency group: requests beyond `concurrency` wait in the
        # queue (up to `queue_size`) instead of running side by side on the same cores.
        common = dict(concurrency_limit=concurrency, concurrency_id="models", show_progress="minimal")
        upload.upload(on_upload, [upload] + options, outputs, api_name=ANALYSE_API, **common)
        sample_gallery.select(on_pick, options, outputs, api_visibility="private", **common)
        sample_id.submit(on_sample, [sample_id] + options, outputs, api_name=SAMPLE_API, **common)
        for trigger in (again.click, strategy.input, candidates.release, k_slider.release):
            trigger(on_again, [last] + options, outputs, api_visibility="private", **common)
        search_outputs = [search_status, results, search_details]
        search_button.click(on_search, [query, k_slider], search_outputs, api_name=SEARCH_API, **common)
        query.submit(on_search, [query, k_slider], search_outputs, api_visibility="private", **common)
    blocks.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    blocks.clipposter_handlers = handlers
    blocks.clipposter_launch = dict(max_file_size=int(handlers.max_upload_bytes * TRANSPORT_FACTOR),
                                    allowed_paths=[str(handlers.thumbnails.folder)])
    return blocks


def launch(blocks, *, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT, block: bool = True,
           quiet: bool = False, on_ready: Callable[[str], None] | None = None) -> str:
    """Start a Blocks made by `build_app` and return its local URL. With block=False it runs in
    background threads (tests, the load script); `blocks.close()` stops it. `on_ready(url)` is
    called once the server answers (before blocking)."""
    gr = _gradio()
    options = getattr(blocks, "clipposter_launch", {})
    _, url, _ = blocks.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True,
                              quiet=True, show_error=False, ssr_mode=False, mcp_server=False, pwa=False,
                              enable_monitoring=False, footer_links=["api"], theme=_theme(gr), css=CSS, js=CLIENT_ERRORS_JS,
                              **options)
    url = url or f"http://{host}:{port}/"
    if not quiet:
        print(f"clipposter app on {url} (Ctrl+C stops it)", flush=True)
    if on_ready is not None:
        on_ready(url)
    if block:
        if threading.current_thread() is threading.main_thread():
            # SIGTERM stops the app like Ctrl+C, so it closes and its temporary folders are removed.
            signal.signal(signal.SIGTERM, _interrupt)
        try:
            blocks.block_thread()
        finally:
            blocks.close()
    return url


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(analyzer, *, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, block: bool = True, quiet: bool = False, **build_kw):
    """Build the app for `analyzer` and start it; returns (blocks, url) once it stops (block=True)
    or at once (block=False)."""
    blocks = build_app(analyzer, max_upload_mb=max_upload_mb, **build_kw)
    url = launch(blocks, host=host, port=port, block=block, quiet=quiet)
    return blocks, url


def result_of(outputs: Any) -> dict:
    """The JSON result inside an API answer of the analyse or search endpoints (their last output)."""
    if isinstance(outputs, (list, tuple)) and outputs:
        value = outputs[-1]
        return value if isinstance(value, dict) else {"error": f"unexpected answer {value!r:.200}"}
    return {"error": f"unexpected answer {outputs!r:.200}"}
