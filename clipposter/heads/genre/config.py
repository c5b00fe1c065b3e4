"""Settings of the genre head: its architecture (`DecoderConfig`) and how it is trained (`TrainConfig`).

Fields only, plus `validate()`, which raises `ConfigError` naming the parameter. No torch here: the
CLI reads the choices below (`KINDS`, `LOSSES`, ...) while it builds its parser.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Mapping

from clipposter.errors import ConfigError

KINDS = ("ml-decoder", "linear-probe", "zero-shot")
LOSSES = ("bce", "focal", "asl")
MEMORY_MODES = ("pooled", "tokens")
THRESHOLD_MODES = ("per-genre", "global")
BASELINES = ("zero-shot", "linear-probe", "constant")


def _check(checks) -> None:
    for ok, field, problem in checks:
        if not ok:
            raise ConfigError(field, problem)


@dataclass
class DecoderConfig:
    """Architecture of the ML-Decoder head (what is needed to rebuild it before loading weights)."""

    embed_dim: int
    num_genres: int
    text_dim: int | None = None  # width of the genre text embeddings; default embed_dim
    width: int = 768  # decoder width (the seed paper's best)
    mlp_hidden: int = 512
    num_layers: int = 1
    num_heads: int = 8
    dropout: float = 0.7  # the seed paper's best (0.1 → 0.7)
    num_groups: int | None = None  # group decoding; None → one query per genre
    self_attention: bool = False  # ML-Decoder drops it: its queries do not depend on the input
    memory: str = "pooled"  # "pooled" (one embedding per poster) or "tokens" (ViT token sequence)

    def __post_init__(self) -> None:
        if self.text_dim is None:
            self.text_dim = self.embed_dim
        if self.num_groups is None:
            self.num_groups = self.num_genres

    def validate(self) -> None:
        _check([
            (self.num_genres >= 1, "num_genres", f"must be at least 1 (the head needs a genre), got {self.num_genres}"),
            (self.width >= 1, "width", f"must be positive, got {self.width}"),
            (self.mlp_hidden >= 1, "mlp_hidden", f"must be positive, got {self.mlp_hidden}"),
            (self.num_layers >= 1, "num_layers", f"must be at least 1, got {self.num_layers}"),
            (self.num_heads >= 1 and self.width % self.num_heads == 0, "num_heads",
             f"must divide width ({self.width}), got {self.num_heads}"),
            (0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}"),
            (1 <= self.num_groups <= self.num_genres, "num_groups",
             f"must be between 1 and the number of genres ({self.num_genres}), got {self.num_groups}"),
            (self.memory in MEMORY_MODES, "memory", f"must be one of {', '.join(MEMORY_MODES)}, got {self.memory!r}"),
        ])

    @property
    def genres_per_group(self) -> int:
        return math.ceil(self.num_genres / self.num_groups)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "DecoderConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class TrainConfig:
    """How a head is trained (recorded in config.json)."""

    loss: str = "bce"
    pos_weight: str | float = "none"  # "none", "auto" (negatives/positives per genre, clipped) or a number
    focal_gamma: float = 2.0
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05
    lr: float = 1e-4
    batch_size: int = 256
    epochs: int = 10
    patience: int = 3  # early stopping: epochs without a better validation loss
    lr_patience: int = 1  # epochs without a better validation loss before the lr is halved
    lr_factor: float = 0.5
    weight_decay: float = 0.0
    seed: int = 0
    threshold_mode: str = "per-genre"
    probe_c: float = 1.0  # inverse L2 strength of the linear probe (scikit-learn's C)

    def validate(self) -> None:
        _check([
            (self.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (self.lr > 0, "lr", f"must be positive, got {self.lr}"),
            (self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}"),
            (self.epochs >= 1, "epochs", f"must be at least 1, got {self.epochs}"),
            (self.patience >= 1, "patience", f"must be at least 1, got {self.patience}"),
            (self.lr_patience >= 0, "lr_patience", f"must be at least 0, got {self.lr_patience}"),
            (0 < self.lr_factor < 1, "lr_factor", f"must be in (0, 1), got {self.lr_factor}"),
            (self.focal_gamma >= 0, "focal_gamma", f"must be non-negative, got {self.focal_gamma}"),
            (self.asl_gamma_neg >= 0, "asl_gamma_neg", f"must be non-negative, got {self.asl_gamma_neg}"),
            (self.asl_gamma_pos >= 0, "asl_gamma_pos", f"must be non-negative, got {self.asl_gamma_pos}"),
            (0 <= self.asl_clip < 1, "asl_clip", f"must be in [0, 1), got {self.asl_clip}"),
            (self.threshold_mode in THRESHOLD_MODES, "threshold_mode",
             f"must be one of {', '.join(THRESHOLD_MODES)}, got {self.threshold_mode!r}"),
            (self.probe_c > 0, "probe_c", f"must be positive, got {self.probe_c}"),
        ])
        parse_pos_weight(self.pos_weight)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# The small-data rule. The defaults above are the seed paper's, for ~35K posters; on a few hundred
# they stop at epoch 1 with a head that has barely moved. Below SMALL_DATA_POSTERS labelled training
# posters an ML-Decoder trains with a small decoder, a larger learning rate and more, smaller steps
# (docs/genres.md has the measurements). Settings given explicitly win, one by one.
SMALL_DATA_POSTERS = 5_000
SMALL_DATA_ARCHITECTURE = {"width": 64, "mlp_hidden": 64, "num_heads": 4, "dropout": 0.3}
SMALL_DATA_OPTIONS = {"lr": 1e-3, "epochs": 40, "batch_size": 32, "patience": 5}


def small_data_settings(train_posters: int, small_data: bool | str = "auto") -> dict | None:
    """The small-data settings for `train_posters` labelled training posters, or None where the rule
    does not apply: {"train_posters", "limit", "architecture", "options"}.

    small_data: "auto" (below SMALL_DATA_POSTERS), True (always) or False (never).
    """
    if isinstance(small_data, str) and small_data.lower() == "auto":
        applies = train_posters < SMALL_DATA_POSTERS
    elif isinstance(small_data, bool):
        applies = small_data
    else:
        raise ConfigError("small_data", f"must be auto, True or False, got {small_data!r}")
    if not applies:
        return None
    return {"train_posters": int(train_posters), "limit": SMALL_DATA_POSTERS,
            "architecture": dict(SMALL_DATA_ARCHITECTURE), "options": dict(SMALL_DATA_OPTIONS)}


def train_config(options: "TrainConfig | Mapping | None", defaults: Mapping | None = None) -> TrainConfig:
    """A validated TrainConfig: `options` itself, or its fields (a mapping) over `defaults` over the
    TrainConfig defaults."""
    if isinstance(options, TrainConfig):
        options.validate()
        return options
    given = dict(options or {})
    names = {f.name for f in fields(TrainConfig)}
    for name in given:
        if name not in names:
            raise ConfigError(name, f"is not a training option (those are {', '.join(sorted(names))})")
    config = TrainConfig(**{**dict(defaults or {}), **given})
    config.validate()
    return config


def parse_pos_weight(value: str | float | None) -> str | float:
    """"none", "auto" or a positive number (given as a number or a string)."""
    if value is None:
        return "none"
    if isinstance(value, str) and value.lower() in ("none", "auto"):
        return value.lower()
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number > 0 or not math.isfinite(number):
        raise ConfigError("pos_weight", f"must be none, auto or a positive number, got {value!r}")
    return number
