"""Builders for the caption tests: a tiny byte-level BPE tokenizer trained on synthetic taglines and
overviews, a tiny GPT-2 (2 layers, width 64) saved with save_pretrained, and an embedding cache of
synthetic posters encoded with the tiny CLIP backbone. Nothing comes from /work/shared or a hub.

Each builder runs once per test session (the results are kept here, keyed by the session's
temporary root), so both caption test files share them without a second build."""
from __future__ import annotations

import contextlib

import torch

from clipposter.cache import EmbeddingCache
from clipposter.embed import embed_records
from clipposter.heads.tiny_lm import build_tiny_lm
from clipposter.records import assign_splits
from clipposter.synthetic import generate_posters

N_POSTERS = 600
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
_built: dict[tuple[str, str], object] = {}


def _once(factory, key: str, build):
    root = str(factory.getbasetemp())
    if (root, key) not in _built:
        with single_thread():
            _built[(root, key)] = build()
    return _built[(root, key)]


@contextlib.contextmanager
def single_thread():
    """One intra-op thread while tiny models run: they gain nothing from more, and on a busy
    2-core machine two spinning OpenMP threads made a tiny training step 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def caption_posters(factory):
    """600 synthetic posters (more than the shared 120), split 70/15/15 so the scored split has
    ~75 posters: metrics on a dozen posters would be too noisy to test against baselines."""
    def build():
        out = factory.mktemp("caption_posters")
        records = generate_posters(out, n=N_POSTERS, seed=11, progress=False)
        return out, assign_splits(records, seed=11, fractions=SPLIT_FRACTIONS, overwrite=True)
    return _once(factory, "posters", build)


def caption_cache(factory, backbone):
    """The posters above embedded with the tiny backbone; its spec records the checkpoint path."""
    def build():
        _, records = caption_posters(factory)
        root = factory.mktemp("caption_cache") / "cache"
        cache = EmbeddingCache.open(root, backbone.identity, backbone_spec=backbone.spec)
        embed_records(records, cache, backbone, batch_size=64, progress=False)
        cache.close()
        return root
    return _once(factory, "cache", build)


def tiny_lm(factory):
    """A tiny LM folder whose tokenizer was trained on the synthetic texts."""
    def build():
        _, records = caption_posters(factory)
        texts = [r.tagline for r in records if r.tagline] + [r.overview for r in records if r.overview]
        return build_tiny_lm(factory.mktemp("tiny_lm"), texts)
    return _once(factory, "lm", build)


TRAIN_SETTINGS = dict(epochs=20, lr=3e-3, batch_size=16, warmup_steps=10)
MAX_TOKENS = 24


def trained_head(factory, backbone):
    """A joint-mode head trained on the synthetic taglines (about 10 s on one CPU core)."""
    def build():
        from clipposter.heads.caption import TrainConfig, train_caption_head

        out = factory.mktemp("caption_head") / "head"
        with EmbeddingCache.open(caption_cache(factory, backbone)) as cache:
            summary = train_caption_head(cache, out, lm=str(tiny_lm(factory)), max_tokens=MAX_TOKENS,
                                         train=TrainConfig(**TRAIN_SETTINGS), progress=False)
        return out, summary
    return _once(factory, "head", build)
