"""Posters in: sources (folders, manifests, the Kaggle tables), downloads, safe image loading, synthetic posters.

The public names below are importable from `clipposter.ingest`; each is loaded from its module on
first use, so importing one light module (say `clipposter.ingest.images`) does not import pandas or
the synthetic-poster renderer.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IMAGE_EXTENSIONS": "images", "DEFAULT_MAX_PIXELS": "images", "content_hash": "images",
    "is_image_path": "images", "load_poster": "images", "read_bytes": "images",
    "MANIFEST_COLUMNS": "sources", "SourceStats": "sources", "from_folder": "sources",
    "from_kaggle": "sources", "from_manifest": "sources", "load_source": "sources", "read_table": "sources",
    "write_manifest": "sources",
    "DownloadReport": "download", "download_posters": "download",
    "SYNTHETIC_GENRES": "synthetic", "generate_posters": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipposter.ingest' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"clipposter.ingest.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
