"""The genre head: an ML-Decoder over cached CLIP embeddings whose queries are genre prompts, its
baselines (zero-shot CLIP, linear probe, constant) and its metrics.

    config     DecoderConfig, TrainConfig (fields only; validate() raises ConfigError naming the field),
               small_data_settings (the small-data rule)
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

from typing import TYPE_CHECKING

from clipposter.heads.genre.config import (BASELINES, KINDS, LOSSES, MEMORY_MODES, SMALL_DATA_POSTERS, THRESHOLD_MODES,
                                           DecoderConfig, TrainConfig, parse_pos_weight, small_data_settings)
from clipposter.lazy import lazy_exports

_LIGHT = ["BASELINES", "KINDS", "LOSSES", "MEMORY_MODES", "SMALL_DATA_POSTERS", "THRESHOLD_MODES", "DecoderConfig",
          "TrainConfig", "parse_pos_weight", "small_data_settings"]
_lazy, __getattr__, __dir__ = lazy_exports(__name__, {
    "model": ("MLDecoder", "LinearProbe", "ZeroShotClassifier", "genre_loss", "build_module"),
    "head": ("GenreHead", "PosterPrediction", "PredictResult"),
    "data": ("GenreData", "GenreSplit", "load_genre_data", "parse_genre_spec", "genre_text_embeddings"),
    "train": ("EpochLog", "TrainResult", "fit_decoder", "train_genre_head"),
    "evaluation": ("evaluate", "evaluate_genres", "format_genre_table", "format_genre_per_genre",
                   "write_genre_evaluation"),
    "baselines": ("fit_linear_probe", "zero_shot_head"),
})
__all__ = sorted(_LIGHT + _lazy)

if TYPE_CHECKING:
    from clipposter.heads.genre.baselines import fit_linear_probe, zero_shot_head
    from clipposter.heads.genre.data import GenreData, GenreSplit, genre_text_embeddings, load_genre_data, parse_genre_spec
    from clipposter.heads.genre.evaluation import (evaluate, evaluate_genres, format_genre_per_genre, format_genre_table,
                                                 write_genre_evaluation)
    from clipposter.heads.genre.head import GenreHead, PosterPrediction, PredictResult
    from clipposter.heads.genre.model import LinearProbe, MLDecoder, ZeroShotClassifier, build_module, genre_loss
    from clipposter.heads.genre.train import EpochLog, TrainResult, fit_decoder, train_genre_head
