"""The caption training run around the loop: which checkpoints stay on disk, the time estimate, where
progress is printed, and heads whose weights are not finite numbers."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipposter.embedding.backbone import BackboneIdentity
from clipposter.embedding.cache import EmbeddingCache
from clipposter.errors import ClipposterError, ConfigError
from clipposter.heads.caption.model import CaptionHead
from clipposter.heads.caption import train as training
from clipposter.heads.caption.train import TrainConfig, train_caption_head

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# A small, quick run: short texts, a 4-vector prefix, 7 batches of 64 per epoch.
QUICK = dict(max_tokens=12, prefix_length=4)


@pytest.fixture(scope="module")
def cache(caption_cache_dir):
    c = EmbeddingCache.open(caption_cache_dir)
    yield c
    c.close()


def epochs_on_disk(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("epoch-*"))


def test_only_the_last_checkpoints_are_kept_and_resume_uses_the_last(cache, tiny_lm_dir, tmp_path):
    assert TrainConfig().keep_checkpoints == 1  # the default: one checkpoint, enough to resume
    out = tmp_path / "two"
    train = TrainConfig(epochs=3, lr=3e-3, batch_size=64, keep_checkpoints=2)
    train_caption_head(cache, out, lm=str(tiny_lm_dir), train=train, progress=False, **QUICK)
    assert epochs_on_disk(out) == ["epoch-0002", "epoch-0003"]
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["checkpoint"] == "epoch-0003"
    resumed = train_caption_head(cache, out, lm=str(tiny_lm_dir), resume=True, progress=False,
                                 train=TrainConfig(epochs=4, lr=3e-3, batch_size=64, keep_checkpoints=2), **QUICK)
    assert resumed.resumed_from_epoch == 3 and epochs_on_disk(out) == ["epoch-0003", "epoch-0004"]

    # keep_checkpoints=0: only the finished head is left, whole, and nothing to resume from.
    bare = tmp_path / "none"
    train_caption_head(cache, bare, lm=str(tiny_lm_dir), train=TrainConfig(epochs=2, lr=3e-3, batch_size=64,
                                                                           keep_checkpoints=0),
                       progress=False, **QUICK)
    assert not (bare / "checkpoints").exists()
    head = CaptionHead.from_pretrained(bare)
    assert head.training_record["epochs"] == 2
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        train_caption_head(cache, bare, lm=str(tiny_lm_dir), resume=True, train=TrainConfig(epochs=3),
                           progress=False, **QUICK)


def test_keep_checkpoints_must_not_be_negative():
    with pytest.raises(ConfigError) as err:
        TrainConfig(keep_checkpoints=-1).validate()
    assert (err.value.field, err.value.problem) == ("keep_checkpoints", "must be 0 or more, got -1")


@pytest.mark.parametrize("per_batch, batches, epochs, text", [
    (0.5, 360, 4, "≈ 3 min/epoch, ≈ 12 min in all"),
    (0.1, 100, 3, "≈ 10 s/epoch, ≈ 30 s in all"),
    (2.0, 3000, 2, "≈ 1.7 h/epoch, ≈ 3.3 h in all"),
    (0.5, 360, 1, "≈ 3 min/epoch"),  # one epoch: the total says nothing more
])
def test_time_estimate_text(per_batch, batches, epochs, text):
    assert training.time_estimate(per_batch, batches, epochs) == text


def test_training_prints_progress_and_the_estimate_on_stderr_only(cache, tiny_lm_dir, tmp_path, capsys):
    # 420 training posters in batches of 16: 27 batches per epoch, so the estimate comes after 20 of them.
    train_caption_head(cache, tmp_path / "head", lm=str(tiny_lm_dir), train=TrainConfig(epochs=2, lr=3e-3),
                       progress=True, **QUICK)
    out, err = capsys.readouterr()
    assert out == ""  # results are the caller's to print; progress is not a result
    estimates = re.findall(r"≈ \d+(?:\.\d)? (?:s|min|h)/epoch, ≈ \d+(?:\.\d)? (?:s|min|h) in all", err)
    assert len(estimates) == 1, err
    assert "epoch 1: train loss" in err and "epoch 2: train loss" in err


def test_backbone_mismatch_names_the_cache_side_and_the_head_side(cache, tiny_lm_dir):
    head = CaptionHead.create(cache.identity, lm=str(tiny_lm_dir), **QUICK)
    other = BackboneIdentity.from_dict({**cache.identity.to_dict(), "weights": "sha256:other"})
    with pytest.raises(ClipposterError) as err:
        head.check_backbone(other, "the cache runs/cache")
    msg = str(err.value)
    assert msg.startswith(f"the cache runs/cache was made with backbone {other.describe()}")
    assert f"the caption head was trained on {head.identity.describe()}" in msg
    head.check_backbone(cache.identity, "the cache runs/cache")  # the same backbone passes


@pytest.fixture(scope="module")
def saved_head(cache, tiny_lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finite") / "head"
    CaptionHead.create(cache.identity, lm=str(tiny_lm_dir), **QUICK).save_pretrained(out)
    return out


@pytest.mark.parametrize("file, value", [("mapper.safetensors", float("nan")), ("lm/model.safetensors", float("inf"))])
def test_a_head_with_non_finite_weights_is_refused_naming_file_and_tensor(saved_head, tmp_path, file, value):
    import shutil

    broken = tmp_path / "head"
    shutil.copytree(saved_head, broken)
    state = load_file(str(broken / file))
    name = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)[-1]
    state[name] = state[name].clone()
    state[name].view(-1)[1] = value
    save_file(state, str(broken / file), metadata={"format": "pt"})
    with pytest.raises(ClipposterError) as err:
        CaptionHead.from_pretrained(broken)
    msg = str(err.value)
    assert "\n" not in msg and str(broken / file) in msg and name in msg, msg
    # The intact copy loads.
    assert torch.isfinite(CaptionHead.from_pretrained(saved_head).mapper.center).all()
