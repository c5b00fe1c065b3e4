"""WebDataset shards as a poster source: `wds:PATH/{000000..000009}.tar`.

A shard is an uncompressed tar whose members are grouped into samples by key: `KEY.jpg` (or png,
webp, …), `KEY.json` and `KEY.txt`, as img2dataset writes them and `clipposter export wds` writes
them. The key is the member name up to the first dot of its file name (WebDataset's rule).

`wds:SPEC` takes a brace pattern (`{000..009}` expands to ten names, zero-padded), a folder (every
`*.tar` in it, sorted), or `pipe:COMMAND` whose standard output is the shard
(`pipe:aws s3 cp s3://bucket/000.tar -`). Records point at their posters inside the shards with a
path SHARD.tar#MEMBER, which clipposter.ingest.images reads like a file: reading the source reads
only tar headers and the small json/txt members, never the images. A `pipe:` shard can be read only
once, so its output is copied into `download_dir` first (a copy already there is reused).

A record from a sample (docs/webdataset.md): the id is the json's `id`, else the key; `title`,
`genres`, `tagline`, `overview`, `split` and `url` come from the json's keys of those names; without
a `tagline`, the json's `caption` or the `.txt` member (img2dataset's caption) is the tagline.
"""
from __future__ import annotations

import contextlib
import io
import hashlib
import json
import os
import re
import shlex
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError

from clipposter.errors import ClipposterError, ConfigError, PosterError
from clipposter.files import atomic_path, directory_lock, read_json, write_json
from clipposter.ingest.images import DEFAULT_MAX_BYTES, IMAGE_EXTENSIONS, NOT_IMAGE_REASON, check_limits, read_bytes
from clipposter.ingest.source_stats import SPLIT_ALIASES, SourceStats
from clipposter.ingest.tar_members import compressed_hint, member_path
from clipposter.records import PosterRecord, clean_text, parse_genres

WDS_PREFIX = "wds:"
PIPE_PREFIX = "pipe:"
# Image suffixes of a sample, in order of preference when a sample holds more than one.
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp") + tuple(sorted(
    s.lstrip(".") for s in IMAGE_EXTENSIONS if s.lstrip(".") not in ("jpg", "jpeg", "png", "webp")))
# The largest json or txt member read; metadata of one poster is a few KB.
MAX_META_BYTES = 1 << 20

# WebDataset's rule: the key is everything up to the first dot of the file name, the suffix the rest.
_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$", re.DOTALL)
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass
class Sample:
    """One key of a shard: where its image member is, and its parsed json and txt."""

    key: str
    shard: str  # the shard as named by the spec (a path or a pipe: command)
    local: str  # the tar file read
    image: str | None = None  # member name of the image
    image_suffix: str | None = None
    meta: dict[str, Any] | None = None  # the json member, when it parsed to an object
    text: str | None = None  # the txt member
    problems: list[str] = field(default_factory=list)  # why the sample cannot be used


def shard_urls(spec: str) -> list[str]:
    """The shards of `wds:SPEC` (or SPEC), brace patterns expanded, a folder listed, in order.

    Local shards must exist; `file:` prefixes are dropped; other URL schemes are refused with the
    `pipe:` command that reads them."""
    try:
        from braceexpand import braceexpand  # light, but only wds sources need it
    except ImportError:
        raise ClipposterError("wds: sources need the braceexpand package: pip install 'clipposter[scale]'") from None

    text = spec[len(WDS_PREFIX):] if spec.startswith(WDS_PREFIX) else spec
    if not text.strip():
        raise ClipposterError(f"{spec}: no shards named; use wds:PATH/{{000000..000009}}.tar or wds:DIR")
    urls: list[str] = []
    for url in braceexpand(text):
        url = url[len("file:"):] if url.startswith("file:") else url
        if url.startswith(PIPE_PREFIX):
            urls.append(url)
            continue
        if _URL_SCHEME.match(url):
            raise ClipposterError(f"{spec}: {url}: only local shards and pipe: commands are read; use e.g. "
                                  f"pipe:curl -fsSL {url} or pipe:aws s3 cp {url} -")
        path = Path(url).expanduser()
        if path.is_dir():
            urls.extend(str(p) for p in sorted(path.glob("*.tar")) if p.is_file())
        else:
            urls.append(str(path))
    missing = [u for u in urls if not u.startswith(PIPE_PREFIX) and not os.path.isfile(u)]
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ClipposterError(f"{spec}: {len(missing)} of {len(urls)} shards not found: {listed}; check the pattern")
    if not urls:
        raise ClipposterError(f"{spec}: no .tar shards found; use wds:PATH/{{000000..000009}}.tar or wds:DIR")
    return urls


def from_webdataset(spec: str, *, download_dir: str | os.PathLike | None = None,
                    stats: SourceStats | None = None) -> list[PosterRecord]:
    """Records of every usable sample of the shards of `spec` (see the module's doc).

    A sample without an image member, or whose json is not a JSON object, is skipped and counted in
    `stats`; one without json is kept as a poster without labels (and counted in a note). A shard
    damaged part-way keeps the samples before the damage, with a warning. Repeated ids keep the
    first sample. `download_dir` receives copies of `pipe:` shards, which are needed to read them.
    """
    stats = stats if stats is not None else SourceStats()
    urls = shard_urls(spec)
    if any(u.startswith(PIPE_PREFIX) for u in urls) and download_dir is None:
        raise ClipposterError(f"{spec}: a pipe: shard can be read only once; pass `download_dir`, a folder to "
                              f"copy the shards into (copies already there are reused)")
    records: list[PosterRecord] = []
    seen: dict[str, str] = {}
    no_json = 0
    for url in urls:
        local = copy_pipe_shard(url, download_dir) if url.startswith(PIPE_PREFIX) else url
        for sample in iter_samples(local, stats, shard=url):
            stats.rows_read += 1
            record = sample_record(sample, stats)
            if record is None:
                continue
            if record.id in seen:
                stats.skip("duplicate id")
                stats.warn(f"{url}: id {record.id!r} already read from {seen[record.id]}; this sample is left out")
                continue
            seen[record.id] = url
            no_json += sample.meta is None
            records.append(record)
    if no_json:
        stats.notes.append(f"{spec}: {no_json} samples have no json member: kept as posters without labels")
    return records


def sample_record(sample: Sample, stats: SourceStats) -> PosterRecord | None:
    """The record of one sample (None, counted in `stats`, when it cannot be used)."""
    if sample.problems:
        for problem in sample.problems:
            stats.skip(problem)
        stats.warn(f"{sample.shard}: sample {sample.key!r}: {sample.problems[0]}; left out")
        return None
    meta = sample.meta or {}
    split = _text(meta.get("split"))
    if split is not None:
        if split.lower() not in SPLIT_ALIASES:
            stats.skip("unknown split")
            stats.warn(f"{sample.shard}: sample {sample.key!r}: unknown split {split!r} (use train, validation "
                       f"or test); left out")
            return None
        split = SPLIT_ALIASES[split.lower()]
    tagline = _text(meta.get("tagline")) or _text(meta.get("caption")) or _text(sample.text)
    return PosterRecord(id=_text(meta.get("id")) or sample.key, image=member_path(sample.local, sample.image),
                        genres=parse_genres(meta.get("genres")), tagline=tagline,
                        overview=_text(meta.get("overview")), split=split, title=_text(meta.get("title")),
                        url=_text(meta.get("url")))


def _text(value: Any) -> str | None:
    return clean_text(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def iter_samples(local: str | os.PathLike, stats: SourceStats, *, shard: str | None = None) -> Iterator[Sample]:
    """The samples of the local tar shard `local`, in member order, reading headers and the json/txt
    members only. A shard that is not a tar is skipped with a warning; one damaged part-way yields the
    samples before the damage (the sample cut by it is left out) and a warning."""
    label = shard or os.fspath(local)
    local = os.path.abspath(os.fspath(local))
    current: Sample | None = None
    count = 0
    try:
        with tarfile.open(local, "r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                match = _KEY_AND_SUFFIX.match(info.name)
                if match is None or os.path.basename(info.name).startswith("__"):
                    continue  # no suffix, or WebDataset's metadata members (__key__ and the like)
                key, suffix = match.group(1), match.group(2).lower()
                if current is None or key != current.key:
                    if current is not None:
                        count += 1
                        yield _finished(current)
                    current = Sample(key=key, shard=label, local=local)
                _add_member(current, tar, info, suffix)
        if current is not None:
            count += 1
            yield _finished(current)
    except tarfile.ReadError as exc:
        if count == 0 and current is None:
            stats.rows_read += 1
            stats.skip("unreadable shard")
            stats.warn(f"{label}: not a tar file ({exc}){compressed_hint(local)}; shard left out")
            return
        stats.skip("truncated shard")
        stats.warn(f"{label}: truncated or damaged after {count} samples ({exc}); the rest of the shard is left out")
    except OSError as exc:
        stats.rows_read += 1
        stats.skip("unreadable shard")
        stats.warn(f"cannot read shard {label}: {exc.strerror or exc}; shard left out")


def _add_member(sample: Sample, tar: tarfile.TarFile, info: tarfile.TarInfo, suffix: str) -> None:
    if suffix in IMAGE_SUFFIXES:
        if sample.image_suffix is None or IMAGE_SUFFIXES.index(suffix) < IMAGE_SUFFIXES.index(sample.image_suffix):
            sample.image, sample.image_suffix = info.name, suffix
        return
    if suffix not in ("json", "txt"):
        return
    if info.size > MAX_META_BYTES:
        sample.problems.append(f"{suffix} member larger than {MAX_META_BYTES} bytes")
        return
    raw = tar.extractfile(info).read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        sample.problems.append(f"{suffix} member not UTF-8")
        return
    if suffix == "txt":
        sample.text = text
        return
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        sample.problems.append("json member not a JSON object")
        return
    sample.meta = meta


def _finished(sample: Sample) -> Sample:
    if sample.image is None:
        sample.problems.append("no image member")
    return sample


# ------------------------------------------------------------------------------------- pipe: shards

def copy_pipe_shard(url: str, folder: str | os.PathLike) -> str:
    """The local copy in `folder` of the shard that the command of `url` (pipe:COMMAND) writes to its
    standard output; made once (written to a temporary name, renamed when the command succeeded) and
    reused by later calls. The name holds a hash of the command, so two commands never share a copy."""
    command = url[len(PIPE_PREFIX):].strip()
    if not command:
        raise ClipposterError(f"{url}: empty pipe: command")
    folder = Path(folder).expanduser()
    target = folder / f"{_copy_stem(command)}.tar"
    if target.is_file():
        return str(target.absolute())
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as errors, atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            # A shell command on purpose: pipe: URLs are shell pipelines by WebDataset's convention.
            code = subprocess.run(command, shell=True, stdout=out, stderr=errors, stdin=subprocess.DEVNULL,
                                  check=False).returncode
        if code != 0:
            errors.seek(0)
            lines = errors.read().decode("utf-8", "replace").strip().splitlines()
            detail = f": {lines[-1]}" if lines else ""
            raise ClipposterError(f"{url}: the command exited with status {code}{detail}")
    return str(target.absolute())


def _copy_stem(command: str) -> str:
    digest = hashlib.sha256(command.encode("utf-8")).hexdigest()[:12]
    with contextlib.suppress(ValueError):  # unbalanced quotes: no readable name, the hash alone
        names = [os.path.basename(w) for w in shlex.split(command) if w.endswith(".tar")]
        if names:
            return f"{names[-1][:-4]}-{digest}"
    return digest


# ------------------------------------------------------------------------------------------ export

EXPORT_INDEX = "export.json"
_SHARD_NAME = re.compile(r"^(\d{6})\.tar$")
_PIL_SUFFIXES = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
                 "TIFF": "tiff"}


@dataclass
class ExportSummary:
    """What one `export_webdataset` run did."""

    records: int = 0
    written: int = 0  # samples written by this run
    reused: int = 0  # samples in shards an earlier run wrote and this run kept
    skipped: int = 0  # records without a usable image file
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    shards: list[str] = field(default_factory=list)  # the shard files, in order
    reused_shards: int = 0
    removed_shards: list[str] = field(default_factory=list)  # left by an earlier, larger export

    def to_dict(self) -> dict:
        return {"records": self.records, "written": self.written, "reused": self.reused, "skipped": self.skipped,
                "shards": self.shards, "reused_shards": self.reused_shards, "removed_shards": self.removed_shards,
                "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped_files]}


def export_webdataset(records: list[PosterRecord], out: str | os.PathLike, *, shard_size: int = 1000,
                      max_bytes: int | None = None, source: str | None = None,
                      progress: bool = False) -> ExportSummary:
    """Write `records` as WebDataset shards `000000.tar`, `000001.tar`, … in `out`, `shard_size` records
    to a shard: per record `KEY.<suffix>` (the image file's bytes, unchanged), `KEY.json` (id, title,
    genres, tagline, overview, split, url) and `KEY.txt` (the tagline, img2dataset's caption), with
    KEY the record's position, zero-padded to 9 digits.

    Each shard is written to a temporary name and renamed when complete, and `out/export.json` lists
    the finished shards with a hash of the keys and ids they hold: a rerun keeps a listed shard whose
    file is intact and would hold the same records, and writes the others (so a killed export resumes
    at the shard it was writing). Records whose image cannot be read are skipped and counted.
    """
    from tqdm.auto import tqdm

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError("shard_size", f"must be a whole number of at least 1, got {shard_size!r}")
    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    check_limits(max_bytes=max_bytes)
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in sorted(ids) if ids.count(i) > 1)
        raise ClipposterError(f"poster id {dup!r} appears more than once in the source; ids must be unique")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ClipposterError(f"{out}: not a folder; `out` names the folder the shards go to")
    out.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(records=len(records))
    with directory_lock(out):
        for stale in out.glob(".*.tar.*.tmp"):  # a shard a killed run was writing; the lock is ours
            stale.unlink(missing_ok=True)
        index_path = out / EXPORT_INDEX
        before = read_json(index_path) if index_path.is_file() else {}
        listed = {s["name"]: s for s in before.get("shards", []) if isinstance(s, dict) and "name" in s}
        shards: list[dict[str, Any]] = []
        bar = tqdm(total=len(records), desc="exporting", unit="poster", disable=not progress)
        for start in range(0, len(records), shard_size):
            name = f"{start // shard_size:06d}.tar"
            chunk = [(f"{start + n:09d}", rec) for n, rec in enumerate(records[start:start + shard_size])]
            ids_hash = hashlib.sha256("".join(f"{k}\t{r.id}\n" for k, r in chunk).encode("utf-8")).hexdigest()
            old = listed.get(name)
            if (old is not None and old.get("ids_sha256") == ids_hash and (out / name).is_file()
                    and (out / name).stat().st_size == old.get("bytes")):
                shards.append(old)
                summary.reused += int(old.get("samples", 0))
                summary.reused_shards += 1
            else:
                samples = 0
                with atomic_path(out / name) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                    for key, rec in chunk:
                        try:
                            if not rec.image:
                                raise PosterError(rec.id, "no local image (download it first or give an image path)")
                            data = read_bytes(rec.image, max_bytes=max_bytes)
                            suffix = _export_suffix(rec.image, data)
                        except PosterError as exc:
                            summary.skipped += 1
                            summary.skipped_files.append((rec.image or rec.id, exc.reason))
                            continue
                        _add_bytes(tar, f"{key}.{suffix}", data)
                        _add_bytes(tar, f"{key}.json", _sample_json(key, rec))
                        if rec.tagline:
                            _add_bytes(tar, f"{key}.txt", rec.tagline.encode("utf-8"))
                        samples += 1
                summary.written += samples
                shards.append({"name": name, "samples": samples, "ids_sha256": ids_hash,
                               "bytes": (out / name).stat().st_size})
            bar.update(len(chunk))
            write_json(index_path, {"format": "webdataset", "written_by": "clipposter export wds", "source": source,
                                    "shard_size": shard_size, "records": len(records), "shards": shards})
        bar.close()
        if not records:
            write_json(index_path, {"format": "webdataset", "written_by": "clipposter export wds", "source": source,
                                    "shard_size": shard_size, "records": 0, "shards": []})
        kept = {s["name"] for s in shards}
        for name in sorted(set(listed) - kept):
            if _SHARD_NAME.match(name) and (out / name).is_file():
                (out / name).unlink()
                summary.removed_shards.append(name)
    summary.shards = [s["name"] for s in shards]
    return summary


def _sample_json(key: str, rec: PosterRecord) -> bytes:
    payload = {"key": key, "id": rec.id, "title": rec.title, "genres": rec.genres, "tagline": rec.tagline,
               "overview": rec.overview, "split": rec.split, "url": rec.url}
    return json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")


def _export_suffix(image: str, data: bytes) -> str:
    """The member suffix of a poster: its file's (or member's) suffix when it names an image type, else
    the format Pillow reads from the header; PosterError when neither names one."""
    suffix = os.path.splitext(image)[1].lower().lstrip(".")
    if suffix in IMAGE_SUFFIXES:
        return suffix
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        fmt = None
    if fmt not in _PIL_SUFFIXES:
        raise PosterError(image, NOT_IMAGE_REASON)
    return _PIL_SUFFIXES[fmt]


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner, mode and time: the same records give byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
