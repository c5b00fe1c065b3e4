"""What a search returns: hits, duplicate pairs, and the genre predictions a search can filter on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from clipposter.errors import ClipposterError


@dataclass
class Hit:
    """One search result: a poster id, its cosine similarity to the query, and what the cache knows."""

    id: str
    score: float
    row: int
    genres: list[str] = field(default_factory=list)
    title: str | None = None
    image: str | None = None
    predicted_genres: list[str] | None = None

    def to_dict(self) -> dict:
        d = {"id": self.id, "score": round(self.score, 6), "row": self.row, "genres": self.genres,
             "title": self.title, "image": self.image}
        if self.predicted_genres is not None:
            d["predicted_genres"] = self.predicted_genres
        return d


class DuplicatePair(NamedTuple):
    id_a: str
    id_b: str
    score: float


@dataclass
class GenrePredictions:
    """Predicted genres per cache row, from any genre model: `probs` (rows, G) aligned with the cache's
    embedding rows, `names` the G genre names; a genre is predicted where its probability ≥ threshold."""

    probs: np.ndarray
    names: Sequence[str]
    threshold: float = 0.5

    def sets(self, rows: int) -> list[frozenset[str]]:
        probs = np.asarray(self.probs)
        if probs.ndim != 2 or probs.shape[1] != len(self.names):
            raise ClipposterError(f"genre predictions must be (rows, {len(self.names)}) for {len(self.names)} "
                                  f"genre names, got shape {probs.shape}")
        if probs.shape[0] != rows:
            raise ClipposterError(f"genre predictions have {probs.shape[0]} rows but the cache has {rows} "
                                  f"posters; predict on the same cache first")
        names = list(self.names)
        return [frozenset(names[j] for j in np.flatnonzero(p >= self.threshold)) for p in probs]
