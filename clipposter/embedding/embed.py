"""The encode stage: records → cache rows, each distinct poster through the frozen backbone once.

Two passes. The first reads and hashes every poster file (cheap, threaded) so that posters already
in the cache, and duplicates within the run, cost no decode and no model work. The second decodes
and preprocesses only the new posters in a thread pool that runs ahead of the model, so JPEG
decoding overlaps the forward pass, and commits each batch to the cache as soon as it is encoded:
a run killed midway keeps what it finished and the rerun picks up the rest.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from clipposter.embedding.backbone import Backbone
from clipposter.embedding.cache import EmbeddingCache
from clipposter.errors import ClipposterError, PosterError
from clipposter.ingest.images import DEFAULT_MAX_PIXELS, content_hash, load_poster, read_bytes
from clipposter.records import PosterRecord

log = logging.getLogger(__name__)


@dataclass
class EmbedSummary:
    """What one `embed` run did."""

    records: int = 0
    encoded: int = 0  # new posters through the model
    cached: int = 0  # records whose poster was already in the cache (or repeated in this run)
    skipped: int = 0  # records whose poster could not be used
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    @property
    def posters_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"records": self.records, "encoded": self.encoded, "cached": self.cached,
                "skipped": self.skipped, "seconds": round(self.seconds, 3),
                "posters_per_second": round(self.posters_per_second, 2),
                "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped_files]}


def _hash_file(record: PosterRecord) -> tuple[PosterRecord, str | None, str | None]:
    if not record.image:
        return record, None, f"{record.id}: no local image (download it first or give an image path)"
    try:
        return record, content_hash(read_bytes(record.image)), None
    except PosterError as exc:
        return record, None, str(exc)


def make_loader(backbone: Backbone, max_pixels: int = DEFAULT_MAX_PIXELS) -> Callable[[str], torch.Tensor]:
    """Path → preprocessed pixel tensor. JPEGs are decoded at a reduced DCT scale that still covers
    the model's input size, which is most of the decode cost saved on large posters."""
    size = backbone.image_size

    def load(path: str) -> torch.Tensor:
        return backbone.preprocess(load_poster(path, max_pixels=max_pixels, draft_size=size))

    return load


def default_workers(backbone: Backbone) -> int:
    """Decode threads that run ahead of the model. Two on a CPU: with the machine to itself the
    overlap keeps the embed path at the model's own speed (scripts/bench/embed.py); on a CPU that
    other jobs share, `--workers 0` (decode inline between batches) can be faster, since decode
    threads then preempt the model's OpenMP threads. More on a GPU, where decoding is the bottleneck."""
    if backbone.device.type == "cpu":
        return 2
    return min(8, os.cpu_count() or 1)


def _decoded(todo: Sequence[tuple[str, str]], load: Callable, workers: int, batch_size: int):
    """(hash, path, tensor or PosterError) in order; with workers > 0, decoded ahead in threads."""
    def attempt(path: str):
        try:
            return load(path)
        except PosterError as exc:
            return exc

    if workers <= 0:
        for h, path in todo:
            yield h, path, attempt(path)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        window: deque = deque()
        items = iter(todo)
        # Keep about two batches of decode work queued so the model never waits on a cold pipe.
        ahead = max(2 * batch_size, 4 * workers)
        for h, path in items:
            window.append((h, path, pool.submit(attempt, path)))
            if len(window) >= ahead:
                break
        while window:
            h, path, fut = window.popleft()
            nxt = next(items, None)
            if nxt is not None:
                window.append((nxt[0], nxt[1], pool.submit(attempt, nxt[1])))
            yield h, path, fut.result()


def _skip(summary: EmbedSummary, path: str, reason: str, strict: bool) -> None:
    if strict:
        raise ClipposterError(f"{reason} (stopped by --strict)")
    summary.skipped += 1
    summary.skipped_files.append((path, reason))
    log.warning("skipped %s", reason)


def embed_records(records: Sequence[PosterRecord], cache: EmbeddingCache, backbone: Backbone, *,
                  batch_size: int = 64, workers: int | None = None, strict: bool = False,
                  max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> EmbedSummary:
    """Encode the posters of `records` that the cache lacks and store every usable record."""
    cache.identity.check_same(backbone.identity, f"the cache {cache.root}")
    if batch_size < 1:
        raise ClipposterError(f"--batch-size must be at least 1, got {batch_size}")
    workers = default_workers(backbone) if workers is None else max(0, workers)
    started = time.perf_counter()
    summary = EmbedSummary(records=len(records))

    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ClipposterError(f"poster id {dup!r} appears more than once in the source; ids must be unique")

    # Pass 1: content hashes.
    with ThreadPoolExecutor(max_workers=max(2, workers)) as pool:  # file reads and hashing: I/O-bound
        hashed = list(tqdm(pool.map(_hash_file, records), total=len(records), desc="hashing", unit="poster",
                           disable=not progress, leave=False))
    usable: list[tuple[PosterRecord, str]] = []
    for rec, h, err in hashed:
        if err is not None:
            _skip(summary, rec.image or rec.id, err, strict)
        else:
            usable.append((rec, h))
    known = cache.known_hashes(h for _, h in usable)

    # Records whose poster is cached get their metadata refreshed now; the rest wait for their rows.
    ready = [(r, h) for r, h in usable if h in known]
    if ready:
        cache.upsert_records(ready)
    pending: dict[str, list[PosterRecord]] = {}
    for rec, h in usable:
        if h not in known:
            pending.setdefault(h, []).append(rec)
    summary.cached = len(ready) + sum(len(v) - 1 for v in pending.values())

    # Pass 2: decode ahead of the model, encode in batches, commit each batch.
    todo = [(h, recs[0].image) for h, recs in pending.items()]
    load = make_loader(backbone, max_pixels)
    bar = tqdm(total=len(todo), desc="embedding", unit="poster", disable=not progress)

    def flush(batch: list[tuple[str, torch.Tensor]]) -> None:
        emb = backbone.encode_image_tensors(torch.stack([t for _, t in batch]))
        hashes = [h for h, _ in batch]
        cache.add_posters(hashes, emb, [(r, h) for h in hashes for r in pending[h]])
        summary.encoded += len(batch)
        bar.update(len(batch))  # the bar's rate is posters/s

    batch: list[tuple[str, torch.Tensor]] = []
    for h, path, result in _decoded(todo, load, workers, batch_size):
        if isinstance(result, PosterError):
            for _ in pending[h]:
                _skip(summary, path, str(result), strict)
            summary.cached -= len(pending[h]) - 1
            continue
        batch.append((h, result))
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    bar.close()
    summary.seconds = time.perf_counter() - started
    return summary


def embed_texts(cache: EmbeddingCache, backbone: Backbone, texts: Iterable[str | None]) -> int:
    """Cache the embeddings of the usable texts; returns how many distinct texts were given."""
    uniq = sorted({t for t in texts if t})
    if uniq:
        cache.text_embeddings(uniq, backbone=backbone)
    return len(uniq)


def reference_and_prompt_texts(records: Sequence[PosterRecord]) -> list[str | None]:
    """The texts every head will ask for: taglines, overviews, and the prompts of every genre seen."""
    from clipposter.embedding.prompts import prompt_texts

    genres = sorted({g for r in records for g in r.genres})
    return [r.tagline for r in records] + [r.overview for r in records] + prompt_texts(genres)
