"""Caches and heads on random weights and on loaded ones, for the tests of the notice a report or the
app shows when a run's scores cannot say how good CLIP or a language model is.

Two caches of the same synthetic posters: one embedded with `--pretrained random` (the tiny
architecture with seeded random weights), one with the tiny backbone loaded from its checkpoint file.
Each gets a zero-shot genre head (no training) and untrained caption heads on two language models:
the tiny GPT-2 as `build_tiny_lm` makes it (randomly initialised, and its config says so) and a copy
whose config does not say so, which stands for any LM folder of trained weights (a gpt2 download).
Each part is built once per test session."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from clipposter.embedding.backbone import TINY_MODEL, load_backbone
from clipposter.embedding.cache import EmbeddingCache
from clipposter.embedding.embed import embed_records, embed_texts, reference_and_prompt_texts
from clipposter.records import PosterRecord, assign_splits

import lm_fixtures

RANDOM_INIT_KEY = "clipposter_random_init"  # what build_tiny_lm writes into the LM's config.json
N_POSTERS = 40
_built: dict[tuple[str, str], Path] = {}


def _once(factory, key: str, build) -> Path:
    root = str(factory.getbasetemp())
    if (root, key) not in _built:
        with lm_fixtures.single_thread():
            _built[(root, key)] = build()
    return _built[(root, key)]


def language_model(factory, records, lm: str) -> Path:
    """"random": a tiny GPT-2 as `build_tiny_lm` makes it; "loaded": the same without the record of
    its random start in config.json, as the heads see any folder of trained weights."""
    from clipposter.heads.caption.tiny_lm import build_tiny_lm

    def build_random():
        texts = [t for r in records for t in (r.tagline, r.overview) if t]
        return build_tiny_lm(factory.mktemp("weights_lm") / "lm", texts)

    def build_loaded():
        out = factory.mktemp("weights_loaded_lm") / "lm"
        shutil.copytree(language_model(factory, records, "random"), out)
        config = json.loads((out / "config.json").read_text())
        assert config.pop(RANDOM_INIT_KEY) is True, "build_tiny_lm no longer records the LM's random start"
        (out / "config.json").write_text(json.dumps(config))
        return out

    return _once(factory, f"lm-{lm}", build_random if lm == "random" else build_loaded)


def weights_run(factory, synthetic_set, checkpoint_backbone, backbone: str, lm: str) -> dict[str, Path]:
    """{"cache", "genre_head", "caption_head"} folders: backbone "random" (`--pretrained random`) or
    "checkpoint" (the tests' tiny checkpoint file); lm "random" or "loaded" (`language_model`)."""
    from clipposter.heads.caption.model import CaptionHead
    from clipposter.heads.genre import train_genre_head

    records = assign_splits([PosterRecord.from_dict(r.to_dict()) for r in synthetic_set[1][:N_POSTERS]], seed=0,
                            fractions=(0.6, 0.2, 0.2), overwrite=True)

    def build_cache():
        model = load_backbone(TINY_MODEL, None, device="cpu") if backbone == "random" else checkpoint_backbone
        root = factory.mktemp(f"weights_{backbone}")
        with EmbeddingCache.open(root / "cache", model.identity, backbone_spec=model.spec) as cache:
            embed_records(records, cache, model, progress=False)
            embed_texts(cache, model, reference_and_prompt_texts(records))
            head = train_genre_head(cache, kind="zero-shot", backbone=model, progress=False).head
        head.save_pretrained(root / "genres")
        return root

    root = _once(factory, f"cache-{backbone}", build_cache)

    def build_caption_head():
        with EmbeddingCache.open(root / "cache") as cache:
            head = CaptionHead.create(cache.identity, lm=str(language_model(factory, records, lm)),
                                      backbone_spec=cache.backbone_spec, max_tokens=lm_fixtures.MAX_TOKENS)
        return head.save_pretrained(root / f"taglines-{lm}-lm")

    caption_head = _once(factory, f"caption-{backbone}-{lm}", build_caption_head)
    return {"cache": root / "cache", "genre_head": root / "genres", "caption_head": caption_head}
