"""`clipposter app`: the Gradio page over a `PosterAnalyzer`.

Upload a poster or pick a sample, and the page shows the genre probabilities as a bar chart (the
predicted genres marked), generated taglines (decoding strategy and number of candidates
selectable), and a gallery of the most similar posters; a text box searches posters by text.

What each request does lives in `app.handlers` (no Gradio, tested without a browser or a server);
this module only lays out the Gradio Blocks and wires the handlers to it. `launch` / `serve` start
it on 127.0.0.1 with analytics off, no share link, system fonts only (the page makes no request
outside the server), and an upload limit that the server enforces too.

Gradio is imported inside functions only: the CLI stays importable without it.
"""
from __future__ import annotations

import html
import os
import signal
import threading
from typing import Callable

from clipposter.app.config import (ANALYSE_API, DEFAULT_CONCURRENCY, DEFAULT_HOST, DEFAULT_K, DEFAULT_MAX_UPLOAD_MB,
                                   DEFAULT_NUM_RETURN, DEFAULT_PORT, DEFAULT_QUEUE_SIZE, DELETE_CACHE, GRADIO_MISSING,
                                   MAX_K, MAX_NUM_RETURN, SAMPLE_API, SEARCH_API, TRANSPORT_FACTOR)
from clipposter.app.handlers import AnalysisView, AppHandlers, Thumbnails, notice_html, status_html
from clipposter.errors import ClipposterError


def _gradio():
    """Import gradio with telemetry off (it reads the variable when Blocks are created)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise ClipposterError(GRADIO_MISSING) from None
    return gradio


CSS = """
.cp-status { padding: 0.6em 0.9em; border-radius: 6px; margin: 0.2em 0; }
.cp-info { background: #eef4ff; border: 1px solid #b6cdf5; color: #1d3561; }
.cp-error { background: #fdecea; border: 1px solid #e0a39b; color: #8a1f11; font-weight: 600; }
.cp-notice { background: #fff7ed; border: 2px solid #f97316; color: #7c2d12; }
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
        if handlers.notice:
            gr.HTML(notice_html(handlers.notice), elem_id="cp-notice", js_on_load=None)
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
