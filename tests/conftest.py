"""Shared fixtures: a tiny CLIP backbone saved and loaded back through the local-checkpoint path,
and a small synthetic poster set. Everything is built here; nothing is downloaded."""
from __future__ import annotations

import pytest

from clipposter.backbone import TINY_MODEL, load_backbone, save_tiny_backbone
from clipposter.synthetic import generate_posters


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_checkpoint):
    return load_backbone(TINY_MODEL, str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    """120 synthetic posters with a manifest; treat as read-only (copy before changing)."""
    out = tmp_path_factory.mktemp("synthetic")
    records = generate_posters(out, n=120, seed=3)
    return out, records
