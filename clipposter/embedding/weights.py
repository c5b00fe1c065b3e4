"""Which weights a backbone choice names, found without loading it: light (no torch), so that a
command can refuse a choice that does not match a cache, or find that it has no model work to do,
before paying for torch and the weights."""
from __future__ import annotations

import hashlib
import os

from clipposter.embedding.identity import RANDOM_WEIGHTS, BackboneIdentity
from clipposter.errors import ClipposterError

RANDOM_SEED = 0


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_of(model_name: str, pretrained: str | None) -> str:
    """The `weights` a backbone loaded with these arguments has in its identity: the pretrained tag,
    "sha256:<hex>" of a local checkpoint file, "hf-hub" for hub models, or the seeded random weights'
    name."""
    if model_name.startswith("hf-hub:"):
        return "hf-hub"
    if pretrained and os.path.isfile(pretrained):
        return "sha256:" + file_sha256(pretrained)
    return pretrained or f"{RANDOM_WEIGHTS}{RANDOM_SEED}"


def check_choice(identity: BackboneIdentity, model_name: str, pretrained: str | None, what: str) -> None:
    """Refuse, before loading any weights, a backbone (`model_name`, `pretrained`) that is not the one
    `what` (a cache, a head) was made with. A choice that passes is still checked once loaded."""
    weights = weights_of(model_name, pretrained)
    if model_name != identity.model or weights != identity.weights:
        raise ClipposterError(
            f"{what} was made with backbone {identity.describe()} but the backbone asked for is "
            f"{model_name} ({weights}); use the same `backbone` and `pretrained` or a separate cache directory")
