"""One poster, every job: genres, taglines and nearest neighbours from one embedding.

`PosterAnalyzer` holds what the report and the app both need — the cache, a genre head, a caption
head, the poster index and (loaded on first need) the backbone — and answers for cached posters
(by id) or for poster files, which reuse their cached embedding when the cache has their content
and are encoded with the heads' backbone otherwise. Every head is checked against the cache's
backbone identity when the analyzer opens, so a mismatch is refused before any work.

The models and the cache connection are shared, and sampling seeds torch's global generator, so
calls are serialised with a lock: concurrent callers (the app's worker threads) wait their turn
and get the same answers they would get alone.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from clipposter.errors import ClipposterError
from clipposter.records import PosterRecord
from clipposter.run import read_run


# What a run on random weights can still show; `demo`'s fallback notice ends with the same words.
PIPELINE_CAVEAT = "the scores show that the pipeline works, not how good"


def random_weights_notice(identity, caption_config=None) -> str | None:
    """The warning a report or page needs when the scores come from random weights, or None: read from
    what the cache records of its backbone (`load_backbone` names random weights "random-seed<N>";
    a tag or a checkpoint's hash otherwise) and what the caption head records of its LM's start."""
    random_backbone = str(identity.weights).startswith("random")
    random_lm = bool(getattr(caption_config, "lm_random_init", False))
    parts, judged = [], []
    if random_backbone:
        parts.append(f"the backbone {identity.model} has random weights ({identity.weights})")
        judged.append("CLIP")
    if random_lm:
        parts.append("the caption head's language model started from random weights")
        judged.append("a pretrained language model")
    if not parts:
        return None
    verb = "are" if len(judged) > 1 else "is"
    return f"{' and '.join(parts)}: {PIPELINE_CAVEAT} {' or '.join(judged)} {verb}"


def with_weights_notice(notice: str | None, weights_notice: str | None) -> str | None:
    """A run's own notice (such as `demo`'s fallback, which says why and already carries the caveat)
    and the random-weights one, without saying the same thing twice."""
    if not weights_notice or (notice and PIPELINE_CAVEAT in notice):
        return notice or None
    return f"{notice}; {weights_notice}" if notice else weights_notice


@dataclass
class PosterAnalysis:
    """What clipposter says about one poster, beside what its record says (when it is known)."""

    id: str | None  # the cache's poster id; None for a file the cache does not hold
    image: str | None  # path of the poster image
    title: str | None
    genres: list[str]  # true labels from the record ([] when unknown)
    tagline: str | None  # the record's reference tagline
    probabilities: dict[str, float]  # every genre of the head, in the head's order
    predicted: list[str]  # genres at or above the head's thresholds, most probable first
    taglines: list[str]  # generated candidates, best first
    neighbours: list = field(default_factory=list)  # list[search.Hit], best first
    source: str = "cache"  # "cache" (cached embedding) or "encoded" (encoded now)

    def top(self, n: int | None = None) -> list[tuple[str, float]]:
        ranked = sorted(self.probabilities.items(), key=lambda kv: -kv[1])
        return ranked if n is None else ranked[:n]

    def to_dict(self) -> dict:
        return {"id": self.id, "image": self.image, "title": self.title, "genres": self.genres,
                "tagline": self.tagline, "probabilities": self.probabilities, "predicted": self.predicted,
                "taglines": self.taglines, "neighbours": [h.to_dict() for h in self.neighbours],
                "source": self.source}


class PosterAnalyzer:
    """Genres, taglines and neighbours of posters, from one cache and two trained heads."""

    def __init__(self, cache, genre_head, caption_head, index, *, backbone=None, pretrained: str | None = None,
                 device: str = "auto", run_info: dict | None = None):
        genre_head.check_backbone(cache.identity, f"the cache {cache.root}")
        caption_head.check_backbone(cache.identity, f"the cache {cache.root}")
        if backbone is not None:
            cache.identity.check_same(backbone.identity, f"the cache {cache.root}")
        self.cache = cache
        self.genre_head = genre_head
        self.caption_head = caption_head
        self.index = index
        self.run_info = dict(run_info or {})
        self._backbone = backbone
        self._pretrained = pretrained
        self._device = device
        self._lock = threading.RLock()
        # A genre head that attends over patches reads token sequences: the cache must store them.
        self._genre_tokens = getattr(genre_head, "memory", "pooled") == "tokens"
        if self._genre_tokens:
            from clipposter.heads.genre.data import require_tokens

            require_tokens(cache)
        self._records = {r.id: r for r in cache.records()}

    # ----- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, cache_dir: str | os.PathLike, genre_head_dir: str | os.PathLike,
             caption_head_dir: str | os.PathLike, *, pretrained: str | None = None, device: str = "auto",
             backbone=None, progress: bool = False, run_info: dict | None = None) -> "PosterAnalyzer":
        from clipposter.embedding.backbone import resolve_device
        from clipposter.embedding.cache import EmbeddingCache
        from clipposter.heads.caption.model import CaptionHead
        from clipposter.heads.genre.head import GenreHead
        from clipposter.search.index import PosterIndex

        for what, path in (("cache", cache_dir), ("genre head", genre_head_dir), ("caption head", caption_head_dir)):
            if not Path(path).is_dir():
                raise ClipposterError(f"{path}: no such {what} folder")
        cache = EmbeddingCache.open(cache_dir, mode="r")
        try:
            genre_head = GenreHead.from_pretrained(genre_head_dir, identity=cache.identity)
            caption_head = CaptionHead.load(caption_head_dir, device=str(resolve_device(device)))
            index = PosterIndex.open(cache, progress=progress)
            return cls(cache, genre_head, caption_head, index, backbone=backbone, pretrained=pretrained,
                       device=device, run_info=run_info)
        except BaseException:
            cache.close()
            raise

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, **kw) -> "PosterAnalyzer":
        """The analyzer of a run folder written by `clipposter demo` (its run.json names the parts)."""
        info = read_run(run_dir)
        return cls.open(info["cache"], info["genre_head"], info["caption_head"], run_info=info, **kw)

    def close(self) -> None:
        self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----- what it knows -------------------------------------------------------------------------
    @property
    def genres(self) -> list[str]:
        return list(self.genre_head.genres)

    @property
    def notice(self) -> str | None:
        """The warning to show above anything made from this analyzer: the run's own notice, and the
        one random weights in the backbone or the caption head's LM call for."""
        weights = random_weights_notice(self.cache.identity, getattr(self.caption_head, "config", None))
        return with_weights_notice(self.run_info.get("notice"), weights)

    @property
    def strategies(self) -> tuple[str, ...]:
        from clipposter.heads.caption.decoding import DEFAULT_STRATEGY, STRATEGIES

        return (DEFAULT_STRATEGY,) + tuple(s for s in STRATEGIES if s != DEFAULT_STRATEGY)

    @property
    def backbone(self):
        """The cache's backbone, loaded on first need (text queries, posters the cache lacks)."""
        with self._lock:
            if self._backbone is None:
                from clipposter.embedding.backbone import load_backbone_like

                self._backbone = load_backbone_like(self.cache.identity, self.cache.backbone_spec,
                                                    pretrained=self._pretrained, device=self._device)
            return self._backbone

    def record(self, poster_id: str) -> PosterRecord:
        try:
            return self._records[poster_id]
        except KeyError:
            raise ClipposterError(f"poster id {poster_id!r} is not in the cache {self.cache.root}") from None

    def sample_ids(self, n: int, split: str | None = None, seed: int = 0) -> list[str]:
        """Up to n poster ids (of one split when it has any), spread over the collection, reproducible."""
        ids = sorted(i for i, r in self._records.items() if split is None or r.split == split)
        if not ids:
            ids = sorted(self._records)
        if n >= len(ids):
            return ids
        rng = np.random.default_rng(seed)
        return [ids[i] for i in sorted(rng.choice(len(ids), size=n, replace=False))]

    # ----- analysis ------------------------------------------------------------------------------
    def analyze_ids(self, ids: Sequence[str], *, strategy: str = "lstm", num_return: int = 1, k: int = 5,
                    seed: int = 0, threshold: str | float | None = None) -> list[PosterAnalysis]:
        """Analyses of cached posters (their neighbours leave out the poster itself)."""
        ids = list(ids)
        for i in ids:
            self.record(i)
        with self._lock:
            vectors = self.cache.embeddings_for_ids(ids)
            genre_inputs = self.cache.tokens_for_ids(ids) if self._genre_tokens else vectors
            return self._analyze(vectors, [[i] for i in ids], [self._records[i] for i in ids],
                                 [self._records[i].image for i in ids], ["cache"] * len(ids),
                                 strategy=strategy, num_return=num_return, k=k, seed=seed, threshold=threshold,
                                 genre_inputs=genre_inputs)

    def analyze_files(self, paths: Sequence[str | os.PathLike], *, strategy: str = "lstm", num_return: int = 1,
                      k: int = 5, seed: int = 0, threshold: str | float | None = None) -> list[PosterAnalysis]:
        """Analyses of poster files. A file whose content is cached uses its cached embedding and takes
        the cached record's labels; any other file is decoded safely and encoded now (the backbone is
        loaded only then). Each file is read and hashed once. An unusable file (missing, empty, not an
        image, too many pixels, corrupt) raises one ClipposterError line naming it."""
        from clipposter.embedding.embed import resolve_posters

        paths = [str(p) for p in paths]
        with self._lock:
            resolved = resolve_posters(paths, cache=self.cache, backbone=lambda: self.backbone,
                                       tokens=self._genre_tokens)
            for poster, reason in resolved.failed:
                raise ClipposterError(f"{poster}: {reason}; upload a JPEG, PNG or WebP poster")
            # ids sharing each file's content: its neighbours leave them out, and it takes their record
            same = [self.index.ids_at(p.row) if p.row is not None else [] for p in resolved]
            records = [self._records.get(s[0]) if s else None for s in same]
            return self._analyze(resolved.embeddings(), same, records, paths, [p.source for p in resolved],
                                 strategy=strategy, num_return=num_return, k=k, seed=seed, threshold=threshold,
                                 genre_inputs=resolved.token_sequences() if self._genre_tokens else None)

    def search_text(self, text: str, k: int = 8, **filters) -> list:
        """Posters that best match a free text, through the backbone's CLIP text encoder."""
        with self._lock:
            return self.index.search_text([text], k, backbone=self.backbone, **filters)[0]

    def _analyze(self, vectors: np.ndarray, exclude: list[list[str]], records: list[PosterRecord | None],
                 images: list[str | None], sources: list[str], *, strategy: str, num_return: int, k: int,
                 seed: int, threshold, genre_inputs: np.ndarray | None = None) -> list[PosterAnalysis]:
        """`genre_inputs`: what the genre head reads (token sequences for a token-memory head); None: `vectors`."""
        from clipposter.heads.caption.decoding import decoding_preset

        if not len(vectors):
            return []
        if k < 0:
            raise ClipposterError(f"k must be zero or more, got {k}")
        decoding = decoding_preset(strategy, num_return=num_return, seed=seed)
        probs = self.genre_head.predict_proba(vectors if genre_inputs is None else genre_inputs)
        named = self.genre_head.describe_predictions([str(i) for i in images], probs, sources, threshold)
        captions = self.caption_head.generate(vectors, decoding)
        hits = self.index.search(vectors, k, exclude=exclude) if k else [[] for _ in range(len(vectors))]
        out = []
        for rec, image, pred, caps, nn, src in zip(records, images, named, captions, hits, sources):
            out.append(PosterAnalysis(
                id=rec.id if rec else None, image=image if image is not None else (rec.image if rec else None),
                title=rec.title if rec else None, genres=list(rec.genres) if rec else [],
                tagline=rec.tagline if rec else None,
                probabilities={g: float(v) for g, v in pred.probabilities.items()}, predicted=pred.predicted,
                taglines=[c.text for c in caps], neighbours=nn, source=src))
        return out
