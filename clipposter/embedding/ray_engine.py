"""The encode stage on Ray Data: the same job as `embed_records`, with decoding and encoding spread
over a Ray cluster (or a local Ray on this machine).

    driver:  hashing pass (plan_embedding: de-duplication against the cache and within the run)
    Ray:     posters ─► decode + preprocess (CPU tasks) ─► encode (a pool of actors, each holding the
             backbone, on GPUs when asked) ─► blocks of embeddings (and, with `tokens`, each poster's
             token sequence in the cache's dtype) streamed back to the driver
    driver:  one committed cache append per block

Only the driver writes the cache, through its public append, so the cache's crash safety holds as for
the local engine: a job killed at any moment keeps every block it committed, and the rerun's hashing
pass skips them, redoing only the blocks that were in flight. The actors load the backbone from the
cache's recorded spec (model + pretrained) and check it against the cache's identity, as the local
engine checks the backbone it loads; the decode tasks rebuild the preprocessing from the identity
alone and load no model. Poster files are read by the workers at the path the driver sees, so a
multi-machine cluster needs them on storage every node mounts at that path.

Ray is imported inside the functions here (the `scale` extra installs it).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.embed import EmbedSummary, make_loader, plan_embedding, resolve_tokens
from clipposter.embedding.identity import BackboneIdentity
from clipposter.embedding.weights import check_choice
from clipposter.errors import ClipposterError, ConfigError, PosterError, cause_line
from clipposter.ingest.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from clipposter.records import PosterRecord

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Memory one decoded poster holds while it is preprocessed: an RGB image decoded at the reduced JPEG
# scale (at most about twice the model's input side, so well under 1000 × 1500 pixels).
_DECODED_POSTER_BYTES = 1000 * 1500 * 3


def preprocess_of(identity: BackboneIdentity) -> Callable:
    """The image preprocessing a backbone of `identity` applies, built from the identity alone (no
    model): what the decode tasks run."""
    import open_clip

    return open_clip.image_transform(identity.image_size, is_train=False, mean=identity.mean or None,
                                     std=identity.std or None, resize_mode=identity.resize_mode,
                                     interpolation=identity.interpolation)


class _Preprocessing:
    """What `make_loader` uses of a backbone (its input size and preprocessing), without the model."""

    def __init__(self, identity: BackboneIdentity):
        self.image_size = identity.image_size
        self.preprocess = preprocess_of(identity)


def decode_batch(batch: dict, *, identity: dict, max_pixels: int, max_bytes: int) -> dict:
    """A Ray Data batch of poster files → their preprocessed pixels, by the local engine's decode path.
    A poster that cannot be used keeps zero pixels and its reason in `error` ("" when decoded)."""
    ident = BackboneIdentity.from_dict(identity)
    load = make_loader(_Preprocessing(ident), max_pixels, max_bytes)
    paths = list(batch["path"])
    size = ident.image_size
    pixels = np.zeros((len(paths), 3, size, size), np.float32)
    errors = []
    for i, path in enumerate(paths):
        try:
            pixels[i] = load(path).numpy()
            errors.append("")
        except PosterError as exc:
            errors.append(str(exc))
    return {"hash": batch["hash"], "path": batch["path"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class PosterEncoder:
    """A Ray Data actor: loads the cache's backbone once (checked against the cache's identity) and
    turns batches of pixels into L2-normalised float32 embeddings; with `tokens` (the cache's dtype,
    e.g. "float16"), also each poster's token sequence (`Backbone.encode_image_tokens`) in that dtype,
    which is what the cache stores and keeps the object store's share small."""

    def __init__(self, identity: dict, spec: dict | None, pretrained: str | None, device: str, precision: str,
                 tokens: str | None = None):
        from clipposter.embedding.backbone import load_backbone_like

        self.backbone = load_backbone_like(BackboneIdentity.from_dict(identity), spec, pretrained=pretrained,
                                           device=device, precision=precision)
        self.token_dtype = None if tokens is None else np.dtype(tokens)
        # a backbone without a ViT token sequence is refused here, once, before any batch
        self.token_shape = None if tokens is None else self.backbone.token_shape

    def __call__(self, batch: dict) -> dict:
        import torch

        ok = np.asarray(batch["error"] == "", dtype=bool)
        emb = np.zeros((len(ok), self.backbone.embed_dim), np.float32)
        out = {"hash": batch["hash"], "path": batch["path"], "error": batch["error"], "embedding": emb}
        if self.token_shape is not None:
            out["tokens"] = np.zeros((len(ok), *self.token_shape), self.token_dtype)
        if ok.any():
            pixels: torch.Tensor = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            if self.token_shape is None:
                emb[ok] = self.backbone.encode_image_tensors(pixels)
            else:
                emb[ok], out["tokens"][ok] = self.backbone.encode_image_tokens(pixels)
        return out


def cpu_slots(cpus: float, concurrency: int) -> tuple[float, float]:
    """(CPUs a decode task holds, CPUs an encoder actor holds) on a cluster of `cpus` CPUs.

    Ray's CPUs are slots that each node holds on its own: encoders holding every slot would leave the
    decode tasks none, and the job would wait forever. So both take slots of one size, 1/m of a CPU
    with the smallest whole m that leaves one slot over ((concurrency + 1) / m <= cpus): a node's
    CPUs are a whole number of such slots, so wherever Ray puts the encoders, the slot left over is
    whole on some node. A decode task larger than an encoder could find its CPU split over nodes (two
    encoders of half a CPU on two 1-CPU nodes leave half a CPU on each) and never run."""
    slot = 1 / max(1, math.ceil((concurrency + 1) / max(cpus, 1.0)))
    return slot, slot


def _check_settings(batch_size, concurrency, gpus_per_worker) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be at least 1, got {batch_size!r}")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        raise ConfigError("concurrency", f"must be at least 1 encoder, got {concurrency!r}")
    if gpus_per_worker is not None and not (isinstance(gpus_per_worker, (int, float)) and gpus_per_worker >= 0):
        raise ConfigError("gpus_per_worker", f"must be 0 or more, got {gpus_per_worker!r}")


def _start_ray(address: str | None) -> bool:
    """Connect to the cluster at `address` (or start a local Ray) unless this process already has
    one; True when this call started the connection (and so ends it)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ClipposterError(f"cannot start {where}: {cause_line(exc)}; check `address`") from None
    return True


def _job_error(exc: BaseException) -> ClipposterError:
    """A failure inside the Ray job as one line: the library's own error where a worker raised one
    (the backbone refused by an actor), else Ray's first line."""
    seen, hops = exc, 0
    while seen is not None and hops < 20:
        cause = getattr(seen, "cause", None)
        if isinstance(cause, ClipposterError):
            return ClipposterError(str(cause))
        seen, hops = (cause if isinstance(cause, BaseException) else seen.__cause__), hops + 1
    text = str(exc)
    for line in text.splitlines():  # Ray repeats the worker's traceback: its last line names the error
        if "ClipposterError: " in line:
            return ClipposterError(line.split("ClipposterError: ", 1)[1].strip())
    return ClipposterError(f"the Ray job failed: {cause_line(exc)}")


def embed_records_ray(records: Sequence[PosterRecord], cache: EmbeddingCache, *, pretrained: str | None = None,
                      address: str | None = None, concurrency: int | None = None,
                      gpus_per_worker: float | None = None, batch_size: int = 64, device: str = "auto",
                      precision: str = "auto", strict: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                      max_bytes: int = DEFAULT_MAX_BYTES, progress: bool = True,
                      tokens: bool | None = None) -> EmbedSummary:
    """`embed_records` on Ray Data: encode the posters of `records` that `cache` lacks with the backbone
    the cache records (`pretrained`: its checkpoint's new path, when it moved), and store every usable
    record. Returns the same summary, with the same counts, as the local engine.

    address: a Ray cluster (`ray://HOST:10001`, `HOST:6379`, `auto`); None starts a local Ray, and a
    process already connected to Ray uses that connection. concurrency: encoder actors (default: one
    per `gpus_per_worker` GPUs of the cluster, else one per two CPUs). gpus_per_worker: GPUs each
    actor holds (default: 1 when the cluster has GPUs, else 0). batch_size: posters per encoder call
    and per committed block. tokens: also store each new poster's ViT token sequence, as the local
    engine does; None follows the cache (`resolve_tokens`: tokens when its posters have them). A run
    with nothing new to encode starts no Ray.
    """
    _check_settings(batch_size, concurrency, gpus_per_worker)
    tokens = resolve_tokens(cache, tokens)
    identity, spec = cache.identity, cache.backbone_spec
    if pretrained is not None:  # refused here, before any Ray work, when it names other weights
        check_choice(identity, (spec or {}).get("model", identity.model), pretrained, f"the cache {cache.root}")
    started = time.perf_counter()
    plan = plan_embedding(records, cache, strict=strict, max_bytes=max_bytes, progress=progress)
    summary = plan.summary
    summary.tokens = tokens
    todo = plan.todo
    if not todo:  # everything cached (or unusable): no cluster, no model
        summary.seconds = time.perf_counter() - started
        return summary

    try:
        import ray
        import ray.data
    except ImportError:
        raise ClipposterError("the Ray engine needs Ray Data: pip install 'clipposter[scale]' "
                              "(or 'ray[data]')") from None

    owns = _start_ray(address)
    try:
        encode_started = time.perf_counter()
        resources = ray.cluster_resources()
        gpus = gpus_per_worker if gpus_per_worker is not None else (1 if resources.get("GPU", 0) >= 1 else 0)
        if concurrency is None:
            concurrency = (max(1, int(resources.get("GPU", 0) // gpus)) if gpus
                           else max(1, int(resources.get("CPU", 1)) // 2))
        decode_cpus, encoder_cpus = cpu_slots(float(resources.get("CPU", 1)), concurrency)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver's own bar counts committed posters
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run notes are not ours to print
        reported = {os.path.abspath(p): p for _, p in todo}
        rows = [{"hash": h, "path": os.path.abspath(p)} for h, p in todo]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
        # Decoding runs in CPU tasks of its own, which reserve the memory of a batch of decoded posters
        # and pixels. That reservation also keeps the stages apart: Ray fuses map stages whose remote
        # arguments agree, which would put decoding inside the encoder actors, serial with the model.
        decode_memory = batch_size * (3 * identity.image_size ** 2 * 4 + _DECODED_POSTER_BYTES)
        ds = ds.map_batches(decode_batch, batch_size=batch_size, num_cpus=decode_cpus, memory=decode_memory,
                            fn_kwargs={"identity": identity.to_dict(), "max_pixels": max_pixels,
                                       "max_bytes": max_bytes})
        ds = ds.map_batches(PosterEncoder, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
                            num_cpus=encoder_cpus, num_gpus=gpus,
                            fn_constructor_kwargs={"identity": identity.to_dict(), "spec": spec,
                                                   "pretrained": pretrained,
                                                   "device": ("cuda" if gpus else "cpu") if device == "auto" else device,
                                                   "precision": precision,
                                                   "tokens": cache.dtype if tokens else None})
        bar = tqdm(total=len(todo), desc="embedding", unit="poster", disable=not progress)
        try:
            # One block at a time: memory stays bounded, and each block is one committed append.
            for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                ok = [i for i, e in enumerate(block["error"]) if e == ""]
                for i, err in enumerate(block["error"]):
                    if err:
                        plan.fail(str(block["hash"][i]), reported.get(block["path"][i], block["path"][i]), err)
                if ok:
                    plan.store(cache, [str(block["hash"][i]) for i in ok], block["embedding"][ok],
                               tokens=block["tokens"][ok] if tokens else None)
                bar.update(len(block["hash"]))
        except Exception as exc:
            if type(exc).__module__.startswith("clipposter."):
                raise  # raised by the driver itself (`strict`, the cache): already one line
            raise _job_error(exc) from None  # a worker's failure, as Ray wraps it
        finally:
            bar.close()
        summary.encode_seconds = time.perf_counter() - encode_started
    finally:
        if owns:
            ray.shutdown()
    summary.seconds = time.perf_counter() - started
    return summary
