"""`clipposter app`: handlers (requests → views, no Gradio) and the Gradio page over them.

Importing this package imports no Gradio: the page imports it when it is built."""
from clipposter.app.config import ANALYSE_API, DEFAULT_HOST, DEFAULT_MAX_UPLOAD_MB, DEFAULT_PORT, SAMPLE_API, SEARCH_API
from clipposter.app.handlers import AnalysisView, AppHandlers, SearchView, Thumbnails, result_of
from clipposter.app.page import build_app, launch, serve

__all__ = ["ANALYSE_API", "SAMPLE_API", "SEARCH_API", "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_MAX_UPLOAD_MB",
           "AnalysisView", "SearchView", "AppHandlers", "Thumbnails", "result_of", "build_app", "launch", "serve"]
