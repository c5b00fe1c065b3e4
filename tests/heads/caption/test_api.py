"""The caption package's surface: what it exports, what importing it costs, and settings errors that
name the parameter (the CLI turns the parameter into its flag)."""
from __future__ import annotations

import subprocess
import sys

import pytest

import clipposter.heads.caption as caption
from clipposter.errors import ConfigError
from clipposter.heads.caption.model import CaptionHeadConfig
from clipposter.heads.caption.train import TrainConfig

HEAVY = ("torch", "transformers", "sentence_transformers", "open_clip", "faiss", "gradio")


def test_importing_the_package_and_its_settings_loads_no_model_library():
    code = ("import sys, clipposter.heads.caption, clipposter.heads.caption.config, clipposter.heads.caption.lm; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_every_exported_name_resolves_to_its_module_object():
    for name in caption.__all__:
        assert getattr(caption, name) is not None, name
    # `evaluate` is the function (its module has the same name), the one evaluate.py defines.
    assert caption.evaluate is sys.modules["clipposter.heads.caption.evaluation"].evaluate
    assert caption.evaluate_captions is caption.evaluate
    assert caption.CaptionHead.from_pretrained == caption.CaptionHead.load
    assert caption.CaptionHead.save_pretrained is caption.CaptionHead.save
    assert caption.TrainConfig is TrainConfig and caption.DecodingConfig().strategy == caption.DEFAULT_STRATEGY
    with pytest.raises(AttributeError):
        caption.no_such_name  # noqa: B018


def test_offline_reads_both_environment_switches(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert not caption.offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", " Yes ")
    assert caption.offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert caption.offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "off")
    assert not caption.offline()


@pytest.mark.parametrize("settings, field, problem", [
    ({"epochs": 0}, "epochs", "must be at least 1, got 0"),
    ({"batch_size": 0}, "batch_size", "must be at least 1, got 0"),
    ({"accumulate": -1}, "accumulate", "must be at least 1, got -1"),
    ({"lr": 0.0}, "lr", "must be positive, got 0.0"),
    ({"warmup_steps": -1}, "warmup_steps", "must be 0 or more, got -1"),
])
def test_train_config_errors_name_the_field(settings, field, problem):
    cfg = TrainConfig(**settings)  # fields only: nothing is checked until validate()
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert (err.value.field, err.value.problem) == (field, problem)
    assert str(err.value) == f"{field} {problem}"


def test_valid_train_config_passes_through():
    cfg = TrainConfig(epochs=1, batch_size=1, accumulate=1, lr=1e-9, warmup_steps=0)
    assert cfg.validate() is cfg


@pytest.mark.parametrize("settings, field, problem", [
    ({"mapper": "rnn"}, "mapper", "must be one of mlp, transformer, got 'rnn'"),
    ({"target": "title"}, "target", "must be one of tagline, overview, got 'title'"),
    ({"mode": "frozen"}, "mode", "must be one of joint, prefix, got 'frozen'"),
    ({"prefix_length": 0}, "prefix_length", "must be at least 1, got 0"),
    ({"max_tokens": 1}, "max_tokens", "must be at least 2, got 1"),
])
def test_head_config_errors_name_the_field(settings, field, problem):
    with pytest.raises(ConfigError) as err:
        CaptionHeadConfig(clip_dim=64, lm_dim=64, **settings)
    assert (err.value.field, err.value.problem) == (field, problem)


def test_head_config_derives_the_mlp_width_and_round_trips():
    cfg = CaptionHeadConfig(clip_dim=64, lm_dim=32, prefix_length=10)
    assert cfg.mapper_hidden == max(64, 32 * 10 // 2)
    assert CaptionHeadConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg
