"""The encode stage: the frozen backbone, genre prompts, the embedding cache and the encoders.

    from clipposter.embedding import EmbeddingCache, load_backbone, embed_records, resolve_posters

Names are imported on first use, so `import clipposter.embedding.prompts` (which the command line
needs to build its parser) does not load torch or open_clip.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "clipposter.embedding.backbone": ("Backbone", "BackboneIdentity", "TINY_MODEL", "load_backbone",
                                      "load_backbone_like", "resolve_device", "save_tiny_backbone"),
    "clipposter.embedding.cache": ("EmbeddingCache", "CacheInfo", "RecordSummary", "text_hash"),
    "clipposter.embedding.embed": ("EmbedSummary", "ResolvedPoster", "ResolvedPosters", "embed_records",
                                   "embed_texts", "make_loader", "reference_and_prompt_texts", "resolve_posters"),
    "clipposter.embedding.prompts": ("DEFAULT_TEMPLATES", "default_genres", "genre_query_embeddings",
                                     "prompt_texts"),
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
