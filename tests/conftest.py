"""Shared fixtures: a tiny CLIP backbone saved and loaded back through the local-checkpoint path,
and a small synthetic poster set. Everything is built here; nothing is downloaded."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

import lm_fixtures

from clipposter.embedding.backbone import TINY_MODEL, load_backbone, save_tiny_backbone
from clipposter.ingest.synthetic import generate_posters


# CLIPPOSTER_CACHE: where trained offline backbones are kept; the suite's own, never the user's.
_HF_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "CLIPPOSTER_CACHE")
_hf_before: dict[str, str | None] = {}


def pytest_configure(config):
    """The whole suite (and every subprocess it starts) sees an empty Hugging Face cache and no hub:
    what the machine's cache holds (a real gpt2, say) must not change what a test exercises. Set
    before collection, because huggingface_hub reads these once, at import. Tests of the online path
    (test_online.py) run their subprocesses with their own cache and a local stand-in of the hub."""
    home = tempfile.mkdtemp(prefix="clipposter-test-hf-")
    values = {"HF_HOME": home, "HF_HUB_CACHE": os.path.join(home, "hub"), "HF_HUB_OFFLINE": "1",
              "CLIPPOSTER_CACHE": os.path.join(home, "clipposter")}
    for key in _HF_ENV:
        _hf_before[key] = os.environ.get(key)
        os.environ[key] = values[key]
    if "huggingface_hub" in sys.modules:  # imported by a plugin before this hook ran
        from huggingface_hub import constants

        constants.HF_HOME, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = home, values["HF_HUB_CACHE"], True


def pytest_unconfigure(config):
    home = os.environ.get("HF_HOME", "")
    for key, value in _hf_before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if os.path.basename(home).startswith("clipposter-test-hf-"):
        shutil.rmtree(home, ignore_errors=True)


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
    synthetic posters, with the tiny backbone loaded from its checkpoint and a tiny GPT-2; read-only.
    The LM is the tiny one whatever the machine's HF cache holds: the suite's cache is empty (see
    pytest_configure)."""
    from clipposter.pipeline import run_demo

    out = tmp_path_factory.mktemp("demo") / "run"
    with lm_fixtures.single_thread():
        run_demo(out, n=160, seed=5, backbone=tiny_backbone, online=False, progress=False)
    return out
