"""Caches of format 1 for the tests that check v1 caches stay readable and migrate: built with the v1
writer kept for that purpose, from a sharded cache that `clipposter embed` made."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipposter.embedding.cache import EmbeddingCache


class _StoredTexts:
    """Gives back the stored embeddings of texts, as a backbone of the cache's identity would."""

    def __init__(self, identity, vectors: dict[str, np.ndarray]):
        self.identity, self._vectors = identity, vectors

    def encode_texts(self, texts, batch_size: int = 256) -> np.ndarray:
        return np.stack([self._vectors[t] for t in texts])


def v1_copy(src: Path, dst: Path) -> Path:
    """Write the posters, records and texts of the cache in `src` as a v1 cache in `dst`, same row order."""
    with EmbeddingCache.open(src, mode="r") as v2:
        hashes, matrix = v2.poster_hashes(), np.asarray(v2.image_matrix())
        records = v2.records_with_hashes()
        texts = [t for _, t in v2.text_items()]
        vectors = dict(zip(texts, np.asarray(v2.text_matrix())))
        with EmbeddingCache.open_v1(dst, v2.identity, v2.dtype, v2.backbone_spec) as v1:
            v1.add_posters(hashes, matrix, records)
            v1.text_embeddings(texts, _StoredTexts(v2.identity, vectors))
    return dst
