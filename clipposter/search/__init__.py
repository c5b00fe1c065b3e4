"""Search stage: nearest-neighbour search over a cache's poster embeddings.

    from clipposter.search import PosterIndex
    index = PosterIndex.open(cache)          # the saved index, brought up to date, or a new one
    hits = index.search_text(["a haunted house"], k=5)[0]

Modules: `config` (kinds and defaults; light, for the command line), `engines` (exact, HNSW, IVF-PQ),
`tuning` (build-time recall tuning), `index` (PosterIndex: build, open, search), `duplicates`,
`results` (Hit, DuplicatePair, GenrePredictions). Names are imported on first use, so importing
`clipposter.search.config` loads neither numpy-heavy code nor faiss.
"""
from __future__ import annotations

from clipposter.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "config": ("KINDS", "DEFAULT_THRESHOLD", "DEFAULT_TARGET_RECALL", "DEFAULT_DUPLICATE_THRESHOLD", "INDEX_DIR",
               "resolve_kind"),
    "results": ("Hit", "DuplicatePair", "GenrePredictions"),
    "index": ("PosterIndex", "cache_fingerprint"),
    "duplicates": ("find_duplicates",),
})
