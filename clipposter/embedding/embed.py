"""The encode stage: records → cache rows, each distinct poster through the frozen backbone once;
and the one resolver of "the cached embedding, or encode the file" (`resolve_posters`).

Two passes. The first reads and hashes every poster file (cheap, threaded) so that posters already
in the cache, and duplicates within the run, cost no decode and no model work — the backbone is
loaded only when this pass finds work, so a rerun over a cached set costs the hashing alone. The
second decodes
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
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.gpu_decode import TensorDecoder, TensorPreprocess, check_decode, use_tensor_decoder
from clipposter.errors import ClipposterError, ConfigError, PosterError
from clipposter.ingest.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, content_hash, load_poster, read_bytes
from clipposter.records import PosterRecord

# Posters encoded before they are written to the cache as one shard (and at the end of a run): a
# killed run loses at most this many encoded posters, which the next run encodes again.
FLUSH_ROWS = 8192
# With token sequences, fewer posters wait when theirs would take more than this many bytes
# (ViT-B-32: 50 KB a poster, all 8,192 fit; ViT-L-14: 395 KB a poster, 1,360 do).
TOKEN_FLUSH_BYTES = 512 * 2**20

if TYPE_CHECKING:  # torch is imported where posters are encoded: a fully cached run never loads it
    import torch

    from clipposter.embedding.backbone import Backbone

log = logging.getLogger(__name__)


@dataclass
class EmbedSummary:
    """What one `embed` run did."""

    records: int = 0
    encoded: int = 0  # new posters through the model
    cached: int = 0  # records whose poster was already in the cache (or repeated in this run)
    skipped: int = 0  # records whose poster could not be used
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0  # the whole run: hashing, loading the backbone (when needed), encoding
    encode_seconds: float = 0.0  # decoding and encoding the new posters (the backbone already loaded)
    decode: str = "cpu"  # where JPEGs were decoded: "cpu" (Pillow) or "gpu" (gpu_decode.py)
    decode_fallbacks: int = 0  # with "gpu": posters decoded by the CPU path instead (not a plain JPEG, …)
    tokens: bool = False  # whether the new posters' token sequences were stored too

    @property
    def posters_per_second(self) -> float | None:
        """Encoding throughput of the new posters; None when nothing was encoded (a rate of nothing)."""
        return self.encoded / self.encode_seconds if self.encoded and self.encode_seconds > 0 else None

    def to_dict(self) -> dict:
        rate = self.posters_per_second
        return {"records": self.records, "encoded": self.encoded, "cached": self.cached,
                "skipped": self.skipped, "seconds": round(self.seconds, 3),
                "posters_per_second": None if rate is None else round(rate, 2),
                "decode": self.decode, "decode_fallbacks": self.decode_fallbacks, "tokens": self.tokens,
                "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped_files]}


def _hash_file(record: PosterRecord, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[PosterRecord, str | None, str | None]:
    if not record.image:
        return record, None, f"{record.id}: no local image (download it first or give an image path)"
    try:
        return record, content_hash(read_bytes(record.image, max_bytes=max_bytes)), None
    except PosterError as exc:
        return record, None, str(exc)


def make_loader(backbone: Backbone, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int = DEFAULT_MAX_BYTES) -> Callable[..., torch.Tensor]:
    """Path (or the file's bytes, with `name` for errors) → preprocessed pixel tensor. JPEGs are decoded
    at a reduced DCT scale that still covers the model's input size, which is most of the decode cost
    saved on large posters."""
    size = backbone.image_size

    def load(source, name: str | None = None) -> torch.Tensor:
        return backbone.preprocess(load_poster(source, max_pixels=max_pixels, draft_size=size, name=name,
                                               max_bytes=max_bytes))

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
        raise ClipposterError(f"{reason} (stopped by `strict`)")
    summary.skipped += 1
    summary.skipped_files.append((path, reason))
    log.warning("skipped %s", reason)


@dataclass
class EmbedPlan:
    """What the hashing pass found: the posters the cache lacks (`pending`, content hash → its records,
    the first record's file to be encoded) and the counts so far. Every engine encodes `todo` its own
    way and reports each poster through `fail` or `store`, so the counts mean the same for all."""

    summary: EmbedSummary
    pending: dict[str, list[PosterRecord]]
    strict: bool = False

    @property
    def todo(self) -> list[tuple[str, str]]:
        """(content hash, path) of every new poster, one per distinct content."""
        return [(h, recs[0].image) for h, recs in self.pending.items()]

    def fail(self, content_hash: str, path: str, reason: str) -> None:
        """The poster of `content_hash` could not be decoded: every record showing it is skipped."""
        recs = self.pending[content_hash]
        for _ in recs:
            _skip(self.summary, path, reason, self.strict)
        self.summary.cached -= len(recs) - 1

    def store(self, cache: EmbeddingCache, hashes: Sequence[str], embeddings: np.ndarray,
              tokens: np.ndarray | None = None) -> None:
        """Commit the embeddings of new posters (and, with `tokens`, their (n, T, D) token sequences)
        with all their records, in one append."""
        extra = {} if tokens is None else {"tokens": tokens}
        record_tokens(cache, tokens is not None)
        cache.add_posters(hashes, embeddings, [(r, h) for h in hashes for r in self.pending[h]], **extra)
        self.summary.encoded += len(hashes)


def plan_embedding(records: Sequence[PosterRecord], cache: EmbeddingCache, *, workers: int | None = None,
                   strict: bool = False, max_bytes: int = DEFAULT_MAX_BYTES, progress: bool = True) -> EmbedPlan:
    """The first pass of `embed`: read and hash every poster file, skip the unusable ones, refresh the
    records of posters the cache holds, and collect the new ones, each distinct content once."""
    summary = EmbedSummary(records=len(records))
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ClipposterError(f"poster id {dup!r} appears more than once in the source; ids must be unique")

    # File reads and hashing are I/O-bound: more threads than decode workers.
    hash_threads = max(2, workers if workers is not None else min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=hash_threads) as pool:
        hashed = list(tqdm(pool.map(lambda r: _hash_file(r, max_bytes), records), total=len(records),
                           desc="hashing", unit="poster", disable=not progress, leave=False))
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
    return EmbedPlan(summary, pending, strict)


BackboneSource = Union["Backbone", Callable[[], "Backbone"], None]


def resolve_tokens(cache: EmbeddingCache, tokens: bool | None) -> bool:
    """Whether an embed run into `cache` stores token sequences. A cache keeps one choice for all its
    posters, so that a head reading tokens can read them for every poster: the choice its cache.json
    records (`record_tokens`, by the first run that encodes a poster), else what its posters show.
    None follows the cache (a cache without a choice yet: none); True on a cache whose choice is
    without, or False on one whose choice is with, is refused. Reads only: nothing is written."""
    if tokens is not None and not isinstance(tokens, bool):
        raise ConfigError("tokens", f"must be True, False or None, got {tokens!r}")
    has_posters = cache.num_posters > 0
    recorded = getattr(cache, "stores_tokens", None)
    if recorded is None:  # older caches: what their posters show, once they have some
        stored, decided = getattr(cache, "token_shape", None) is not None and has_posters, has_posters
    else:
        stored, decided = recorded, True
    if tokens is None:
        return stored
    if tokens and decided and not stored:
        which = (f"the {cache.num_posters} posters of the cache {cache.root} are" if has_posters
                 else f"the cache {cache.root} records that its posters are")
        raise ConfigError("tokens", f"is set, but {which} stored without token sequences (a cache keeps one "
                                    f"choice for all its posters); embed with tokens into a new cache")
    if not tokens and stored:
        raise ConfigError("tokens", f"is off, but the cache {cache.root} stores a token sequence for each of its "
                                    f"posters; leave it unset (the cache's choice is kept)")
    return tokens


def record_tokens(cache: EmbeddingCache, tokens: bool) -> None:
    """Record the run's token choice in a writable cache that records none yet (format 2 only)."""
    record = getattr(cache, "record_tokens", None)
    if record is not None and cache.writable and getattr(cache, "stores_tokens", None) is None:
        record(tokens)


class _LazyBackbone:
    """The backbone of `source` (a Backbone, or a function that loads one), loaded on the first call
    only and checked against `cache` then. A Backbone given is checked at once, before any work."""

    def __init__(self, source: BackboneSource, cache: EmbeddingCache | None):
        self._source, self._cache, self._backbone = source, cache, None
        self._factory = source is not None and not hasattr(source, "encode_image_tensors")
        if source is not None and not self._factory:
            self()

    @property
    def loaded(self) -> bool:
        return self._backbone is not None

    def __call__(self) -> Backbone:
        if self._backbone is None:
            if self._source is None:
                raise ConfigError("backbone", "is needed to encode what the cache lacks")
            model = self._source() if self._factory else self._source
            if self._cache is not None:
                self._cache.identity.check_same(model.identity, f"the cache {self._cache.root}")
            self._backbone = model
        return self._backbone


def embed_records(records: Sequence[PosterRecord], cache: EmbeddingCache, backbone: BackboneSource, *,
                  batch_size: int = 64, workers: int | None = None, strict: bool = False,
                  max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                  progress: bool = True, decode: str = "cpu", tokens: bool | None = None) -> EmbedSummary:
    """Encode the posters of `records` that the cache lacks and store every usable record.

    backbone: a Backbone, or a function returning one, called only when some poster is new (so a
    rerun over cached posters loads no model). decode: "cpu" (Pillow, in `workers` threads), "gpu"
    (JPEGs decoded in batches on the backbone's CUDA device, the rest on the CPU; gpu_decode.py) or
    "auto" (the GPU when the backbone runs on one). tokens: also store each new poster's ViT token
    sequence (`Backbone.encode_image_tokens`); None follows the cache (`resolve_tokens`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be at least 1, got {batch_size!r}")
    check_decode(decode)
    tokens = resolve_tokens(cache, tokens)
    if tokens and backbone is not None and hasattr(backbone, "encode_image_tensors"):
        backbone.token_shape  # a tower without token sequences is refused before any file is read
    get_backbone = _LazyBackbone(backbone, cache)
    started = time.perf_counter()
    # Pass 1: content hashes; what the cache holds costs nothing more.
    plan = plan_embedding(records, cache, workers=workers, strict=strict, max_bytes=max_bytes, progress=progress)
    summary = plan.summary
    summary.tokens = tokens

    # Pass 2: decode ahead of the model, encode in batches, commit each batch.
    todo = plan.todo
    if not todo:  # everything cached (or unusable): no model to load, nothing to encode
        summary.seconds = time.perf_counter() - started
        return summary
    import torch

    model = get_backbone()
    if tokens:
        model.token_shape  # refused in one line for a tower without token sequences
    record_tokens(cache, tokens)  # before the first shard: a run killed before it keeps the choice
    workers = default_workers(model) if workers is None else max(0, workers)
    load = make_loader(model, max_pixels, max_bytes)
    decoder, decoded = None, _decoded(todo, load, workers, batch_size)
    if use_tensor_decoder(decode, model.identity, model.device):
        decoder = TensorDecoder(TensorPreprocess(model.identity, model.device), load, max_pixels=max_pixels,
                                max_bytes=max_bytes)
        decoded, summary.decode = decoder.decoded(todo, workers, batch_size), "gpu"
    encode_started = time.perf_counter()
    bar = tqdm(total=len(todo), desc="embedding", unit="poster", disable=not progress)

    # Encoded batches not yet written: (hashes, embeddings, token sequences or None). Token sequences
    # wait in the cache's dtype, at most TOKEN_FLUSH_BYTES of them.
    encoded: list[tuple[list[str], np.ndarray, np.ndarray | None]] = []
    token_dtype = np.dtype(cache.dtype)
    flush_rows = FLUSH_ROWS
    if tokens:
        t, d = model.token_shape
        flush_rows = max(1, min(FLUSH_ROWS, TOKEN_FLUSH_BYTES // (t * d * token_dtype.itemsize)))

    def store() -> None:
        if encoded:
            seqs = np.concatenate([t for _, _, t in encoded]) if tokens else None
            plan.store(cache, [h for hs, _, _ in encoded for h in hs], np.concatenate([e for _, e, _ in encoded]),
                       tokens=seqs)
            encoded.clear()

    def flush(batch: list[tuple[str, torch.Tensor]]) -> None:
        pixels = torch.stack([t for _, t in batch])
        if tokens:
            emb, seqs = model.encode_image_tokens(pixels)
            seqs = np.asarray(seqs, dtype=token_dtype)
        else:
            emb, seqs = model.encode_image_tensors(pixels), None
        encoded.append(([h for h, _ in batch], np.asarray(emb), seqs))
        bar.update(len(batch))  # the bar's rate is posters/s
        if sum(len(hs) for hs, _, _ in encoded) >= flush_rows:
            store()

    batch: list[tuple[str, torch.Tensor]] = []
    try:
        for h, path, result in decoded:
            if isinstance(result, PosterError):
                plan.fail(h, path, str(result))  # raises with `strict`: what was encoded is still written
                continue
            batch.append((h, result))
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    except ClipposterError:
        store()
        raise
    store()
    bar.close()
    summary.decode_fallbacks = decoder.stats.fallback if decoder is not None else 0
    summary.encode_seconds = time.perf_counter() - encode_started
    summary.seconds = time.perf_counter() - started
    return summary


def embed_texts(cache: EmbeddingCache, backbone: BackboneSource, texts: Iterable[str | None], *,
                batch_size: int = 256, progress: bool = False) -> int:
    """Cache the embeddings of the usable texts the cache lacks, committing each batch (a killed run
    keeps them); returns how many distinct texts were given.

    backbone: a Backbone, or a function returning one, called only when some text is new."""
    uniq = sorted({t for t in texts if t})
    missing = cache.missing_texts(uniq)
    if missing:
        model = _LazyBackbone(backbone, cache)()
        with tqdm(total=len(missing), desc="encoding texts", unit="text", disable=not progress) as bar:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start:start + batch_size]
                cache.text_embeddings(chunk, backbone=model, batch_size=batch_size)
                bar.update(len(chunk))
    return len(uniq)


def reference_and_prompt_texts(records: Sequence[PosterRecord]) -> list[str | None]:
    """The texts every head will ask for: taglines, overviews, and the prompts of every genre seen."""
    from clipposter.embedding.prompts import prompt_texts

    genres = sorted({g for r in records for g in r.genres})
    return [r.tagline for r in records] + [r.overview for r in records] + prompt_texts(genres)


# ------------------------------------------------------------------------------------------------
# the resolver: poster files or cache ids → embeddings
# ------------------------------------------------------------------------------------------------
@dataclass
class ResolvedPoster:
    """One poster as given (a file path or a cache id) and its embedding, or why it has none."""

    poster: str
    embedding: np.ndarray | None = None  # float32 (D,), L2-normalised; None when it failed
    source: str = ""  # "cache" (the cache held its content or id) or "encoded" (through the backbone now)
    row: int | None = None  # the cache row it came from (cached posters)
    content_hash: str | None = None  # of the file's bytes (files only)
    error: str | None = None  # why it has no embedding
    tokens: np.ndarray | None = None  # float32 (T, D) token sequence, when asked for (`tokens=True`)

    @property
    def ok(self) -> bool:
        return self.embedding is not None


@dataclass
class ResolvedPosters:
    """The posters of one `resolve_posters` call, in the order given."""

    items: list[ResolvedPoster]
    dim: int

    def __iter__(self) -> Iterator[ResolvedPoster]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> ResolvedPoster:
        return self.items[i]

    @property
    def usable(self) -> list[ResolvedPoster]:
        return [p for p in self.items if p.ok]

    @property
    def failed(self) -> list[tuple[str, str]]:
        """(poster, reason) of every poster without an embedding, in the order given."""
        return [(p.poster, p.error or "") for p in self.items if not p.ok]

    @property
    def encoded(self) -> int:
        return sum(p.source == "encoded" for p in self.items)

    @property
    def from_cache(self) -> int:
        return sum(p.source == "cache" for p in self.items)

    def embeddings(self) -> np.ndarray:
        """(usable posters, D) float32, in the order given."""
        usable = self.usable
        if not usable:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([p.embedding for p in usable]).astype(np.float32, copy=False)

    def token_sequences(self) -> np.ndarray:
        """(usable posters, T, D) float32 token sequences, in the order given (`tokens=True` only)."""
        usable = self.usable
        if not usable:
            return np.zeros((0, 0, self.dim), np.float32)
        if any(p.tokens is None for p in usable):
            raise ClipposterError("these posters were resolved without token sequences; resolve them with tokens")
        return np.stack([p.tokens for p in usable]).astype(np.float32, copy=False)

    def raise_first_failure(self) -> None:
        """Raise PosterError for the first poster without an embedding, if any."""
        for p in self.items:
            if not p.ok:
                raise PosterError(p.poster, p.error or "no embedding")


def resolve_posters(posters: Sequence[str | os.PathLike], *, cache: EmbeddingCache | None = None,
                    backbone: BackboneSource = None, ids: bool = False, batch_size: int = 64,
                    max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                    progress: bool = False, tokens: bool = False) -> ResolvedPosters:
    """Embeddings of posters: from `cache` where it holds the file's content (or, with `ids`, where the
    argument is not a file but a poster id of the cache), else encoded through `backbone` by the same
    decode path as `embed`. Each file is read and hashed once; its bytes are decoded from memory.

    backbone: a Backbone, or a function returning one, called only when some poster must be encoded
    (so a call that finds everything cached never loads a model); None: uncached posters fail.
    Failures (missing, unreadable, not an image, an unknown id) are reported per poster, not raised.

    tokens: also give each poster's token sequence (`Backbone.encode_image_tokens`): from the cache
    when it stores them, else the file is encoded (a poster id alone then fails: it has no file).
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be at least 1, got {batch_size!r}")
    if cache is None and backbone is None:
        raise ConfigError("backbone", "is needed when no cache is given (nothing else can embed a poster)")
    items = [ResolvedPoster(str(p)) for p in posters]
    # with tokens, the cache serves a poster only when it stores token sequences
    cache_serves = cache is not None and (not tokens or getattr(cache, "token_shape", None) is not None)
    no_tokens = "the cache stores no token sequence for it, and a poster id has no file to encode"
    # a backbone given is checked against the cache here, before any work; a factory on first use
    get_backbone = _LazyBackbone(backbone, cache)
    loaders: dict = {}

    def encoder():
        model = get_backbone()
        if "load" not in loaders:
            loaders["load"] = make_loader(model, max_pixels, max_bytes)
        return model, loaders["load"]

    bar = tqdm(total=len(items), desc="embedding posters", unit="poster", disable=not progress, leave=False)
    # In batches, so that the bytes of at most one batch of uncached files are held at a time.
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        data: dict[int, bytes] = {}
        for n, item in enumerate(chunk):
            if ids and not os.path.isfile(item.poster):
                row = cache.id_rows([item.poster]).get(item.poster) if cache is not None else None
                if row is None:
                    item.error = ("not an image file nor a poster id in the cache" if cache is not None
                                  else "not an image file")
                elif not cache_serves:
                    item.error = no_tokens
                else:
                    item.row, item.source = row, "cache"
                continue
            try:
                data[n] = read_bytes(item.poster, max_bytes=max_bytes)
            except PosterError as exc:
                item.error = exc.reason
                continue
            item.content_hash = content_hash(data[n])
        known = cache.rows_for_hashes(p.content_hash for p in chunk if p.content_hash) if cache_serves else {}
        for item in chunk:
            if item.content_hash in known:
                item.row, item.source = known[item.content_hash], "cache"
        cached = [p for p in chunk if p.source == "cache"]
        if cached:
            rows = [p.row for p in cached]
            for item, vec in zip(cached, cache.embeddings_for_rows(rows)):
                item.embedding = vec
            if tokens:
                for item, seq in zip(cached, cache.tokens_for_rows(rows)):
                    item.tokens = np.asarray(seq, dtype=np.float32)
        todo = [(n, p) for n, p in enumerate(chunk) if p.error is None and p.source != "cache"]
        if todo:
            if backbone is None:
                for _, item in todo:
                    item.error = "not in the cache, and no backbone to encode it"
            else:
                import torch

                model, load = encoder()
                pixels = []
                for n, item in todo:
                    try:
                        pixels.append((item, load(data[n], name=item.poster)))
                    except PosterError as exc:
                        item.error = exc.reason
                if pixels:
                    stacked = torch.stack([t for _, t in pixels])
                    if tokens:
                        vecs, seqs = model.encode_image_tokens(stacked)
                    else:
                        vecs, seqs = model.encode_image_tensors(stacked), [None] * len(pixels)
                    for (item, _), vec, seq in zip(pixels, vecs, seqs):
                        item.embedding, item.source = np.asarray(vec, dtype=np.float32), "encoded"
                        item.tokens = None if seq is None else np.asarray(seq, dtype=np.float32)
        bar.update(len(chunk))
    bar.close()
    if cache is not None:
        dim = cache.dim
    else:  # no cache: the backbone's width (0 when it never had to be loaded, nothing was embedded)
        dim = get_backbone().identity.embed_dim if get_backbone.loaded else 0
    return ResolvedPosters(items, dim)
