"""The encode stage: the frozen backbone, genre prompts, the embedding cache and the encoders.

    from clipposter.embedding import EmbeddingCache, load_backbone, embed_records, resolve_posters

Names are imported on first use, so `import clipposter.embedding.prompts` (which the command line
needs to build its parser) does not load torch or open_clip.
"""
from __future__ import annotations

from clipposter.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "identity": ("BackboneIdentity",),
    "backbone": ("Backbone", "TINY_MODEL", "load_backbone", "load_backbone_like", "register_model_configs",
                 "resolve_device", "save_tiny_backbone"),
    "contrastive": ("ContrastiveConfig", "SyntheticBackbone", "TrainedBackbone", "backbone_cache_root",
                    "contrastive_loss", "load_trained_backbone", "synthetic_backbone", "train_backbone"),
    "cache": ("EmbeddingCache", "CacheInfo", "RecordSummary", "text_hash"),
    "embed": ("EmbedSummary", "ResolvedPoster", "ResolvedPosters", "embed_records", "embed_texts", "make_loader",
              "reference_and_prompt_texts", "resolve_posters"),
    "prompts": ("DEFAULT_TEMPLATES", "default_genres", "genre_query_embeddings", "prompt_texts"),
})
