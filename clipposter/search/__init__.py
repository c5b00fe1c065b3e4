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

import importlib

_EXPORTS = {
    "clipposter.search.config": ("KINDS", "DEFAULT_THRESHOLD", "DEFAULT_TARGET_RECALL", "DEFAULT_DUPLICATE_THRESHOLD",
                                 "INDEX_DIR", "resolve_kind"),
    "clipposter.search.results": ("Hit", "DuplicatePair", "GenrePredictions"),
    "clipposter.search.index": ("PosterIndex", "cache_fingerprint"),
    "clipposter.search.duplicates": ("find_duplicates",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
