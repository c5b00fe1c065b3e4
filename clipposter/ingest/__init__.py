"""Posters in: sources (folders, manifests, the Kaggle tables), downloads, safe image loading, synthetic posters.

The public names below are importable from `clipposter.ingest`; each is loaded from its module on
first use, so importing one light module (say `clipposter.ingest.images`) does not import pandas or
the synthetic-poster renderer.
"""
from __future__ import annotations

from clipposter.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "images": ("IMAGE_EXTENSIONS", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "content_hash", "is_image_path",
               "load_poster", "read_bytes"),
    "manifest": ("read_table",),
    "sources": ("MANIFEST_COLUMNS", "SourceStats", "from_folder", "from_kaggle", "from_manifest", "load_source",
                "require_local_images", "write_manifest"),
    "download": ("DownloadReport", "download_posters"),
    "synthetic": ("SYNTHETIC_GENRES", "generate_posters"),
})
