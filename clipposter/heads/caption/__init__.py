"""The caption head: a CLIP poster embedding → a prefix of LM input vectors → a causal LM (ClipCap).

    config     choices, defaults and `DecodingConfig` (no torch: an argument parser may import it)
    lm         loading the language model and tokenizer, offline-aware
    model      the prefix mappers and `CaptionHead` (save_pretrained / from_pretrained, generate)
    train      `TrainConfig`, the training loop with checkpoints and resume, `TrainResult`
    decoding   the decoding strategies and the clean-up of generated text
    evaluation the paper's score beside the chance and constant baselines (`evaluate`)
    tiny_lm    a tiny GPT-2 for machines without real weights

Names are imported from their modules on first use, so `import clipposter.heads.caption` costs
no torch or transformers import.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from clipposter.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "config": ("DEFAULT_LM", "DEFAULT_SENTENCE_MODEL", "DEFAULT_STRATEGY", "MAPPERS", "MODES", "PRESETS",
               "STRATEGIES", "TARGETS", "DecodingConfig", "decoding_preset"),
    "lm": ("load_language_model", "offline", "quiet_transformers"),
    "model": ("Caption", "CaptionHead", "CaptionHeadConfig", "MLPMapper", "TransformerMapper", "read_head_config"),
    "train": ("TrainConfig", "TrainResult", "train_caption_head", "validation_loss"),
    "decoding": ("postprocess", "WordScheduledTopN"),
    "evaluation": ("evaluate", "CaptionReport", "SentenceScorer", "caption_scores", "evaluate_captions", "load_sentence_scorer"),
    "tiny_lm": ("build_tiny_lm",),
})

if TYPE_CHECKING:
    from clipposter.heads.caption.config import (DEFAULT_LM, DEFAULT_SENTENCE_MODEL, DEFAULT_STRATEGY, MAPPERS, MODES,
                                                 PRESETS, STRATEGIES, TARGETS, DecodingConfig, decoding_preset)
    from clipposter.heads.caption.decoding import WordScheduledTopN, postprocess
    from clipposter.heads.caption.evaluation import (CaptionReport, evaluate, SentenceScorer, caption_scores, evaluate_captions,
                                                   load_sentence_scorer)
    from clipposter.heads.caption.lm import load_language_model, offline, quiet_transformers
    from clipposter.heads.caption.model import (Caption, CaptionHead, CaptionHeadConfig, MLPMapper, TransformerMapper,
                                                read_head_config)
    from clipposter.heads.caption.tiny_lm import build_tiny_lm
    from clipposter.heads.caption.train import TrainConfig, TrainResult, train_caption_head, validation_loss
