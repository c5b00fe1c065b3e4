"""Settings of `clipposter app` that the CLI's arguments and the page share; imports nothing heavy."""
from __future__ import annotations

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
