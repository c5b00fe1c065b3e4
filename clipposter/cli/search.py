"""Search subcommands: `search` (posters like a poster file, a poster id or a text) and `duplicates`.

Both open the poster index saved in `<cache>/index/` (built on first use, extended when the cache
gained posters, rebuilt when it changed) and print a table, or JSON with --json.
"""
from __future__ import annotations

import argparse
import math

from clipposter.cli.common import add_cache_flag, add_device_flag, add_json_flag, emit
from clipposter.errors import ClipposterError, ConfigError

# The index settings of clipposter.search, spelled out here so that parsing arguments does not import
# torch or faiss (a test checks that they agree with the library's).
INDEX_KINDS = ("auto", "exact", "hnsw", "ivfpq")
DEFAULT_THRESHOLD = 100_000
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_DUPLICATE_LIMIT = 50  # a large collection has thousands of pairs above the threshold


def _index_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("index")
    g.add_argument("--kind", default="auto", choices=INDEX_KINDS,
                   help="auto: exact below --exact-threshold posters, ivfpq above; or force exact, hnsw, ivfpq")
    g.add_argument("--exact-threshold", type=int, default=DEFAULT_THRESHOLD,
                   help=f"collections smaller than this are searched exactly (default {DEFAULT_THRESHOLD:,})")
    g.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL,
                   help="recall@10 the approximate index is tuned to at build time (default 0.95)")
    g.add_argument("--memory-budget", metavar="SIZE", default=None,
                   help="memory the index may hold, e.g. 2GB: above it, IVF-PQ trained on a sample, filled chunk by "
                        "chunk and re-ranked from the cache's rows (see docs/scaling.md); default: no limit")
    g.add_argument("--rebuild", action="store_true", help="rebuild the index even if the saved one is current")


def _open_index(args):
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.search.index import PosterIndex

    if not 0 < args.target_recall <= 1:
        raise ClipposterError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    cache = EmbeddingCache.open(args.cache, mode="r")
    try:
        index = PosterIndex.open(cache, kind=args.kind, threshold=args.exact_threshold, rebuild=args.rebuild,
                                 progress=not args.json, target_recall=args.target_recall,
                                 memory_budget=args.memory_budget)
    except ConfigError as exc:
        if exc.field != "threshold":
            raise
        # PosterIndex's `threshold` is the --exact-threshold flag here (`duplicates` has its own --threshold).
        raise ConfigError("exact_threshold", exc.problem) from None
    return cache, index


def _index_summary(index) -> dict:
    info = index.info()
    keep = ("kind", "posters", "ids", "params", "bytes", "notes", "added_rows", "tuned_recall_at_10", "build_seconds")
    return {k: info[k] for k in keep if k in info}


def _describe_index(index) -> str:
    extra = f", {index.meta['added_rows']} posters added since it was built" if index.meta.get("added_rows") else ""
    return f"{index.kind} index, {index.ntotal:,} posters{extra}"


def cmd_search(args) -> int:
    given = [(name, value) for name, value in (("image", args.image), ("id", args.poster_id), ("text", args.text))
             if value is not None]
    if not given:
        raise ClipposterError("no query given: pass one of --image PATH, --id POSTER_ID or --text \"...\"")
    if len(given) > 1:
        raise ClipposterError(f"give one query, not {len(given)}: "
                              f"{', '.join('--' + name for name, _ in given)}")
    if args.k < 1:
        raise ClipposterError(f"-k must be at least 1, got {args.k}")
    if args.genre_head and not args.genre:
        raise ClipposterError("--genre-head filters on predicted genres: give the genres with --genre too")
    kind, value = given[0]
    cache, index = _open_index(args)
    with cache:
        filters = {"genres": args.genre or None}
        if args.genre_head:
            filters["predicted"] = predicted_genres(cache, index, args.genre_head)
        if kind == "id":
            hits = index.search_ids([value], args.k, include_self=args.include_self, **filters)[0]
        elif kind == "image":
            hits = index.search_image([value], args.k, include_self=args.include_self, pretrained=args.pretrained,
                                      device=args.device, **filters)[0]
        else:
            hits = index.search_text([value], args.k, pretrained=args.pretrained, device=args.device, **filters)[0]
        payload = {"query": {"type": kind, "value": value}, "k": args.k, "genres": args.genre,
                   "index": _index_summary(index), "results": [h.to_dict() for h in hits]}
        which = "predicted" if args.genre_head else "labelled"
        head = f"posters like {kind} {value!r}" + (f" {which} {', '.join(args.genre)}" if args.genre else "")
        lines = [f"{head} ({_describe_index(index)})"]
        if not hits:
            lines.append("  no poster matches")
        width = max((len(h.id) for h in hits), default=2)
        for rank, h in enumerate(hits, 1):
            parts = [f"{rank:>3}  {h.score:.4f}  {h.id:<{width}}"]
            if h.title:
                parts.append(h.title)
            if h.genres:
                parts.append(f"[{', '.join(h.genres)}]")
            if h.image:
                parts.append(h.image)
            lines.append("  ".join(parts))
        emit(args, payload, "\n".join(lines))
    return 0


def predicted_genres(cache, index, head_dir: str, chunk: int = 65_536):
    """A genre head's predictions (at its calibrated thresholds) for every indexed poster, for the
    genre filter; the head must have been trained on the cache's backbone."""
    import numpy as np

    from clipposter.heads.genre.head import GenreHead
    from clipposter.search.index import GenrePredictions

    head = GenreHead.from_pretrained(head_dir, identity=cache.identity)
    matrix = cache.image_matrix()
    parts = [np.zeros((0, len(head.genres)), np.float32)]
    if head.memory == "tokens":  # a head that attends over patches reads the cache's token sequences
        from clipposter.heads.genre.data import require_tokens

        t, _ = require_tokens(cache)
        step = max(1, chunk // t)  # as many numbers per block as the pooled path reads
        for i in range(0, index.ntotal, step):
            parts.append(head.predict_proba(cache.tokens_for_rows(np.arange(i, min(i + step, index.ntotal)))))
        return GenrePredictions(np.concatenate(parts), head.genres, head.thresholds_for())
    # float16 rows converted a block at a time: a million posters never become one float32 copy
    for i in range(0, index.ntotal, chunk):
        parts.append(head.predict_proba(np.asarray(matrix[i:min(i + chunk, index.ntotal)], dtype=np.float32)))
    probs = np.concatenate(parts)
    return GenrePredictions(probs, head.genres, head.thresholds_for())


def _parse_threshold(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ClipposterError(f"--threshold must be a cosine similarity in (0, 1], got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ClipposterError(f"--threshold must be a cosine similarity in (0, 1], got {text}")
    return value


def cmd_duplicates(args) -> int:
    threshold = _parse_threshold(args.threshold)
    if args.limit < 0:
        raise ClipposterError(f"--limit must be zero (all pairs) or more, got {args.limit}")
    cache, index = _open_index(args)
    with cache:
        if args.method == "auto":
            use_exact = index.kind == "exact" or index.ntotal < index.threshold
        else:
            # An exact index has no neighbour search cheaper than all pairs.
            use_exact = args.method == "exact" or index.kind == "exact"
        method = "exact all-pairs" if use_exact else f"{index.kind} neighbour search"
        pairs = index.duplicates(threshold, exact=use_exact, progress=not args.json)
        shown = pairs[:args.limit] if args.limit else pairs
        # Titles of the shown posters only: a million-poster cache is not read for 50 lines.
        known = cache.record_summaries(list({pid for p in shown for pid in (p.id_a, p.id_b)}))
        titles = {pid: summary.title for pid, summary in known.items()}
        payload = {"threshold": threshold, "method": method, "pairs_found": len(pairs), "limit": args.limit,
                   "index": _index_summary(index),
                   "pairs": [{"id_a": p.id_a, "title_a": titles.get(p.id_a), "id_b": p.id_b,
                              "title_b": titles.get(p.id_b), "score": round(p.score, 6)} for p in shown]}
        lines = [f"{len(pairs)} pairs at cosine ≥ {threshold} among {index.ntotal:,} posters ({method})"]
        labels = [(_labelled(p.id_a, titles), _labelled(p.id_b, titles)) for p in shown]
        width = max((len(a) for a, _ in labels), default=2)
        for p, (a, b) in zip(shown, labels):
            same = "  (same file)" if p.score >= 1.0 and index.row_of(p.id_a) == index.row_of(p.id_b) else ""
            lines.append(f"  {p.score:.4f}  {a:<{width}}  {b}{same}")
        if len(shown) < len(pairs):
            lines.append(f"  ... {len(pairs) - len(shown)} more pairs (--limit 0 shows all)")
        emit(args, payload, "\n".join(lines))
    return 0


def _labelled(poster_id: str, titles: dict) -> str:
    """A poster id with its title beside it, when the record has one."""
    title = titles.get(poster_id)
    return f"{poster_id} ({title})" if title else poster_id


def register(sub, train, evaluate) -> None:
    """Add the search commands to the top-level subparsers."""
    p = sub.add_parser("search", help="find posters similar to a poster file, a poster id or a text",
                       description="Nearest posters by CLIP embedding. The index is kept in <cache>/index/ and "
                                   "built, extended or rebuilt as the cache changes.")
    add_cache_flag(p)
    q = p.add_argument_group("query (exactly one)")
    q.add_argument("--image", metavar="PATH", help="a poster file (cached posters reuse their embedding)")
    q.add_argument("--id", dest="poster_id", metavar="ID", help="a poster id in the cache")
    q.add_argument("--text", help="a free text, through the CLIP text encoder")
    p.add_argument("-k", type=int, default=10, help="number of posters to return (default 10)")
    p.add_argument("--genre", action="append", default=[], metavar="GENRE",
                   help="only posters labelled with this genre; repeat to require several")
    p.add_argument("--genre-head", metavar="DIR", default=None,
                   help="with --genre: filter on the genres this trained genre head predicts (at its calibrated "
                        "thresholds) instead of the cache's labels, e.g. for posters that have no labels")
    p.add_argument("--include-self", action="store_true",
                   help="keep the query poster itself (by id, or by identical file content) in the results")
    p.add_argument("--pretrained", default=None,
                   help="the backbone checkpoint, when the one recorded in the cache has moved (text and "
                        "uncached image queries)")
    add_device_flag(p, help="device for encoding text and uncached images")
    _index_args(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("duplicates", help="find pairs of near-identical posters",
                       description="Pairs of posters whose embeddings have cosine similarity at or above "
                                   "--threshold; the same file under two ids scores 1.0.")
    add_cache_flag(p)
    p.add_argument("--threshold", default="0.95", help="cosine similarity in (0, 1] (default 0.95)")
    p.add_argument("--method", default="auto", choices=["auto", "exact", "index"],
                   help="exact all-pairs products, or a neighbour search per poster through the index "
                        "(auto: exact below --exact-threshold posters)")
    p.add_argument("--limit", type=int, default=DEFAULT_DUPLICATE_LIMIT,
                   help=f"show the best this many pairs, and how many more there are (default "
                        f"{DEFAULT_DUPLICATE_LIMIT}; 0 shows all)")
    _index_args(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_duplicates)
