"""A local HTTP server on 127.0.0.1 for download tests: images, slow, flaky and failing answers, and a
folder of files under /files/. No outside network is used."""
from __future__ import annotations

import contextlib
import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image


def _encoded(fmt: str, color=(10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 24), color).save(buf, format=fmt)
    return buf.getvalue()


PNG = _encoded("PNG")
JPEG = _encoded("JPEG")
SLOW_SECONDS = 1.0
FAST = dict(timeout=0.3, retries=1, backoff=0.01, progress=False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: Path | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.files = files  # served under /files/<name> (real posters for end-to-end runs)

    def handle_error(self, request, client_address):
        pass  # the slow handler writes to a socket the client already closed; that is expected

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args):
        pass

    def _send(self, status: int, body: bytes, content_type: str | None, length: bool = True) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.hits[path] += 1
            hits = self.server.hits[path]
        if path.startswith("/png/"):
            self._send(200, PNG, "image/png")
        elif path.startswith("/jpeg/"):
            self._send(200, JPEG, "image/jpeg; charset=binary")
        elif path == "/slow":
            time.sleep(SLOW_SECONDS)
            self._send(200, PNG, "image/png")
        elif path == "/flaky":
            if hits == 1:
                self._send(503, b"busy", "text/plain")
            else:
                self._send(200, JPEG, "image/jpeg")
        elif path == "/error":
            self._send(500, b"boom", "text/plain")
        elif path == "/html":
            self._send(200, b"<html><body>Not found, but 200</body></html>", "text/html; charset=utf-8")
        elif path == "/ppm":
            self._send(200, _encoded("PPM"), "image/x-portable-pixmap")
        elif path == "/fake.jpg":
            self._send(200, b"this is not a jpeg at all" * 10, "image/jpeg")
        elif path == "/big":
            self._send(200, PNG + b"\0" * 5000, "image/png")
        elif path == "/big-stream":
            # No Content-Length: HTTP/1.0 body runs to connection close, so only streaming can catch it.
            self._send(200, PNG + b"\0" * 5000, "image/png", length=False)
        elif path.startswith("/files/") and self.server.files is not None:
            name = path[len("/files/"):]
            target = self.server.files / name
            if "/" in name or not target.is_file():
                self._send(404, b"not here", "text/plain")
            else:
                self._send(200, target.read_bytes(), "image/jpeg" if target.suffix == ".jpg" else "image/png")
        else:
            self._send(404, b"not here", "text/plain")


@contextlib.contextmanager
def serving(files: Path | None = None):
    """A local test server on 127.0.0.1 (a free port), serving `files` under /files/ too."""
    srv = _Server(files)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
