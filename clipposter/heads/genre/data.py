"""The genre head's data: a genre vocabulary (`parse_genre_spec`), the labelled embeddings of a cache
split by split (`load_genre_data` → `GenreData`), and the genre prompt embeddings the decoder's
queries and the zero-shot baseline start from (`genre_text_embeddings`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from clipposter.embedding.prompts import DEFAULT_TEMPLATES
from clipposter.errors import ClipposterError, ConfigError
from clipposter.records import SPLITS


def parse_genre_spec(spec: str | Sequence[str] | None) -> list[str] | None:
    """A vocabulary from `A,B,C`, a file with one genre per line, "imdb" (the shipped IMDb list), or a list."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        names = [str(s).strip() for s in spec]
    elif spec.strip().lower() == "imdb":
        from clipposter.embedding.prompts import default_genres

        names = default_genres()
    elif os.path.isfile(spec):
        try:
            text = Path(spec).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ClipposterError(f"{spec}: cannot read the genre list ({exc})") from None
        names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    else:
        names = [s.strip() for s in spec.split(",")]
    out: list[str] = []
    seen: set[str] = set()
    for n in names:
        if n and n.lower() not in seen:
            seen.add(n.lower())
            out.append(n)
    if not out:
        raise ConfigError("genres", f"{spec!r} names no genres; give A,B,C, a file with one genre per line, or imdb")
    return out


@dataclass
class GenreSplit:
    ids: list[str]
    embeddings: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N, G) 0/1 int8


@dataclass
class GenreData:
    """Labelled embeddings of a cache, split by split, and what was left out of them."""

    genres: list[str]
    splits: dict[str, GenreSplit]
    unlabelled: dict[str, int]  # posters without any genre label, per split (left out)
    out_of_vocabulary: dict[str, int]  # label → occurrences outside the vocabulary (ignored)
    only_out_of_vocabulary: dict[str, int]  # posters whose labels are all outside the vocabulary (kept, all 0)
    unsplit: int  # records with no train/validation/test split (left out)
    added_from_data: list[str]
    vocabulary_source: str

    def split(self, name: str) -> GenreSplit:
        return self.splits[name]

    @property
    def missing_train_positives(self) -> list[str]:
        y = self.splits["train"].labels
        if y.shape[0] == 0:
            return []
        return [g for g, n in zip(self.genres, y.sum(0)) if n == 0]

    def warnings(self) -> list[str]:
        out = []
        oov = sum(self.out_of_vocabulary.values())
        if oov:
            listed = ", ".join(f"{g} ×{n}" for g, n in sorted(self.out_of_vocabulary.items(), key=lambda kv: -kv[1])[:8])
            more = "" if len(self.out_of_vocabulary) <= 8 else f" and {len(self.out_of_vocabulary) - 8} more"
            out.append(f"{oov} genre labels are outside the head's vocabulary and were ignored ({listed}{more}); "
                       f"add them with genres_from_data=True or list them in genres")
        only = sum(self.only_out_of_vocabulary.values())
        if only:
            out.append(f"{only} posters have only out-of-vocabulary genres; they count as negatives for every genre")
        unl = sum(self.unlabelled.values())
        if unl:
            per = ", ".join(f"{s} {n}" for s, n in self.unlabelled.items() if n)
            out.append(f"{unl} posters have no genre label and were left out ({per})")
        if self.unsplit:
            out.append(f"{self.unsplit} posters have no train/validation/test split and were left out")
        missing = self.missing_train_positives
        if missing:
            out.append(f"no training poster is labelled {', '.join(missing)}: the head can only learn never to "
                       f"predict {'it' if len(missing) == 1 else 'them'}; add examples or leave "
                       f"{'it' if len(missing) == 1 else 'them'} out of genres")
        return out

    def summary(self) -> dict:
        return {
            "genres": self.genres,
            "vocabulary_source": self.vocabulary_source,
            "posters": {s: len(d.ids) for s, d in self.splits.items()},
            "positives": {s: {g: int(n) for g, n in zip(self.genres, d.labels.sum(0))} for s, d in self.splits.items()},
            "unlabelled": self.unlabelled,
            "out_of_vocabulary": self.out_of_vocabulary,
            "only_out_of_vocabulary": self.only_out_of_vocabulary,
            "unsplit": self.unsplit,
            "added_from_data": self.added_from_data,
            "missing_train_positives": self.missing_train_positives,
        }


def load_genre_data(cache, genres: Sequence[str] | None = None, genres_from_data: bool = False) -> GenreData:
    """Labelled embeddings of every split of `cache` over a genre vocabulary.

    Vocabulary: `genres` when given (matched case-insensitively; the vocabulary's spelling wins),
    else the genres that occur in the training split, sorted. `genres_from_data` adds every genre
    found in any split's labels. Labels outside the vocabulary are counted and ignored; posters
    without labels are counted and left out; records without a split are counted and left out.
    """
    records = cache.records()
    by_split: dict[str, list] = {s: [] for s in SPLITS}
    unsplit = 0
    for r in records:
        if r.split in by_split:
            by_split[r.split].append(r)
        else:
            unsplit += 1
    if genres is not None:
        vocab = list(genres)
        source = "given"
    else:
        vocab = sorted({g.strip() for r in by_split["train"] for g in r.genres if g.strip()}, key=str.lower)
        source = "training labels"
    added: list[str] = []
    if genres_from_data:
        have = {g.lower() for g in vocab}
        for g in sorted({g.strip() for r in records for g in r.genres if g.strip()}, key=str.lower):
            if g.lower() not in have:
                have.add(g.lower())
                vocab.append(g)
                added.append(g)
        if genres is not None and added:
            source = "given + data"
    index = {g.lower(): i for i, g in enumerate(vocab)}
    oov: dict[str, int] = {}
    unlabelled = {s: 0 for s in SPLITS}
    only_oov = {s: 0 for s in SPLITS}
    splits: dict[str, GenreSplit] = {}
    for s in SPLITS:
        ids, rows = [], []
        for r in by_split[s]:
            labels = [g.strip() for g in r.genres if g.strip()]
            if not labels:
                unlabelled[s] += 1
                continue
            row = np.zeros(len(vocab), np.int8)
            for g in labels:
                j = index.get(g.lower())
                if j is None:
                    oov[g] = oov.get(g, 0) + 1
                else:
                    row[j] = 1
            if not row.any():
                only_oov[s] += 1
            ids.append(r.id)
            rows.append(row)
        x = cache.embeddings_for_ids(ids) if ids else np.zeros((0, cache.dim), np.float32)
        y = np.stack(rows) if rows else np.zeros((0, len(vocab)), np.int8)
        splits[s] = GenreSplit(ids=ids, embeddings=np.asarray(x, dtype=np.float32), labels=y)
    return GenreData(genres=vocab, splits=splits, unlabelled=unlabelled, out_of_vocabulary=oov,
                     only_out_of_vocabulary=only_oov, unsplit=unsplit, added_from_data=added,
                     vocabulary_source=source)


def genre_text_embeddings(cache, genres: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                          backbone=None, pretrained: str | None = None, device: str = "auto") -> np.ndarray:
    """Prompt embeddings per genre from the cache; prompts it lacks are encoded once with the
    cache's backbone (given, or loaded from the cache's recorded spec) and stored in the cache."""
    from clipposter.embedding.prompts import genre_query_embeddings

    for t in templates:
        if "{genre}" not in t:
            raise ConfigError("templates", f"{t!r} has no {{genre}} placeholder")
    if backbone is None:
        try:
            return genre_query_embeddings(cache, genres, templates)
        except ClipposterError:
            from clipposter.embedding.backbone import load_backbone_like

            if cache.identity is None:
                raise
            backbone = load_backbone_like(cache.identity, cache.backbone_spec, pretrained=pretrained, device=device)
    return genre_query_embeddings(cache, genres, templates, backbone=backbone)


def require_tokens(cache) -> tuple[int, int]:
    """(T, D) of the cache's token sequences, or the one-line error that a `memory="tokens"` head
    gives on a cache without them (a v1 cache, or a sharded one embedded without tokens)."""
    shape = getattr(cache, "token_shape", None)
    if shape is None:
        some = getattr(cache, "has_some_tokens", False)
        raise ConfigError("memory", f"'tokens' needs ViT token sequences, but the cache {cache.root} stores one "
                                    f"pooled embedding per poster{' (and tokens for only some)' if some else ''}; "
                                    f"embed the posters with their token sequences into a new cache "
                                    f"(the embed stage's tokens option), "
                                    f"or train with memory='pooled'")
    return tuple(shape)


def memory_inputs(cache, split: GenreSplit, memory: str = "pooled") -> np.ndarray:
    """What a head with `memory` reads for `split`: its pooled embeddings (N, D), or its token
    sequences (N, T, D) from the cache, kept in the cache's dtype (float16 halves the memory)."""
    if memory != "tokens":
        return split.embeddings
    t, d = require_tokens(cache)
    if not split.ids:
        return np.zeros((0, t, d), np.float32)
    return np.asarray(cache.tokens_for_ids(split.ids))

