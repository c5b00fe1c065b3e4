"""The caption head's settings that need no model code: names, choices and defaults, and the decoding
settings with their validation.

Importing this module imports no torch or transformers, so an argument parser can offer the same
choices and defaults the library checks against.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from clipposter.errors import ConfigError

DEFAULT_LM = "gpt2"
TARGETS = ("tagline", "overview")
MODES = ("joint", "prefix")
MAPPERS = ("mlp", "transformer")
DEFAULT_SENTENCE_MODEL = "all-MiniLM-L6-v2"

STRATEGIES = ("greedy", "beam", "poster2plot", "sample", "lstm")
# The default: on synthetic posters it gave 3-4x fewer identical texts than greedy or beam search
# at an equal or better margin (docs/captions.md) - the seed paper's collapse was the failure to avoid.
DEFAULT_STRATEGY = "lstm"


def one_of(field: str, value: Any, choices: tuple[str, ...]) -> None:
    """Refuse a value outside `choices`, naming the parameter."""
    if value not in choices:
        raise ConfigError(field, f"must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class DecodingConfig:
    """How to turn a prefix into text. `max_new_tokens=None` means the head's trained length."""

    strategy: str = DEFAULT_STRATEGY
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    temperature: float = 1.0
    num_return: int = 1
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    min_new_tokens: int = 0  # benchmarks force a fixed length with it; users rarely need it
    seed: int = 0
    cut_partial: bool = False  # drop a trailing unfinished sentence

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "DecodingConfig":
        one_of("strategy", self.strategy, STRATEGIES)
        if self.num_return < 1:
            raise ConfigError("num_return", f"must be at least 1, got {self.num_return}")
        if self.strategy == "greedy" and self.num_return > 1:
            raise ConfigError("num_return", f"is {self.num_return}, but greedy decoding gives one candidate per "
                                            f"poster; use strategy beam, sample or lstm for more")
        if self.strategy in ("beam", "poster2plot") and self.num_beams < self.num_return:
            raise ConfigError("num_beams", f"must be at least num_return ({self.num_return}): each candidate "
                                           f"needs a beam, got {self.num_beams}")
        if self.num_beams < 1:
            raise ConfigError("num_beams", f"must be at least 1, got {self.num_beams}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError("top_k", f"must be 0 (off) or positive, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty", f"must be positive (1.0 = off), got {self.repetition_penalty}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens", f"must be at least 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0 or (self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens):
            raise ConfigError("min_new_tokens", f"must be between 0 and max_new_tokens, got {self.min_new_tokens}")
        return self


# What each named strategy sets; settings given explicitly override these.
PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "beam": {"num_beams": 4},
    "poster2plot": {"num_beams": 4, "no_repeat_ngram_size": 3, "length_penalty": 2.0},
    "sample": {"top_k": 50, "top_p": 0.95, "temperature": 1.0},
    "lstm": {},
}


def decoding_preset(strategy: str = DEFAULT_STRATEGY, **overrides: Any) -> DecodingConfig:
    """The named strategy's settings, with any non-None override applied on top."""
    one_of("strategy", strategy, STRATEGIES)
    known = {f.name for f in fields(DecodingConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown decoding settings: {sorted(unknown)}")
    cfg = replace(DecodingConfig(strategy=strategy), **PRESETS[strategy])
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None}).validate()
