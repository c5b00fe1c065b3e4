"""Heads trained on the embedding cache. `genre`: the ML-Decoder genre head and its baselines."""
from __future__ import annotations

from clipposter.heads.genre.head import (DecoderConfig, GenreData, GenreHead, MLDecoder, PosterPrediction, TrainOptions, TrainResult,
                    evaluate_genres, genre_loss, load_genre_data, parse_genre_spec, train_genre_head)

__all__ = ["DecoderConfig", "GenreData", "GenreHead", "MLDecoder", "PosterPrediction", "TrainOptions", "TrainResult",
           "evaluate_genres", "genre_loss", "load_genre_data", "parse_genre_spec", "train_genre_head"]
