"""Cache commands: `embed` (posters → embedding cache), `cache info`, `synth` and `download`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipposter.cli import cache as cache_commands
from clipposter.cli.common import (add_backbone_args, add_cache_flag, add_json_flag, add_source_args, backbone_from_args,
                                   emit, load_records, pretrained_value, warn)
from clipposter.errors import ClipposterError, ConfigError


def cmd_embed(args) -> int:
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.embedding.embed import embed_records, embed_texts, reference_and_prompt_texts, resolve_tokens
    from clipposter.embedding.gpu_decode import check_decode
    from clipposter.ingest.sources import SourceStats

    check_engine_flags(args)
    check_decode(args.decode)  # `--decode gpu` without CUDA fails before any file is read
    source = SourceStats()
    records = load_records(args, source)  # every error about the source comes before the cache is made
    if EmbeddingCache.exists(args.cache):
        # The backbone the cache was made with, loaded only if some poster or text is new.
        cache = EmbeddingCache.open(args.cache)
        if not cache.writable:  # a v1 cache: read-only until migrated
            cache.close()
            cache.require_writable("embed into it")
        if args.dtype is not None and args.dtype != cache.dtype:
            cache.close()
            raise ConfigError("dtype", f"is {args.dtype}, but the cache {cache.root} stores {cache.dtype}; leave it out "
                              f"(the cache's type is kept) or embed into a new cache")
        backbone = cache_backbone(cache, args)
    else:
        backbone = backbone_from_args(args)
        if args.tokens:
            backbone.token_shape  # a tower without token sequences is refused before the cache is made
        cache = EmbeddingCache.open(args.cache, backbone.identity, dtype=args.dtype or "float16",
                                    backbone_spec=backbone.spec)
    try:
        tokens = resolve_tokens(cache, args.tokens)
        token_plan = token_estimate(cache, backbone, len(records), args.source) if tokens else None
    except ClipposterError:
        cache.close()
        raise
    if args.engine == "ray":
        from clipposter.embedding.ray_engine import embed_records_ray

        summary = embed_records_ray(records, cache, pretrained=ray_pretrained(args), address=args.address,
                                    concurrency=args.concurrency, gpus_per_worker=args.gpus_per_worker,
                                    batch_size=args.batch_size, device=args.device, precision=args.precision,
                                    strict=args.strict, max_pixels=args.max_pixels, max_bytes=args.max_bytes,
                                    progress=not args.json, tokens=tokens)
    else:
        summary = embed_records(records, cache, backbone, batch_size=args.batch_size, workers=args.workers,
                                strict=args.strict, max_pixels=args.max_pixels, max_bytes=args.max_bytes,
                                progress=not args.json, decode=args.decode, tokens=tokens)
    texts = 0
    if not args.no_texts:
        texts = embed_texts(cache, backbone, reference_and_prompt_texts(records), progress=not args.json)
    info = cache.info()
    cache.close()  # a closed cache rests in a state readers open without writing
    payload = {"summary": summary.to_dict(), "texts": texts, "cache": info.to_dict(), "source": source.to_dict(),
               "tokens": token_plan}
    lines = [summary_line(summary),
             f"{texts} distinct texts cached (taglines, overviews, genre prompts)",
             f"cache {info.path}: {info.posters} posters, {info.records} records, {info.texts} texts"]
    emit(args, payload, "\n".join(lines))
    if summary.skipped and summary.skipped == summary.records:
        raise ClipposterError(f"{args.source}: none of the {summary.records} posters could be used")
    return 0


def token_estimate(cache, backbone, posters: int, source: str) -> dict:
    """What storing token sequences costs, printed (to stderr) before any poster is read: the shape and
    bytes per poster, and at most how much the run adds (every poster of the source new). A warning
    when that is more than the cache's disk has free."""
    import shutil

    shape = getattr(cache, "token_shape", None)
    if shape is None:  # a new (or empty) cache: the backbone's, loaded now (it encodes every poster anyway)
        shape = (backbone if hasattr(backbone, "token_shape") else backbone()).token_shape
    t, w = shape
    per_poster = token_bytes(cache, (t, w))
    at_most = per_poster * posters
    free = shutil.disk_usage(cache.root).free
    print(f"tokens: {t} × {w} {cache.dtype} per poster ({human_bytes(per_poster)}); the {posters} posters of "
          f"{source} add at most {human_bytes(at_most)} ({human_bytes(free)} free)", file=sys.stderr)
    if at_most > free:
        warn([f"the token sequences of {posters} posters may need {human_bytes(at_most)}, more than the "
              f"{human_bytes(free)} free under {cache.root}"])
    return {"shape": [t, w], "bytes_per_poster": per_poster, "at_most_bytes": at_most, "free_bytes": free}


def ray_pretrained(args) -> str | None:
    """The checkpoint the Ray engine's workers load instead of the one the cache records: --pretrained
    when it names a file (a checkpoint that moved), else None."""
    value = pretrained_value(args.pretrained) if args.pretrained is not None else None
    return value if value and Path(value).is_file() else None


def check_engine_flags(args) -> None:
    """Flags of one engine given with the other: one line, before any work."""
    if args.engine == "ray" and args.decode != "cpu":
        raise ClipposterError("--decode applies to --engine local only (the Ray engine decodes in CPU tasks)")
    if args.engine != "ray":
        for flag, value in (("--address", args.address), ("--concurrency", args.concurrency),
                            ("--gpus-per-worker", args.gpus_per_worker)):
            if value is not None:
                raise ClipposterError(f"{flag} applies to --engine ray only")


def cache_backbone(cache, args):
    """The backbone `embed` adds to an existing cache with: the one recorded in it, or the one
    --backbone/--pretrained name, refused at once (from the cache's record, loading nothing) when it
    is another. Returns a function that loads it on first call, once."""
    from functools import cache as once

    from clipposter.embedding.weights import check_choice  # light: the choice is checked without torch

    identity, pretrained = cache.identity, None  # None: the weights the cache records
    if args.backbone is not None or args.pretrained is not None:
        model = args.backbone or identity.model
        if args.pretrained is not None or model != identity.model:
            pretrained = pretrained_value(args.pretrained)
            check_choice(identity, model, pretrained, f"the cache {cache.root}")

    @once
    def load():
        from clipposter.embedding.backbone import load_backbone_like

        return load_backbone_like(identity, cache.backbone_spec, pretrained=pretrained, device=args.device,
                                  precision=args.precision)

    return load


def summary_line(summary) -> str:
    """What an embed run did, in one line; a rate only when something was encoded."""
    if summary.encoded:
        return (f"{summary.records} posters: {summary.encoded} encoded, {summary.cached} already cached, "
                f"{summary.skipped} skipped ({summary.posters_per_second:.1f} posters/s)")
    if summary.skipped:
        return f"{summary.records} posters: none encoded, {summary.cached} already cached, {summary.skipped} skipped"
    return f"{summary.records} posters: all already cached, nothing to encode"


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def token_bytes(cache, shape: tuple[int, int]) -> int:
    """Bytes of one poster's token sequence of `shape` in the cache's stored type."""
    import numpy as np

    return shape[0] * shape[1] * np.dtype(cache.dtype).itemsize


def token_line(cache, posters: int) -> tuple[dict | None, str]:
    """The token sequences a cache stores, for `cache info`: (JSON, text)."""
    shape = getattr(cache, "token_shape", None)
    if shape is None or not posters:
        some = getattr(cache, "has_some_tokens", False)
        return None, ("for some posters only (a head reading tokens cannot use this cache)" if some
                      else "none (one pooled embedding per poster; `embed --tokens` stores them)")
    t, w = shape
    per_poster = token_bytes(cache, (t, w))
    return ({"shape": [t, w], "bytes_per_poster": per_poster, "bytes": per_poster * posters},
            f"{t} × {w} per poster ({human_bytes(per_poster)}), {human_bytes(per_poster * posters)} in all")


def cmd_cache_info(args) -> int:
    from clipposter.embedding.identity import BackboneIdentity
    from clipposter.embedding.cache import EmbeddingCache

    with EmbeddingCache.open(args.cache, mode="r") as cache:
        info = cache.info()
        token_info = token_line(cache, info.posters)
    bb = BackboneIdentity.from_dict(info.backbone)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(info.splits.items())) or "none"
    random_note = " — random weights: the embeddings carry no meaning" if bb.is_random else ""
    text = (f"cache      {info.path}\n"
            f"backbone   {bb.describe()}{random_note}\n"
            f"dtype      {info.dtype} × {info.dim}\n"
            f"posters    {info.posters} distinct images\n"
            f"records    {info.records} ({splits})\n"
            f"texts      {info.texts}\n"
            f"tokens     {token_info[1]}\n"
            f"on disk    {human_bytes(info.bytes_on_disk)}")
    emit(args, {**info.to_dict(), "random_weights": bb.is_random, "tokens": token_info[0]}, text)
    return 0


def cmd_synth(args) -> int:
    from clipposter.ingest.synthetic import generate_posters

    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ClipposterError(f"--size must be WIDTHxHEIGHT in pixels (like 200x300), got {args.size!r}") from None
    records = generate_posters(args.out, n=args.n, seed=args.seed, size=(width, height), cue=args.cue,
                               progress=not args.json)
    manifest = Path(args.out) / "manifest.csv"
    emit(args, {"posters": len(records), "manifest": str(manifest)},
         f"{len(records)} synthetic posters; manifest {manifest}")
    return 0


def cmd_download(args) -> int:
    from clipposter.ingest.download import download_posters
    from clipposter.ingest.sources import SourceStats

    source = SourceStats()
    records = [r for r in load_records(args, source, local_images=False) if r.url]
    if not records:
        raise ClipposterError(f"{args.source}: no poster URLs to download (no url column, or every url is empty)")
    limits = {k: getattr(args, k) for k in ("deadline", "max_bytes", "max_pixels") if getattr(args, k) is not None}
    report = download_posters(records, args.out, workers=args.workers, timeout=args.timeout, retries=args.retries,
                              progress=not args.json, **limits)
    failures = Path(args.out) / "failures.csv"
    if report.failed:
        report.write_failures(failures)
    else:
        failures.unlink(missing_ok=True)  # the report of an earlier run no longer describes the folder
    emit(args, {**report.to_dict(), "source": source.to_dict()},
         f"{report.downloaded} downloaded, {report.skipped_existing} already present, "
         f"{len(report.failed)} failed" + (f" (see {failures})" if report.failed else ""))
    if report.failed:
        had = report.downloaded + report.skipped_existing
        if not had:  # nothing to work with: a script must notice
            raise ClipposterError(f"none of the {len(report.failed)} posters could be downloaded; see {failures}")
        # Some posters are missing, the rest are usable: the run did its job, the warning says what it missed.
        warn([f"{len(report.failed)} of {had + len(report.failed)} posters could not be downloaded; see {failures}"])
    return 0


def register(sub) -> None:
    """Add `embed`, `cache info`, `synth` and `download` to the top-level subparsers."""
    p = sub.add_parser("embed", help="encode posters into an embedding cache",
                       description="Encode every poster of SOURCE once with a frozen CLIP backbone into --cache. "
                                   "SOURCE: a folder of images, a CSV/Parquet manifest, MovieGenre.csv, kaggle:DIR, or "
                                   "wds:SHARDS (WebDataset tar shards, docs/webdataset.md).")
    p.add_argument("source", metavar="SOURCE", help="folder, manifest (.csv/.parquet), MovieGenre.csv, kaggle:DIR or wds:SHARDS")
    add_cache_flag(p, help="cache directory (created if missing)")
    add_backbone_args(p)
    add_source_args(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="decode threads running ahead of the model (default: 2 on CPU, up to 8 on GPU; 0 decodes "
                        "inline, faster on a CPU other jobs share)")
    p.add_argument("--decode", default="cpu", choices=["cpu", "gpu", "auto"],
                   help="where JPEGs are decoded: cpu (Pillow, the default), gpu (in batches on the CUDA device, "
                        "the rest on the CPU; embeddings close to, not equal to, cpu's) or auto (gpu when the "
                        "backbone runs on one)")
    p.add_argument("--tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="also store each poster's ViT token sequence (the pooled token and one per patch, "
                        "projected: ViT-B-32 50 × 512, 50 KB a poster in float16), for heads that attend over "
                        "patches (train genres --memory tokens); the size is printed before the run. An "
                        "existing cache keeps its own choice")
    p.add_argument("--dtype", default=None, choices=["float16", "float32"],
                   help="stored embedding type of a new cache (default float16); an existing cache keeps its own")
    g = p.add_argument_group("engine")
    g.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process (default); ray: decode in Ray tasks and encode in a pool of Ray "
                        "actors, one cache append per block (pip install 'clipposter[scale]')")
    g.add_argument("--address", default=None,
                   help="Ray cluster to run on (ray://HOST:10001, HOST:6379 or auto; default: a local Ray)")
    g.add_argument("--concurrency", type=int, default=None,
                   help="encoder actors (default: one per GPU, else one per two CPUs of the cluster)")
    g.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs each encoder actor holds (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="decompression-bomb limit per poster")
    p.add_argument("--strict", action="store_true", help="stop at the first unusable poster")
    p.add_argument("--no-texts", action="store_true",
                   help="do not cache text embeddings (taglines, overviews, genre prompts)")
    add_json_flag(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("cache", help="inspect an embedding cache")
    csub = p.add_subparsers(dest="cache_command", required=True)
    q = csub.add_parser("info", help="counts, backbone, dtype and size on disk")
    add_cache_flag(q)
    add_json_flag(q)
    q.set_defaults(func=cmd_cache_info)
    cache_commands.register(csub)

    p = sub.add_parser("synth", help="generate genre-conditioned synthetic posters with a manifest")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder (posters/ and manifest.csv)")
    p.add_argument("-n", type=int, default=200, help="number of posters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="200x300", metavar="WxH", help="poster size in pixels (default 200x300)")
    p.add_argument("--cue", default="global", choices=["global", "region"],
                   help="global: a genre's art fills the poster (default); region: it fills one quadrant and "
                        "decoy art the rest (a test of heads that attend over patches, train genres --memory tokens)")
    add_json_flag(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("download", help="download posters of a manifest's URL column",
                       description="Download the poster of every record of SOURCE that has a URL into --out. Resumes: "
                                   "a poster already there costs no request (it is decoded in full once, then "
                                   "trusted by its size and mtime). A poster counts only when every byte arrived "
                                   "and the whole image decodes. Failures are listed in --out/failures.csv; "
                                   "exits 0 with a warning when some posters failed, and exits 2 when no poster "
                                   "could be had.")
    p.add_argument("source", metavar="SOURCE", help="manifest or MovieGenre.csv with poster URLs")
    add_source_args(p, reads_posters=False)
    p.add_argument("--out", metavar="DIR", required=True,
                   help="folder for the posters (resumes: present files are skipped)")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="longest wait for a connection or for the next bytes of a body (default 10)")
    p.add_argument("--retries", type=int, default=3,
                   help="further tries after a timeout, a dropped connection, a body cut short, 5xx or 429 "
                        "(default 3)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="most time one URL may take, retries included; checked between reads, so it may run "
                        "one --timeout over (default: 6 × --timeout)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="largest poster body, refused while reading (default 50 MB, as for local posters)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="decompression-bomb limit per poster (default 89478485, as for embed)")
    add_json_flag(p)
    p.set_defaults(func=cmd_download)
