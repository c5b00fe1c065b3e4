"""The record every source produces and every later stage reads.

A record is one poster and what is known about it. Sources (folder, manifest, Kaggle tables,
synthetic generator) turn their input into records; `embed` turns records into cache rows.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass
class PosterRecord:
    """One poster: where its image is and the labels and texts that go with it."""

    id: str
    image: str | None = None  # local file path; None while only a URL is known
    genres: list[str] = field(default_factory=list)
    tagline: str | None = None
    overview: str | None = None
    split: str | None = None
    title: str | None = None
    url: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PosterRecord":
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in data.items() if k in names})


def clean_text(value) -> str | None:
    """A usable text or None: NaN, None, empty and whitespace-only values become None."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    return text or None


def parse_genres(value) -> list[str]:
    """Genres from `A|B`, `A, B`, a JSON list, or a Python list; order kept, duplicates dropped."""
    if value is None:
        return []
    if isinstance(value, float) and math.isnan(value):
        return []
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = list(value.tolist() if hasattr(value, "tolist") else value)
    else:
        text = str(value).strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                items = [t.strip(" '\"") for t in text.strip("[]").split(",")]
        elif "|" in text:
            items = text.split("|")
        else:
            items = text.split(",")
    out: list[str] = []
    for item in items:
        if item is None or (isinstance(item, float) and math.isnan(item)):
            continue  # a JSON null or a missing list entry: no genre, not one named "None"
        name = str(item).strip()
        if name and name not in out:
            out.append(name)
    return out


def split_for(record_id: str, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split of one id: a function of (seed, id) alone, so adding rows never moves old ones."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return SPLITS[0]
    if u < fractions[0] + fractions[1]:
        return SPLITS[1]
    return SPLITS[2]


def assign_splits(records: Iterable[PosterRecord], seed: int = 0,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS, overwrite: bool = False) -> list[PosterRecord]:
    """Give every record without a split (or every record, with overwrite) its seeded split."""
    out = []
    for rec in records:
        if overwrite or rec.split not in SPLITS:
            rec.split = split_for(rec.id, seed, fractions)
        out.append(rec)
    return out
