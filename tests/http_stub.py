"""A local HTTP server on 127.0.0.1 for download tests: images, slow, flaky and failing answers, bodies
cut short, trickled or endless, redirects, a decompression bomb, and a folder of files under /files/.
No outside network is used."""
from __future__ import annotations

import contextlib
import functools
import io
import random
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image


def _encoded(fmt: str, color=(10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 24), color).save(buf, format=fmt)
    return buf.getvalue()


def _noise_jpeg() -> bytes:
    """A JPEG of random pixels: most of its bytes are scan data, so a cut leaves the headers whole
    (Pillow's verify() passes) and only a full decode sees that the picture is missing."""
    rng = random.Random(0)
    img = Image.frombytes("RGB", (64, 96), bytes(rng.randrange(256) for _ in range(64 * 96 * 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def bomb_png(side: int = 30_000) -> bytes:
    """A valid 1-bit PNG of side × side pixels (900 million by default, 10× Pillow's limit) whose
    all-black rows compress to about 100 KB: a decompression bomb."""
    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


PNG = _encoded("PNG")
JPEG = _encoded("JPEG")
NOISE_JPEG = _noise_jpeg()
CUT_JPEG = NOISE_JPEG[: len(NOISE_JPEG) * 6 // 10]  # headers whole, scan data cut
SLOW_SECONDS = 1.0
TRICKLE_INTERVAL = 0.05  # seconds between the bytes of /trickle: each read succeeds long before a timeout
TRICKLE_BYTES = 80  # 4 s of trickle
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

    def _send_head(self, status: int, content_type: str, length: int | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

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
        elif path.startswith("/noise/"):
            self._send(200, NOISE_JPEG, "image/jpeg")
        elif path == "/short":
            # Content-Length promises the whole JPEG; the connection closes after 60 % of it.
            self._send_head(200, "image/jpeg", len(NOISE_JPEG))
            self.wfile.write(CUT_JPEG)
        elif path == "/cut":
            # No Content-Length: the body runs to connection close, which comes after 60 % of the JPEG.
            self._send(200, CUT_JPEG, "image/jpeg", length=False)
        elif path == "/cut-once":
            self._send(200, CUT_JPEG if hits == 1 else NOISE_JPEG, "image/jpeg", length=False)
        elif path == "/trickle":
            # One byte at a time, each well within any read timeout, for longer than the tests' deadlines
            # (then the connection closes, so a client without a deadline fails the test in seconds, not minutes).
            self._send_head(200, "image/jpeg", len(NOISE_JPEG))
            for byte in NOISE_JPEG[:TRICKLE_BYTES]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(TRICKLE_INTERVAL)
        elif path == "/endless":
            # No Content-Length and no end: only a cap applied while reading stops it.
            self._send_head(200, "image/png", None)
            self.wfile.write(PNG)
            for _ in range(100_000):
                self.wfile.write(b"\0" * 65536)
        elif path == "/bomb":
            self._send(200, bomb_png(), "image/png")
        elif path.startswith("/redirect/"):
            # /redirect/<path> answers 302 to the same server's /<path>; /redirect-to?<url> to any URL.
            self._redirect(self.server.url("/" + path[len("/redirect/"):]))
        elif path == "/redirect-to":
            self._redirect(self.path.split("?", 1)[1])
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
