"""What both cache formats share: the stored dtypes, the text key, and the summaries a cache returns.
Light (numpy only), so the v1 store (cache.py) and the sharded v2 store (shards.py) use one copy."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

DTYPES = {"float16": np.float16, "float32": np.float32}
MODES = ("r", "a")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class CacheInfo:
    path: str
    backbone: dict
    dtype: str
    dim: int
    posters: int
    records: int
    texts: int
    splits: dict
    bytes_on_disk: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class RecordSummary(NamedTuple):
    """What a search result shows of a poster record: its labelled genres, title and image path."""

    genres: list[str]
    title: str | None
    image: str | None
