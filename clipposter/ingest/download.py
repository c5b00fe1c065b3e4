"""Fetch poster images for records that only have a URL.

Stdlib urllib in a thread pool: no extra dependency, and poster downloads are I/O bound. The
download is resumable (a poster already in out_dir costs no request), never leaves a partial
file under its final name, and every failure is kept with its reason for a CSV report.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import http.client
import io
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

from PIL import Image
from tqdm import tqdm

from clipposter.files import atomic_write_text
from clipposter.ingest.images import IMAGE_EXTENSIONS
from clipposter.records import PosterRecord

# PIL format -> suffix written. Only formats whose suffix the folder readers accept are kept,
# so every saved poster is found again by resume and by sources.from_folder / poster_dir.
FORMAT_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif",
                 "BMP": ".bmp", "TIFF": ".tif"}
# Resume looks for the common suffixes first.
RESUME_SUFFIXES = tuple(dict.fromkeys([".jpg", ".jpeg", ".png", ".webp", *sorted(IMAGE_EXTENSIONS)]))
CHUNK_BYTES = 64 * 1024
MAX_RETRY_AFTER_S = 60.0  # a server asking for an hour's pause should not stall the whole run

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class DownloadReport:
    """Counts of a download run and every failure as (id, url, reason)."""

    downloaded: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)

    def write_failures(self, path: str | os.PathLike) -> Path:
        """A CSV with columns id, url, reason (header only when nothing failed)."""
        buf = io.StringIO(newline="")
        writer = csv.writer(buf)
        writer.writerow(["id", "url", "reason"])
        writer.writerows(self.failed)
        return atomic_write_text(path, buf.getvalue())

    def summary(self) -> str:
        return (f"downloaded {self.downloaded}, already present {self.skipped_existing}, "
                f"failed {len(self.failed)}")

    def to_dict(self) -> dict:
        return {"downloaded": self.downloaded, "skipped_existing": self.skipped_existing,
                "failed": [{"id": i, "url": u, "reason": r} for i, u, r in self.failed]}


def safe_filename(record_id: str) -> str:
    """A file stem for an id; ids that need changing get a hash suffix so two never collide."""
    safe = _UNSAFE.sub("_", record_id).strip("._")[:120]
    if safe != record_id:
        safe = f"{safe or 'poster'}-{hashlib.sha1(record_id.encode()).hexdigest()[:8]}"
    return safe


def image_format(path: str | os.PathLike) -> str | None:
    """The PIL format name when the file is a readable image, else None."""
    try:
        with Image.open(path) as img:
            fmt = img.format
            img.verify()
        return fmt
    except Exception:  # PIL raises many unrelated types (SyntaxError, struct.error, ...) on bad data
        return None


def _existing(out_dir: Path, stem: str) -> tuple[Path | None, list[Path]]:
    """(a valid image already saved for stem, saved files that do not decode)."""
    broken: list[Path] = []
    for suffix in RESUME_SUFFIXES:
        candidate = out_dir / f"{stem}{suffix}"
        if candidate.is_file():
            if image_format(candidate) is not None:
                return candidate, broken
            broken.append(candidate)
    return None, broken


class _Retryable(Exception):
    """A failure worth another attempt: timeouts, dropped connections, 5xx and 429."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class _Fatal(Exception):
    """A failure another attempt would repeat: 4xx, wrong content type, too large, not an image."""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):  # not delay-seconds: it may be the HTTP-date form
        return max(0.0, float(value))
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class _Options:
    out_dir: Path
    timeout: float
    retries: int
    backoff: float
    max_bytes: int
    user_agent: str


def _attempt(url: str, stem: str, opts: _Options) -> Path:
    """One request; the image lands under its final name only after it has been verified."""
    request = urllib.request.Request(url, headers={"User-Agent": opts.user_agent, "Accept": "image/*"})
    try:
        response = urllib.request.urlopen(request, timeout=opts.timeout)
    except urllib.error.HTTPError as exc:
        reason, wait = f"HTTP {exc.code} {exc.reason}", _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
        exc.close()
        if exc.code >= 500 or exc.code == 429:
            raise _Retryable(reason, wait) from None
        raise _Fatal(reason) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise _Retryable(f"timeout after {opts.timeout}s") from None
        raise _Retryable(f"connection error: {exc.reason}") from None
    except TimeoutError:
        raise _Retryable(f"timeout after {opts.timeout}s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Retryable(f"connection error: {exc!r}") from None

    with response:
        content_type = response.headers.get("Content-Type")
        if content_type is None:
            raise _Fatal("not an image: no content-type")
        main_type = response.headers.get_content_type()
        if not main_type.startswith("image/"):
            raise _Fatal(f"not an image: content-type {main_type}")
        length = response.headers.get("Content-Length")
        if length and length.strip().isdigit() and int(length) > opts.max_bytes:
            raise _Fatal(f"too large: Content-Length {int(length)} bytes > max_bytes {opts.max_bytes}")

        # A hidden temp name in out_dir: os.replace is then atomic and folder scans skip it. Not
        # files.atomic_path: the final name (its suffix) is known only once the streamed body decodes.
        fd, tmp_name = tempfile.mkstemp(dir=opts.out_dir, prefix=f".{stem}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                total = 0
                while True:
                    try:
                        chunk = response.read(CHUNK_BYTES)
                    except TimeoutError:
                        raise _Retryable(f"timeout after {opts.timeout}s while reading") from None
                    except (OSError, http.client.HTTPException) as exc:
                        raise _Retryable(f"connection error while reading: {exc!r}") from None
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > opts.max_bytes:
                        raise _Fatal(f"too large: body exceeds max_bytes {opts.max_bytes}")
                    fh.write(chunk)
            fmt = image_format(tmp)
            if fmt is None:
                raise _Fatal(f"not an image: body does not decode (content-type {main_type}, {total} bytes)")
            if fmt not in FORMAT_SUFFIX:
                raise _Fatal(f"unsupported image format {fmt}; posters must be JPEG, PNG, WebP, GIF, BMP or TIFF")
            final = opts.out_dir / f"{stem}{FORMAT_SUFFIX[fmt]}"
            os.replace(tmp, final)
            return final
        finally:
            tmp.unlink(missing_ok=True)


def _fetch(url: str, stem: str, opts: _Options) -> tuple[Path | None, str | None]:
    """(saved path, None) or (None, reason), retrying with exponential backoff."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        # file:// and friends would read local files named by an untrusted manifest.
        return None, f"unsupported URL scheme {scheme or '(none)'!r}; only http and https"
    attempt = 0
    while True:
        try:
            return _attempt(url, stem, opts), None
        except _Fatal as exc:
            return None, str(exc)
        except _Retryable as exc:
            if attempt >= opts.retries:
                tries = attempt + 1
                return None, f"{exc} ({tries} attempt{'s' if tries > 1 else ''})"
            delay = opts.backoff * 2 ** attempt
            if exc.wait is not None:
                delay = min(max(delay, exc.wait), MAX_RETRY_AFTER_S)
            time.sleep(delay)
            attempt += 1


def download_posters(records: Iterable[PosterRecord], out_dir: str | os.PathLike, *, workers: int = 8,
                     timeout: float = 10.0, retries: int = 3, backoff: float = 0.5,
                     max_bytes: int = 20_000_000, user_agent: str = "clipposter/0.1",
                     progress: bool = True) -> DownloadReport:
    """Download the poster of every record that has a URL but no image file, into out_dir.

    Files are named <safe id><suffix of the decoded format>. A valid image already saved for an
    id is reused without a request (resume). Timeouts, connection errors, 5xx and 429 are retried
    `retries` times with backoff * 2**attempt seconds between tries; other 4xx, non-image
    content types, bodies over `max_bytes` and bodies that do not decode fail at once. Sets
    record.image for every poster downloaded or found; failures are listed in the report.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    opts = _Options(out, timeout, retries, backoff, max_bytes, user_agent)
    report = DownloadReport()

    # One job per file stem: records sharing an id share one download.
    jobs: dict[str, list[PosterRecord]] = {}
    for rec in records:
        if not rec.url or (rec.image and os.path.isfile(rec.image)):
            continue
        jobs.setdefault(safe_filename(rec.id), []).append(rec)

    pending: dict[str, tuple[list[PosterRecord], list[Path]]] = {}
    for stem, group in jobs.items():
        found, broken = _existing(out, stem)
        if found is not None:
            for rec in group:
                rec.image = str(found)
            report.skipped_existing += 1
        else:
            pending[stem] = (group, broken)

    with tqdm(total=len(pending), desc="posters", unit="poster", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_fetch, group[0].url, stem, opts): stem for stem, (group, _) in pending.items()}
        for future in as_completed(futures):
            stem = futures[future]
            group, broken = pending[stem]
            saved, reason = future.result()
            if saved is not None:
                for rec in group:
                    rec.image = str(saved)
                for stale in broken:  # an undecodable earlier copy under another suffix
                    if stale != saved:
                        stale.unlink(missing_ok=True)
                report.downloaded += 1
            else:
                report.failed.extend((rec.id, rec.url or "", reason or "unknown") for rec in group)
            bar.update(1)
    report.failed.sort()
    return report
