"""Search settings that the command line needs to build its parser: engine kinds, default thresholds,
and their checks. Light on purpose (no numpy, no faiss), so `clipposter --help` stays fast."""
from __future__ import annotations

import math
import numbers

from clipposter.errors import ConfigError

KINDS = ("auto", "exact", "hnsw", "ivfpq")
DEFAULT_THRESHOLD = 100_000  # posters: exact below (9 ms/query at 100k × 512 here, ~80 ms at 1M), ivfpq above
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_DUPLICATE_THRESHOLD = 0.95  # cosine at or above which two posters count as near-duplicates
INDEX_DIR = "index"  # the saved index's folder inside the cache


def check_threshold(threshold: int) -> int:
    """The exact-search threshold: a non-negative number of posters."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Integral) or threshold < 0:
        raise ConfigError("threshold", f"must be a non-negative number of posters (below it search is exact), "
                                       f"got {threshold!r}")
    return int(threshold)


def check_target_recall(target_recall: float) -> float:
    if (isinstance(target_recall, bool) or not isinstance(target_recall, numbers.Real)
            or not 0 < target_recall <= 1):
        raise ConfigError("target_recall", f"must be in (0, 1], got {target_recall!r}")
    return float(target_recall)


def check_cosine(name: str, value: float) -> float:
    """A cosine-similarity threshold in (0, 1]."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not 0 < value <= 1):
        raise ConfigError(name, f"must be a cosine similarity in (0, 1], got {value!r}")
    return float(value)


def resolve_kind(kind: str, posters: int, threshold: int = DEFAULT_THRESHOLD) -> str:
    """The engine `kind` means for a collection of this size ("auto": exact below the threshold)."""
    if kind not in KINDS:
        raise ConfigError("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind != "auto":
        return kind
    return "exact" if posters < check_threshold(threshold) else "ivfpq"
