"""The genre head: an ML-Decoder over cached CLIP embeddings whose queries are genre prompts, its
baselines (zero-shot CLIP, linear probe, constant) and its metrics.

    config     DecoderConfig, TrainConfig (fields only; validate() raises ConfigError naming the field)
    model      MLDecoder, the losses, the linear-probe and zero-shot modules
    head       GenreHead: predict, thresholds, save_pretrained / from_pretrained
    data       parse_genre_spec, load_genre_data → GenreData
    train      fit_decoder, train_genre_head → TrainResult
    evaluation evaluate (also named evaluate_genres) and the evaluation writers
    baselines  fit_linear_probe, zero_shot_head
    metrics    precision / recall / F1, mAP, threshold calibration, the constant baseline

Importing the package is light (the settings only): the names of the other modules are imported
when first used, so `clipposter --help` can read `KINDS` or `LOSSES` without importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from clipposter.heads.genre.config import (BASELINES, KINDS, LOSSES, MEMORY_MODES, THRESHOLD_MODES, DecoderConfig,
                                           TrainConfig, parse_pos_weight)

# name → the module that defines it, imported on first use (PEP 562).
_LAZY = {
    "MLDecoder": "model", "LinearProbe": "model", "ZeroShotClassifier": "model", "genre_loss": "model",
    "build_module": "model",
    "GenreHead": "head", "PosterPrediction": "head", "PredictResult": "head",
    "GenreData": "data", "GenreSplit": "data", "load_genre_data": "data", "parse_genre_spec": "data",
    "genre_text_embeddings": "data",
    "EpochLog": "train", "TrainResult": "train", "fit_decoder": "train", "train_genre_head": "train",
    "evaluate": "evaluation", "evaluate_genres": "evaluation", "format_genre_table": "evaluation",
    "format_genre_per_genre": "evaluation", "write_genre_evaluation": "evaluation",
    "fit_linear_probe": "baselines", "zero_shot_head": "baselines",
}

__all__ = ["BASELINES", "KINDS", "LOSSES", "MEMORY_MODES", "THRESHOLD_MODES", "DecoderConfig", "TrainConfig",
           "parse_pos_weight",
           "MLDecoder", "LinearProbe", "ZeroShotClassifier", "genre_loss", "build_module",
           "GenreHead", "PosterPrediction", "PredictResult",
           "GenreData", "GenreSplit", "load_genre_data", "parse_genre_spec", "genre_text_embeddings",
           "EpochLog", "TrainResult", "fit_decoder", "train_genre_head",
           "evaluate", "evaluate_genres", "format_genre_table", "format_genre_per_genre", "write_genre_evaluation",
           "fit_linear_probe", "zero_shot_head"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
    from clipposter.heads.genre.baselines import fit_linear_probe, zero_shot_head
    from clipposter.heads.genre.data import GenreData, GenreSplit, genre_text_embeddings, load_genre_data, parse_genre_spec
    from clipposter.heads.genre.evaluation import (evaluate, evaluate_genres, format_genre_per_genre, format_genre_table,
                                                 write_genre_evaluation)
    from clipposter.heads.genre.head import GenreHead, PosterPrediction, PredictResult
    from clipposter.heads.genre.model import LinearProbe, MLDecoder, ZeroShotClassifier, build_module, genre_loss
    from clipposter.heads.genre.train import EpochLog, TrainResult, fit_decoder, train_genre_head
