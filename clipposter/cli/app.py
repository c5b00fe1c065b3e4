"""`clipposter app`: the Gradio page (upload or pick a poster → genres, taglines, similar posters;
text search) on one run folder, or on a cache and two trained heads."""
from __future__ import annotations

import argparse
import json
import math
import sys

from clipposter.cli.common import add_device_flag, add_json_flag, open_analyzer
from clipposter.errors import ClipposterError


def cmd_app(args) -> int:
    from clipposter.app.page import launch, build_app

    if not math.isfinite(args.max_upload_mb) or args.max_upload_mb <= 0:
        raise ClipposterError(f"--max-upload-mb must be a positive number of megabytes, got {args.max_upload_mb}")
    if not 1 <= args.port <= 65535:
        raise ClipposterError(f"--port must be between 1 and 65535, got {args.port}")
    if args.samples < 0:
        raise ClipposterError(f"--samples must be zero or more, got {args.samples}")
    if args.concurrency < 1:
        raise ClipposterError(f"--concurrency must be at least 1, got {args.concurrency}")
    analyzer = open_analyzer(args, what="the app", pretrained=args.pretrained)
    try:
        blocks = build_app(analyzer, max_upload_mb=args.max_upload_mb, samples=args.samples,
                           concurrency=args.concurrency, queue_size=args.queue_size)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: serving on {args.host}: anyone who can reach this address can use the app",
                  file=sys.stderr)
        try:
            launch(blocks, host=args.host, port=args.port, block=True, quiet=args.json,
                   on_ready=(lambda url: _announce(url, analyzer)) if args.json else None)
        except OSError as exc:
            raise ClipposterError(f"cannot serve on {args.host}:{args.port} ({exc}); pick another --port") from None
    finally:
        analyzer.close()
    return 0


def _announce(url: str, analyzer) -> None:
    """--json: one line that a script starting the app can read to find it."""
    from clipposter.app.page import ANALYSE_API, SAMPLE_API, SEARCH_API

    print(json.dumps({"url": url, "api": [f"/{name}" for name in (ANALYSE_API, SAMPLE_API, SEARCH_API)], "cache": str(analyzer.cache.root),
                      "genres": analyzer.genres, "notice": analyzer.notice}), flush=True)


def register(sub, train, evaluate) -> None:
    """Add the `app` command to the top-level subparsers."""
    p = sub.add_parser("app", help="a local web page: upload a poster for genres, taglines and similar posters",
                       description="Serve a Gradio page on --host:--port (127.0.0.1:7860 by default): upload a "
                                   "poster or pick a sample to see its genre probabilities, generated taglines "
                                   "and the most similar posters, and search posters by text. Needs the `app` "
                                   "extra (pip install 'clipposter[app]').",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("what to serve (--run, or all three of --cache, --genre-head, --caption-head)")
    src.add_argument("--run", metavar="DIR", help="a run folder written by `clipposter demo` (holds run.json)")
    src.add_argument("--cache", metavar="DIR", help="embedding cache directory")
    src.add_argument("--genre-head", metavar="DIR", help="a trained genre head folder")
    src.add_argument("--caption-head", metavar="DIR", help="a trained caption head folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the app to the network")
    p.add_argument("--port", type=int, default=7860, help="port")
    p.add_argument("--max-upload-mb", type=float, default=10.0,
                   help="largest poster file accepted, in MB; larger uploads get an error in the page")
    p.add_argument("--samples", type=int, default=12, help="sample posters from the cache offered on the page")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests that run the models at once; the others wait in the queue")
    p.add_argument("--queue-size", type=int, default=256, help="requests that may wait; beyond it new ones are refused")
    p.add_argument("--pretrained", default=None,
                   help="the backbone checkpoint, when the one recorded in the cache has moved (text search and "
                        "posters the cache lacks)")
    add_device_flag(p)
    add_json_flag(p, help="print one JSON line (url, API endpoints) once the app is serving, instead of the banner")
    p.set_defaults(func=cmd_app)
