"""Commands on whole caches: `cache migrate`, `cache merge` and `cache compact` (sharded caches)."""
from __future__ import annotations

from clipposter.cli.common import add_cache_flag, add_json_flag, emit


def _shard_rows_flag(p) -> None:
    p.add_argument("--shard-rows", type=int, default=262_144, metavar="N",
                   help="rows per shard written (default 262144: 256 MiB at width 512 in float16)")


def _line(summary: dict) -> str:
    return (f"cache {summary['cache']}: {summary['shards']} shards, {summary['posters']} posters, "
            f"{summary['records']} records, {summary['texts']} texts")


def cmd_cache_migrate(args) -> int:
    from clipposter.embedding.cache_convert import migrate

    summary = migrate(args.cache, args.out, shard_rows=args.shard_rows)
    done = "converted to the sharded format" if summary["migrated"] else "already sharded"
    emit(args, summary, f"{done}; {_line(summary)}")
    return 0


def cmd_cache_merge(args) -> int:
    from clipposter.embedding.cache_convert import merge

    summary = merge(args.caches, args.out)
    emit(args, summary, f"merged {len(args.caches)} caches; {_line(summary)}")
    return 0


def cmd_cache_compact(args) -> int:
    from clipposter.embedding.cache_convert import compact

    summary = compact(args.cache, shard_rows=args.shard_rows)
    emit(args, summary, f"{summary['shards_before']} shards compacted; {_line(summary)}")
    return 0


def register(csub) -> None:
    """Add `migrate`, `merge` and `compact` to the `cache` command's subparsers."""
    q = csub.add_parser("migrate", help="convert a cache to the sharded format (in place, or into --out)",
                        description="Convert a format-1 cache (index.sqlite + images.npy) into write-once shards, "
                                    "keeping every id, vector and record. In place unless --out names a new "
                                    "folder; a run killed half way leaves the old cache usable.")
    add_cache_flag(q, help="the format-1 cache to convert")
    q.add_argument("--out", metavar="DIR", default=None, help="write the sharded cache here instead (a new folder)")
    _shard_rows_flag(q)
    add_json_flag(q)
    q.set_defaults(func=cmd_cache_migrate)

    q = csub.add_parser("merge", help="merge sharded caches of one backbone into a new cache",
                        description="A new cache in --out holding every shard of the given caches (hard links "
                                    "where possible). A poster in several keeps the first cache's row, a poster id "
                                    "the last cache's record.")
    q.add_argument("caches", metavar="CACHE", nargs="+", help="two or more sharded caches")
    q.add_argument("--out", metavar="DIR", required=True, help="the new cache's folder (must not exist)")
    add_json_flag(q)
    q.set_defaults(func=cmd_cache_merge)

    q = csub.add_parser("compact", help="rewrite a sharded cache's many small shards as few",
                        description="Rewrite the shards of CACHE as few, each poster once; writers may go on "
                                    "appending meanwhile.")
    add_cache_flag(q, help="the sharded cache")
    _shard_rows_flag(q)
    add_json_flag(q)
    q.set_defaults(func=cmd_cache_compact)
