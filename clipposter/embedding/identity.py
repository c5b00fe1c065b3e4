"""A backbone's identity: what makes two embeddings comparable. Light (no torch), so that opening a
cache to read it, or `clipposter cache info`, loads no model code."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from clipposter.errors import ClipposterError

# The weights of a backbone built with seeded random weights (`pretrained` None or "random") start so.
RANDOM_WEIGHTS = "random-seed"


@dataclass(frozen=True)
class BackboneIdentity:
    """What makes two embeddings comparable: same architecture, same weights, same preprocessing."""

    model: str
    weights: str  # pretrained tag, "sha256:<hex>" of a local checkpoint, or "hf-hub" for hub models
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    resize_mode: str
    embed_dim: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BackboneIdentity":
        d = dict(data)
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        return cls(**d)

    @property
    def key(self) -> str:
        """A short stable hash of the identity, used to name and check caches and heads."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def is_random(self) -> bool:
        """Seeded random weights: embeddings that show the pipeline works, not what CLIP can do."""
        return self.weights.startswith(RANDOM_WEIGHTS)

    def describe(self) -> str:
        return f"{self.model} ({self.weights}, {self.image_size}px, dim {self.embed_dim})"

    def check_same(self, other: "BackboneIdentity", what: str) -> None:
        """Refuse to mix embeddings from different backbones, naming both."""
        if self.key != other.key:
            raise ClipposterError(
                f"{what} was made with backbone {other.describe()} but the backbone in use is "
                f"{self.describe()}; use the same `backbone` and `pretrained` or a separate cache directory"
            )
