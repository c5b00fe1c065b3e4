"""Shared fixtures: a tiny CLIP backbone saved and loaded back through the local-checkpoint path,
and a small synthetic poster set. Everything is built here; nothing is downloaded."""
from __future__ import annotations

import pytest

import lm_fixtures

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


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny models gain nothing from a second thread, and OpenMP threads crawl on a busy machine.
    Modules of tiny-model tests use it with `pytestmark = pytest.mark.usefixtures(...)`."""
    with lm_fixtures.single_thread():
        yield


@pytest.fixture(scope="session")
def caption_cache_dir(tmp_path_factory, tiny_backbone):
    return lm_fixtures.caption_cache(tmp_path_factory, tiny_backbone)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    return lm_fixtures.tiny_lm(tmp_path_factory)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, tiny_backbone):
    """A finished `demo` run folder (run.json, cache, both heads, evaluations, index, report) over 160
    synthetic posters, with the tiny backbone loaded from its checkpoint and a tiny GPT-2; read-only."""
    from clipposter.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "run"
    with lm_fixtures.single_thread():
        run_demo(out, n=160, seed=5, backbone=tiny_backbone, online=False, progress=False)
    return out
