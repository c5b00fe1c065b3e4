"""What a source reader saw (`SourceStats`) and the accepted spellings of the split names.

Shared by the readers of clipposter.ingest.sources and clipposter.ingest.webdataset, and importable
from either of them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

# Accepted spellings of the three split names, compared after strip().lower().
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "validation", "valid": "validation", "validation": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}


@dataclass
class SourceStats:
    """What a reader saw: rows read, rows dropped and why. Readers add to it, never reset it.

    `notes` say what was decided for the user (a CSV's encoding, the counts of the Kaggle join),
    `warnings` name things left out one by one (the first MAX_WARNINGS, then how many more), and
    `join` holds the Kaggle join's counts: join, labelled, with_metadata, kept.
    """

    MAX_WARNINGS: ClassVar[int] = 10

    rows_read: int = 0
    rows_skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    join: dict[str, Any] | None = None
    _more: int = field(default=0, init=False, repr=False)

    def skip(self, reason: str, count: int = 1) -> None:
        if count <= 0:
            return
        self.rows_skipped += count
        self.reasons[reason] = self.reasons.get(reason, 0) + count

    def warn(self, line: str) -> None:
        if len(self.warnings) < self.MAX_WARNINGS:
            self.warnings.append(line)
            return
        self._more += 1
        del self.warnings[self.MAX_WARNINGS:]
        self.warnings.append(f"and {self._more} more")

    def summary(self) -> str:
        """One line for the CLI, e.g. `read 12 rows, skipped 2 (duplicate imdbId: 2)`."""
        line = f"read {self.rows_read} rows, skipped {self.rows_skipped}"
        if self.reasons:
            line += " (" + ", ".join(f"{r}: {n}" for r, n in sorted(self.reasons.items())) + ")"
        return line

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}
