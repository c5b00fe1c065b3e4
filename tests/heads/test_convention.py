"""Both heads follow one convention: a head class with save_pretrained / from_pretrained, a
TrainConfig dataclass whose validate() names the bad field, a TrainResult, and evaluate() in the
head's package."""
from __future__ import annotations

import dataclasses
import importlib

import pytest

from clipposter.errors import ConfigError

HEADS = {"genre": ("GenreHead", {"lr": -1.0}), "caption": ("CaptionHead", {"lr": -1.0})}


@pytest.mark.parametrize("package", sorted(HEADS))
def test_head_package_convention(package):
    mod = importlib.import_module(f"clipposter.heads.{package}")
    head_name, bad = HEADS[package]
    head = getattr(mod, head_name)
    assert callable(head.save_pretrained) and callable(head.from_pretrained)
    assert dataclasses.is_dataclass(mod.TrainConfig) and dataclasses.is_dataclass(mod.TrainResult)
    assert callable(mod.evaluate) and not isinstance(mod.evaluate, type(mod))  # the function, not a module
    mod.TrainConfig().validate()  # the defaults are valid
    (field, value), = bad.items()
    with pytest.raises(ConfigError) as exc:
        mod.TrainConfig(**{field: value}).validate()
    assert exc.value.field == field and "--" not in str(exc.value)
