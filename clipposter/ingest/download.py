"""Fetch poster images for records that only have a URL.

Stdlib urllib in a thread pool: no extra dependency, and poster downloads are I/O bound. The
download is resumable (a poster already in out_dir costs no request), never leaves a partial
file under its final name, and every failure is kept with its reason for a CSV report.

A body counts only when every byte the server promised arrived and the whole image decodes (a JPEG
cut in its scan data passes Pillow's `verify()`; only decoding the pixels sees the hole). Files
found on resume are decoded once too; the folder's stamp file (STAMP_NAME) then records each good
file's size and mtime, so later runs trust it without opening it again.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import http.client
import io
import json
import math
import os
import re
import stat
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Iterable
from urllib.parse import urljoin, urlsplit

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from clipposter.errors import ClipposterError, ConfigError
from clipposter.files import atomic_write_text
from clipposter.ingest.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, check_limits
from clipposter.records import PosterRecord

# PIL format -> suffix written. Only formats whose suffix the folder readers accept are kept,
# so every saved poster is found again by resume and by sources.from_folder / poster_dir.
FORMAT_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif",
                 "BMP": ".bmp", "TIFF": ".tif"}
# Resume looks for the common suffixes first.
RESUME_SUFFIXES = tuple(dict.fromkeys([".jpg", ".jpeg", ".png", ".webp", *sorted(IMAGE_EXTENSIONS)]))
SCHEMES = ("http", "https")
CHUNK_BYTES = 64 * 1024
MAX_RETRY_AFTER_S = 60.0  # a server asking for an hour's pause should not stall the whole run
# The default deadline of one URL, retries and pauses included, in read timeouts: room for a slow
# but steady transfer and a retry or two, while a server that trickles a byte at a time (each read
# well within the timeout) cannot hold a worker for long.
DEADLINE_TIMEOUTS = 6
# Hidden (folder readers skip it): file name -> [size, mtime_ns] of posters that decoded in full.
STAMP_NAME = ".clipposter-verified.json"
STAMP_EVERY_S = 30.0  # a long run saves the stamps it has this often, so a kill loses little

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


class _BadImage(Exception):
    """Why a file is not a usable poster; `kind` is one of unidentified, format, bomb, truncated, corrupt."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.kind = kind


def _bomb_reason(limit: int, size: str) -> str:
    return f"image larger than the pixel limit ({limit} pixels): {size}, a decompression bomb?"


def _check_image(path: Path, max_pixels: int) -> str:
    """The PIL format of a poster file whose every pixel decodes; _BadImage otherwise."""
    try:
        with Image.open(path) as img:
            fmt = img.format
            if fmt not in FORMAT_SUFFIX:  # checked before load(): no exotic decoder ever runs
                raise _BadImage(f"unsupported image format {fmt}; posters must be JPEG, PNG, WebP, GIF, BMP or "
                                f"TIFF", "format")
            width, height = img.size
            if width * height > max_pixels:
                raise _BadImage(_bomb_reason(max_pixels, f"{width}×{height}"), "bomb")
            img.load()  # every pixel: a body cut short fails here (Pillow never pads unless told to)
        return fmt
    except _BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own limit (its global MAX_IMAGE_PIXELS) refused it before ours could look.
        match = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(match.group(1)) if match else None
        pillow = (1 if isinstance(exc, Warning) else 2) * (Image.MAX_IMAGE_PIXELS or 0)
        limit = max_pixels if pixels is None or pixels > max_pixels else pillow
        raise _BadImage(_bomb_reason(limit, f"{pixels} pixels" if pixels else "too many pixels"), "bomb") from None
    except UnidentifiedImageError:
        raise _BadImage("not an image: body does not decode", "unidentified") from None
    except MemoryError:
        raise _BadImage("not enough memory to decode the image", "corrupt") from None
    except Exception as exc:  # PIL raises many unrelated types (SyntaxError, struct.error, ...) on bad data
        if "truncated" in str(exc):
            raise _BadImage(f"image data truncated: {exc}", "truncated") from None
        raise _BadImage(f"not an image: body does not decode ({type(exc).__name__}: {exc})", "corrupt") from None


class _Retryable(Exception):
    """A failure worth another attempt: timeouts, dropped connections, 5xx and 429."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class _Fatal(Exception):
    """A failure another attempt would repeat: 4xx, wrong content type, too large, not an image."""


class _DeadlinePassed(_Fatal):
    """The URL's deadline passed; no further attempt."""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):  # not delay-seconds: it may be the HTTP-date form
        return max(0.0, float(value))
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http and https only. urllib's own handler follows ftp:// too, and answers
    file:// with an HTTP error that does not say why; a manifest's URL must not reach either."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            scheme = urlsplit(urljoin(req.full_url, target)).scheme.lower()
            if scheme not in SCHEMES:
                fp.close()
                raise _Fatal(f"redirect to unsupported URL scheme {scheme!r}; only http and https")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


@dataclass(frozen=True)
class _Options:
    out_dir: Path
    timeout: float
    retries: int
    backoff: float
    deadline: float
    max_bytes: int
    max_pixels: int
    user_agent: str
    opener: urllib.request.OpenerDirector


def _open(url: str, opts: _Options, end: float):
    """The response to one GET, or _Retryable / _Fatal."""
    request = urllib.request.Request(url, headers={"User-Agent": opts.user_agent, "Accept": "image/*"})
    # A socket wait never runs past the URL's deadline by more than a millisecond's rounding.
    timeout = max(min(opts.timeout, end - time.monotonic()), 0.001)
    try:
        return opts.opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}"
        wait = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
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


def _attempt(url: str, stem: str, opts: _Options, end: float) -> Path:
    """One request; the image lands under its final name only after all of it has decoded."""
    with _open(url, opts, end) as response:
        content_type = response.headers.get("Content-Type")
        if content_type is None:
            raise _Fatal("not an image: no content-type")
        main_type = response.headers.get_content_type()
        if not main_type.startswith("image/"):
            raise _Fatal(f"not an image: content-type {main_type}")
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.strip().isdigit() else None
        if expected is not None and expected > opts.max_bytes:
            raise _Fatal(f"too large: Content-Length {expected} bytes > max_bytes {opts.max_bytes}")

        # A hidden temp name in out_dir: os.replace is then atomic and folder scans skip it. Not
        # files.atomic_path: the final name (its suffix) is known only once the streamed body decodes.
        fd, tmp_name = tempfile.mkstemp(dir=opts.out_dir, prefix=f".{stem}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                total = 0
                while True:
                    try:
                        # read1: what one socket read brings, so the deadline is checked between reads
                        # even when a server sends a byte at a time.
                        chunk = response.read1(CHUNK_BYTES)
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
                    if time.monotonic() > end:
                        raise _DeadlinePassed(f"deadline of {opts.deadline:g}s passed while reading "
                                              f"({total} bytes in)")
            if expected is not None and total < expected:
                # http.client ends a body that stops short of its Content-Length without an error.
                raise _Retryable(f"connection closed after {total} of {expected} bytes")
            try:
                fmt = _check_image(tmp, opts.max_pixels)
            except _BadImage as exc:
                if exc.kind == "truncated" and expected is None:
                    # The body ran to connection close: a dropped connection looks just like this.
                    raise _Retryable(f"{exc} (no Content-Length: the connection may have closed early)") from None
                if exc.kind in ("unidentified", "truncated", "corrupt"):
                    raise _Fatal(f"{exc} (content-type {main_type}, {total} bytes)") from None
                raise _Fatal(str(exc)) from None
            final = opts.out_dir / f"{stem}{FORMAT_SUFFIX[fmt]}"
            os.replace(tmp, final)
            return final
        finally:
            tmp.unlink(missing_ok=True)


def _fetch(url: str, stem: str, opts: _Options) -> tuple[Path | None, str | None]:
    """(saved path, None) or (None, reason), retrying with exponential backoff until the deadline."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        # file:// and friends would read local files named by an untrusted manifest.
        return None, f"unsupported URL scheme {scheme or '(none)'!r}; only http and https"
    end = time.monotonic() + opts.deadline
    attempt = 0
    while True:
        try:
            return _attempt(url, stem, opts, end), None
        except _Fatal as exc:
            return None, str(exc)
        except _Retryable as exc:
            tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
            if attempt >= opts.retries:
                return None, f"{exc} ({tries})"
            delay = opts.backoff * 2 ** attempt
            if exc.wait is not None:
                delay = min(max(delay, exc.wait), MAX_RETRY_AFTER_S)
            if time.monotonic() + delay >= end:
                return None, f"deadline of {opts.deadline:g}s passed: {exc} ({tries})"
            time.sleep(delay)
            attempt += 1


# ---------------------------------------------------------------------------- resume and stamps

def _load_stamps(out_dir: Path) -> dict[str, tuple[int, int]]:
    """The stamps of earlier runs; a missing or damaged stamp file only means decoding again."""
    try:
        with open(out_dir / STAMP_NAME, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    return {name: (mark[0], mark[1]) for name, mark in files.items()
            if isinstance(mark, list) and len(mark) == 2 and all(type(v) is int for v in mark)}


def _save_stamps(out_dir: Path, stamps: dict[str, tuple[int, int]]) -> None:
    payload = {"version": 1, "files": {name: list(mark) for name, mark in sorted(stamps.items())}}
    with contextlib.suppress(OSError):  # a stamp not written costs one decode on the next run, nothing more
        atomic_write_text(out_dir / STAMP_NAME, json.dumps(payload, separators=(",", ":")) + "\n")


def _mark(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a regular file, else None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


@dataclass
class _Outcome:
    saved: Path | None
    reason: str | None = None
    present: bool = False  # found in out_dir, no request made
    stamp: tuple[int, int] | None = None  # for saved, when it was decoded in this run
    broken: list[Path] = field(default_factory=list)  # files of this poster that do not decode


def _resolve(url: str, stem: str, candidates: list[Path], opts: _Options,
             stamps: dict[str, tuple[int, int]]) -> _Outcome:
    """A good poster already in out_dir (stamped, or decoded now), else a download."""
    broken: list[Path] = []
    for path in candidates:
        mark = _mark(path)
        if mark is None:
            continue
        if stamps.get(path.name) == mark:
            return _Outcome(path, present=True)
        try:
            _check_image(path, opts.max_pixels)
        except _BadImage:
            broken.append(path)
            continue
        return _Outcome(path, present=True, stamp=mark)
    saved, reason = _fetch(url, stem, opts)
    return _Outcome(saved, reason, stamp=_mark(saved) if saved is not None else None, broken=broken)


def _check_settings(workers: int, timeout: float, retries: int, backoff: float, deadline: float | None,
                    max_bytes: int, max_pixels: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError("workers", f"must be a whole number of at least 1, got {workers!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError("retries", f"must be a whole number of 0 or more, got {retries!r}")
    for name, value in (("timeout", timeout), ("deadline", deadline)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ConfigError(name, f"must be a number of seconds above 0, got {value!r}")
    if not (isinstance(backoff, (int, float)) and 0 <= backoff < math.inf):
        raise ConfigError("backoff", f"must be a number of seconds of 0 or more, got {backoff!r}")
    check_limits(max_pixels=max_pixels, max_bytes=max_bytes)


def download_posters(records: Iterable[PosterRecord], out_dir: str | os.PathLike, *, workers: int = 8,
                     timeout: float = 10.0, retries: int = 3, backoff: float = 0.5, deadline: float | None = None,
                     max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                     user_agent: str = "clipposter/0.1", progress: bool = True) -> DownloadReport:
    """Download the poster of every record that has a URL but no image file, into out_dir.

    Files are named <safe id><suffix of the decoded format>. A poster already in out_dir is reused
    without a request (resume); it is decoded in full once, then trusted by its stamp (size and
    mtime) in out_dir/STAMP_NAME. A record whose image exists outside out_dir is counted present.
    Only http and https are fetched, at every redirect. Timeouts, connection errors, bodies cut
    short, 5xx and 429 are retried `retries` times with backoff * 2**attempt seconds between
    tries, all within `deadline` seconds per URL (default DEADLINE_TIMEOUTS × `timeout`; checked
    between reads, so a URL may run up to one `timeout` past it); other 4xx, non-image content
    types, bodies over `max_bytes` (refused while reading), images over `max_pixels` and bodies
    that do not decode fail at once. Sets record.image for every poster downloaded or found;
    failures are listed in the report. A setting that cannot work is a ConfigError.
    """
    _check_settings(workers, timeout, retries, backoff, deadline, max_bytes, max_pixels)
    out = Path(out_dir).expanduser().absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClipposterError(f"{out}: cannot create the download folder: {exc.strerror or exc}") from None
    opener = urllib.request.build_opener(_HttpOnlyRedirects())
    opts = _Options(out, float(timeout), retries, float(backoff),
                    float(deadline) if deadline is not None else DEADLINE_TIMEOUTS * float(timeout),
                    max_bytes, max_pixels, user_agent, opener)
    report = DownloadReport()

    # One job per file stem: records sharing an id share one download. A record's own image in
    # out_dir (a Kaggle posters/ folder, say) is checked like any file found there.
    jobs: dict[str, tuple[list[PosterRecord], list[Path]]] = {}
    for rec in records:
        if not rec.url:
            continue
        own = Path(rec.image).expanduser().absolute() if rec.image else None
        if own is not None and own.parent != out and own.is_file():
            report.skipped_existing += 1  # a poster kept elsewhere: present, and not ours to check
            continue
        stem = safe_filename(rec.id)
        group, candidates = jobs.setdefault(stem, ([], []))
        group.append(rec)
        if own is not None and own.parent == out and own not in candidates:
            candidates.insert(0, own)
    for stem, (_, candidates) in jobs.items():
        candidates.extend(p for p in (out / f"{stem}{s}" for s in RESUME_SUFFIXES) if p not in candidates)

    known = _load_stamps(out) if jobs else {}
    stamps = dict(known)
    dirty, saved_at = False, time.monotonic()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with tqdm(total=len(jobs), desc="posters", unit="poster", disable=not progress) as bar:
            futures = {pool.submit(_resolve, group[0].url, stem, candidates, opts, known): stem
                       for stem, (group, candidates) in jobs.items()}
            for future in as_completed(futures):
                stem = futures[future]
                group = jobs[stem][0]
                outcome = future.result()
                for stale in outcome.broken:
                    stamps.pop(stale.name, None)
                if outcome.saved is None:
                    report.failed.extend((rec.id, rec.url or "", outcome.reason or "unknown") for rec in group)
                else:
                    for rec in group:
                        rec.image = str(outcome.saved)
                    if outcome.stamp is not None:
                        stamps[outcome.saved.name] = outcome.stamp
                        dirty = True
                    for stale in outcome.broken:  # an undecodable earlier copy of this poster
                        if stale != outcome.saved and stale.stem == stem:
                            stale.unlink(missing_ok=True)
                    if outcome.present:
                        report.skipped_existing += 1
                    else:
                        report.downloaded += 1
                if dirty and time.monotonic() - saved_at > STAMP_EVERY_S:
                    _save_stamps(out, stamps)
                    dirty, saved_at = False, time.monotonic()
                bar.update(1)
    finally:
        # Interrupted: start no queued download; either way keep what was verified.
        pool.shutdown(wait=True, cancel_futures=True)
        if dirty:
            _save_stamps(out, stamps)
    report.failed.sort()
    return report
