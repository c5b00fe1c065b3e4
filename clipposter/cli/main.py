"""`clipposter` command line: parses arguments, calls the Python API, prints (or prints JSON).

Expected failures (bad input, missing weights, mismatched caches) end with one `error:` line and a
non-zero exit code; only real bugs show a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from clipposter.errors import ClipposterError

EXIT_ERROR = 2


def _emit(args, payload: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(text)


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default="ViT-B-32",
                   help="open_clip architecture (ViT-B-32, ViT-L-14, clipposter-tiny) or hf-hub:ORG/NAME")
    g.add_argument("--pretrained", default="openai",
                   help="open_clip pretrained tag (openai, laion2b_s34b_b79k, ...) or a local checkpoint file; "
                        "'random' for seeded random weights (benchmarks only)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="autocast precision on GPU (auto: fp16 on CUDA, fp32 on CPU)")


def _add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source")
    for col, default in [("id", "id"), ("image", "image"), ("genres", "genres"), ("tagline", "tagline"),
                         ("overview", "overview"), ("split", "split"), ("title", "title"), ("url", "url")]:
        g.add_argument(f"--{col}-col", default=None, help=f"manifest column with the {col} (default: {default})")
    g.add_argument("--image-root", default=None, help="folder that relative image paths in a manifest start from")
    g.add_argument("--seed", type=int, default=0, help="seed of the train/validation/test split (default 0)")
    g.add_argument("--download-dir", default=None,
                   help="download posters that only have a URL into this folder before embedding")


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _backbone_from_args(args):
    from clipposter.embedding.backbone import load_backbone

    pretrained = None if args.pretrained in ("random", "none", "") else args.pretrained
    return load_backbone(args.backbone, pretrained, device=args.device, precision=args.precision)


def _load_records(args):
    from clipposter.ingest.sources import SourceStats, load_source

    options = {k: v for k, v in vars(args).items() if k.endswith("_col") and v is not None}
    if args.image_root:
        options["image_root"] = args.image_root
    stats = SourceStats()
    records = load_source(args.source, seed=args.seed, stats=stats, **options)
    if stats.rows_skipped:
        print(f"warning: {args.source}: {stats.summary()}", file=sys.stderr)
    if args.download_dir:
        from clipposter.ingest.download import download_posters

        report = download_posters([r for r in records if not r.image and r.url], args.download_dir,
                                  progress=not args.json)
        if report.failed:
            report.write_failures(Path(args.download_dir) / "failures.csv")
            print(f"warning: {len(report.failed)} posters could not be downloaded; "
                  f"see {Path(args.download_dir) / 'failures.csv'}", file=sys.stderr)
    return records


def cmd_embed(args) -> int:
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.embedding.embed import embed_records, embed_texts, reference_and_prompt_texts

    records = _load_records(args)
    if not records:
        raise ClipposterError(f"{args.source}: no posters found; check the path and the manifest columns")
    backbone = _backbone_from_args(args)
    cache = EmbeddingCache.open(args.cache, backbone.identity, dtype=args.dtype, backbone_spec=backbone.spec)
    summary = embed_records(records, cache, backbone, batch_size=args.batch_size, workers=args.workers,
                            strict=args.strict, max_pixels=args.max_pixels, progress=not args.json)
    texts = 0
    if not args.no_texts:
        texts = embed_texts(cache, backbone, reference_and_prompt_texts(records))
    info = cache.info()
    payload = {"summary": summary.to_dict(), "texts": texts, "cache": info.to_dict()}
    lines = [f"{summary.records} posters: {summary.encoded} encoded, {summary.cached} already cached, "
             f"{summary.skipped} skipped ({summary.posters_per_second:.1f} posters/s)",
             f"{texts} distinct texts cached (taglines, overviews, genre prompts)",
             f"cache {info.path}: {info.posters} posters, {info.records} records, {info.texts} texts"]
    _emit(args, payload, "\n".join(lines))
    if summary.skipped and summary.skipped == summary.records:
        raise ClipposterError(f"{args.source}: none of the {summary.records} posters could be used")
    return 0


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def cmd_cache_info(args) -> int:
    from clipposter.embedding.backbone import BackboneIdentity
    from clipposter.embedding.cache import EmbeddingCache

    with EmbeddingCache.open(args.dir) as cache:
        info = cache.info()
    bb = BackboneIdentity.from_dict(info.backbone)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(info.splits.items())) or "none"
    text = (f"cache      {info.path}\n"
            f"backbone   {bb.describe()}\n"
            f"dtype      {info.dtype} × {info.dim}\n"
            f"posters    {info.posters} distinct images\n"
            f"records    {info.records} ({splits})\n"
            f"texts      {info.texts}\n"
            f"on disk    {_human_bytes(info.bytes_on_disk)}")
    _emit(args, info.to_dict(), text)
    return 0


def cmd_synth(args) -> int:
    from clipposter.ingest.synthetic import generate_posters

    records = generate_posters(args.out, n=args.n, seed=args.seed, progress=not args.json)
    manifest = Path(args.out) / "manifest.csv"
    _emit(args, {"posters": len(records), "manifest": str(manifest)},
          f"{len(records)} synthetic posters; manifest {manifest}")
    return 0


def cmd_download(args) -> int:
    from clipposter.ingest.download import download_posters
    from clipposter.ingest.sources import load_source

    records = load_source(args.source, seed=0)
    report = download_posters([r for r in records if r.url], args.out, workers=args.workers,
                              timeout=args.timeout, retries=args.retries, progress=not args.json)
    failures = Path(args.out) / "failures.csv"
    if report.failed:
        report.write_failures(failures)
    payload = report.to_dict()
    _emit(args, payload, f"{report.downloaded} downloaded, {report.skipped_existing} already present, "
                         f"{len(report.failed)} failed" + (f" (see {failures})" if report.failed else ""))
    return 0


def cmd_demo(args) -> int:
    from clipposter.pipeline import format_demo, run_demo

    result = run_demo(args.out, n=args.n, source=args.source, seed=args.seed, progress=not args.json)
    _emit(args, result.to_dict(), format_demo(result))
    return 0


def _head_commands():
    """Registration functions of the heads' command modules (imported lazily: no torch at parse time)."""
    import clipposter.cli.app as commands_app
    import clipposter.cli.captions as commands_captions
    import clipposter.cli.genres as commands_genres
    import clipposter.cli.report as commands_report
    import clipposter.cli.search as commands_search

    return [commands_genres.register, commands_captions.register, commands_search.register,
            commands_report.register, commands_app.register]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipposter", description="Movie-poster analysis on frozen CLIP embeddings: "
                                     "genres, taglines and similarity search from one embedding cache.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("embed", help="encode posters into an embedding cache",
                       description="Encode every poster of SOURCE once with a frozen CLIP backbone into --cache. "
                                   "SOURCE: a folder of images, a CSV/Parquet manifest, MovieGenre.csv, or kaggle:DIR.")
    p.add_argument("source", help="folder, manifest (.csv/.parquet), MovieGenre.csv, or kaggle:DIR")
    p.add_argument("--cache", required=True, help="cache directory (created if missing)")
    _add_backbone_args(p)
    _add_source_args(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="decode threads running ahead of the model (default: 2 on CPU, up to 8 on GPU; 0 decodes inline, faster on a CPU other jobs share)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored embedding type")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="decompression-bomb limit per poster")
    p.add_argument("--strict", action="store_true", help="stop at the first unusable poster")
    p.add_argument("--no-texts", action="store_true",
                   help="do not cache text embeddings (taglines, overviews, genre prompts)")
    _json_flag(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("cache", help="inspect an embedding cache")
    csub = p.add_subparsers(dest="cache_command", required=True)
    q = csub.add_parser("info", help="counts, backbone, dtype and size on disk")
    q.add_argument("dir")
    _json_flag(q)
    q.set_defaults(func=cmd_cache_info)

    p = sub.add_parser("synth", help="generate genre-conditioned synthetic posters with a manifest")
    p.add_argument("out", help="output folder")
    p.add_argument("-n", type=int, default=200, help="number of posters")
    p.add_argument("--seed", type=int, default=0)
    _json_flag(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("download", help="download posters of a manifest's URL column")
    p.add_argument("source", help="manifest or MovieGenre.csv with poster URLs")
    p.add_argument("--out", required=True, help="folder for the posters (resumes: present files are skipped)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--retries", type=int, default=3)
    _json_flag(p)
    p.set_defaults(func=cmd_download)

    # Heads add their own subcommands: `train <head>`, `evaluate <head>`, and top-level ones such as `predict`.
    train = sub.add_parser("train", help="train a head on an embedding cache").add_subparsers(
        dest="head", required=True)
    evaluate = sub.add_parser("evaluate", help="evaluate a head on a cache split").add_subparsers(
        dest="head", required=True)
    for register in _head_commands():
        register(sub, train, evaluate)

    p = sub.add_parser("demo", help="the main job end to end: posters → embed → both heads → evaluation → index → report",
                       description="Generate synthetic posters (or read --source), embed them, train the genre and "
                                   "caption heads briefly, evaluate both beside their baselines, build the poster "
                                   "index and write an HTML report; prints the report's path. Uses ViT-B-32/openai "
                                   "and gpt2 when their weights can be had, else the tiny random backbone and a tiny "
                                   "GPT-2 (and says so). Rerunning reuses finished stages.")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("-n", type=int, default=600, help="number of synthetic posters (default 600)")
    p.add_argument("--source", default=None,
                   help="run on your own posters instead: a folder, a manifest with genres and taglines, or kaggle:DIR")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic posters, splits and training")
    _json_flag(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    if not args.verbose:
        # open_clip and the hub client log their own multi-line errors; ours is the one line that counts.
        for name in ("root", "huggingface_hub", "open_clip"):
            logging.getLogger(name).setLevel(logging.CRITICAL if name == "root" else logging.ERROR)
        logging.getLogger("clipposter").setLevel(logging.WARNING)
    try:
        return args.func(args) or 0
    except ClipposterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
