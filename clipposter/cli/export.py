"""`clipposter export wds`: any poster source → WebDataset tar shards (to move posters to a cluster)."""
from __future__ import annotations

from clipposter.cli.common import add_json_flag, add_source_args, emit, load_records, warn
from clipposter.errors import ClipposterError

# Skipped posters named one by one on stderr before the rest are only counted.
MAX_NAMED = 10


def cmd_export_wds(args) -> int:
    from clipposter.ingest.sources import SourceStats
    from clipposter.ingest.webdataset import EXPORT_INDEX, export_webdataset

    source = SourceStats()
    records = load_records(args, source)
    summary = export_webdataset(records, args.out, shard_size=args.shard_size, max_bytes=args.max_bytes,
                                source=args.source, progress=not args.json)
    named = [f"skipped {path}: {reason}" for path, reason in summary.skipped_files[:MAX_NAMED]]
    if len(summary.skipped_files) > MAX_NAMED:
        named.append(f"and {len(summary.skipped_files) - MAX_NAMED} more skipped")
    warn(named)
    samples = summary.written + summary.reused
    text = (f"{summary.records} posters: {samples} in {len(summary.shards)} shards of up to {args.shard_size} "
            f"({summary.written} written, {summary.reused} kept from an earlier run), {summary.skipped} skipped\n"
            f"shards {args.out}/{{{summary.shards[0][:-4]}..{summary.shards[-1][:-4]}}}.tar, index "
            f"{args.out}/{EXPORT_INDEX}" if summary.shards else f"{summary.records} posters: no shards written")
    emit(args, {**summary.to_dict(), "out": str(args.out), "source": source.to_dict()}, text)
    if summary.records and not samples:
        raise ClipposterError(f"{args.source}: none of the {summary.records} posters could be read")
    return 0


def register(sub, train=None, evaluate=None) -> None:
    """Add `export wds` to the top-level subparsers."""
    p = sub.add_parser("export", help="write posters in another layout (WebDataset shards)")
    esub = p.add_subparsers(dest="export_format", required=True)
    q = esub.add_parser("wds", help="write a source as WebDataset tar shards",
                        description="Write every poster of SOURCE into WebDataset tar shards 000000.tar, 000001.tar, "
                                    "... in --out: KEY.jpg (the poster file's bytes, unchanged), KEY.json (id, title, "
                                    "genres, tagline, overview, split, url) and KEY.txt (the tagline). `clipposter "
                                    "embed wds:DIR` reads them back with the same ids. A rerun keeps the shards an "
                                    "earlier run finished (listed in --out/export.json) and writes the rest.")
    q.add_argument("source", metavar="SOURCE",
                   help="folder, manifest (.csv/.parquet), MovieGenre.csv, kaggle:DIR or wds:SHARDS")
    q.add_argument("--out", metavar="DIR", required=True, help="folder for the shards (created if missing)")
    q.add_argument("--shard-size", type=int, default=1000, metavar="N", help="posters per shard (default 1000)")
    add_source_args(q)
    add_json_flag(q)
    q.set_defaults(func=cmd_export_wds)
