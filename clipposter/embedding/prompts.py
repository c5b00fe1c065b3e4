"""Genre prompts: genres are defined by text, so the genre head's queries are CLIP text embeddings."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_TEMPLATES = (
    "This is an image of a {genre} movie poster",
    "a poster of a {genre} movie",
    "a {genre} film poster",
)


def default_genres() -> list[str]:
    """The IMDb genre vocabulary shipped with the package."""
    path = Path(__file__).parents[1] / "data" / "genres.txt"
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def prompt_texts(genres: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    return [t.format(genre=g) for g in genres for t in templates]


def genre_query_embeddings(cache, genres: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                           backbone=None) -> np.ndarray:
    """One unit vector per genre: the mean of its template embeddings, renormalised (as CLIP's
    zero-shot classifiers do). Read from the cache; missing prompts are encoded with `backbone`."""
    emb = cache.text_embeddings(prompt_texts(genres, templates), backbone=backbone)
    emb = emb.reshape(len(genres), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
