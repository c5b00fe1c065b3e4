"""Search settings that the command line needs to build its parser: engine kinds, default thresholds,
and their checks. Light on purpose (no numpy, no faiss), so `clipposter --help` stays fast."""
from __future__ import annotations

import math
import numbers
import re

from clipposter.errors import ConfigError

KINDS = ("auto", "exact", "hnsw", "ivfpq")
DEFAULT_THRESHOLD = 100_000  # posters: exact below (9 ms/query at 100k × 512 here, ~80 ms at 1M), ivfpq above
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_DUPLICATE_THRESHOLD = 0.95  # cosine at or above which two posters count as near-duplicates
INDEX_DIR = "index"  # the saved index's folder inside the cache

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


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


def parse_memory_budget(value) -> int | None:
    """A memory budget in bytes: a number of bytes or a size such as "2GB", "512MiB", "1.5G" (decimal
    units unless spelled KiB/MiB/GiB); None means no budget."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError("memory_budget", f"must be a size such as 2GB or a number of bytes, got {value!r}")
    if isinstance(value, numbers.Real):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError("memory_budget", f"must be a size such as 2GB, 512MiB or a number of bytes, "
                                               f"got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise ConfigError("memory_budget", f"must be a positive size such as 2GB, got {value!r}")
    return int(size)


def format_bytes(n: float) -> str:
    """Bytes as a short decimal size (the units `parse_memory_budget` reads back)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} TB"
