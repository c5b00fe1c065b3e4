"""A head's saved weights with NaN or infinite values are refused on load, naming the file and the
tensor: a head that would predict NaN for every poster must not load as if it were fine."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clipposter.embedding.backbone import BackboneIdentity
from clipposter.errors import ClipposterError
from clipposter.heads.genre.baselines import zero_shot_head
from clipposter.heads.genre.head import GenreHead
from clipposter.heads.weights import check_finite


def test_finite_weights_pass_and_integer_tensors_are_not_inspected():
    check_finite({"a": torch.zeros(3), "b": torch.ones(2, 2, dtype=torch.float16), "n": torch.arange(4),
                  "empty": torch.zeros(0)}, Path("h") / "model.safetensors")


@pytest.mark.parametrize("bad, what", [(math.nan, "NaN"), (math.inf, "infinite values"), (-math.inf, "infinite values")])
def test_the_first_bad_tensor_is_named_with_its_file(bad, what):
    path = Path("h") / "model.safetensors"
    state = {"a.weight": torch.zeros(3), "b.weight": torch.tensor([1.0, bad, 2.0, 3.0], dtype=torch.bfloat16),
             "c.weight": torch.tensor([bad])}
    with pytest.raises(ClipposterError) as caught:
        check_finite(state, path)
    assert str(caught.value) == (f"{path}: tensor b.weight holds {what} (1 of 4 values); the file is damaged or "
                                 f"the training diverged: retrain the head")


def test_genre_head_with_a_nan_weight_is_refused_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    identity = BackboneIdentity(model="m", weights="sha256:aa", image_size=32, mean=(0.5, 0.5, 0.5),
                                std=(0.2, 0.2, 0.2), interpolation="bicubic", resize_mode="shortest", embed_dim=4)
    head = zero_shot_head(["Action", "Drama"], np.eye(2, 4, dtype=np.float32), identity, None)
    out = head.save_pretrained(tmp_path / "head")
    x = np.eye(3, 4, dtype=np.float32)
    assert np.allclose(GenreHead.from_pretrained(out).predict_proba(x), head.predict_proba(x))
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = math.nan
    save_file(state, str(weights))
    with pytest.raises(ClipposterError, match=f"^{weights}: tensor {name} holds NaN"):
        GenreHead.from_pretrained(out)


def test_caption_head_with_an_infinite_mapper_weight_is_refused_on_load(tmp_path, tiny_lm_dir):
    from safetensors.torch import load_file, save_file

    from clipposter.heads.caption.model import MAPPER_FILE, CaptionHead

    identity = BackboneIdentity(model="m", weights="sha256:aa", image_size=32, mean=(0.5, 0.5, 0.5),
                                std=(0.2, 0.2, 0.2), interpolation="bicubic", resize_mode="shortest", embed_dim=4)
    out = tmp_path / "caption"
    CaptionHead.create(identity, lm=str(tiny_lm_dir), prefix_length=2, mapper_layers=1).save_pretrained(out)
    CaptionHead.from_pretrained(out)  # loads while finite
    state = load_file(str(out / MAPPER_FILE))
    name = sorted(state)[-1]
    state[name] = torch.full_like(state[name], math.inf)
    save_file(state, str(out / MAPPER_FILE))
    with pytest.raises(ClipposterError, match=f"^{out / MAPPER_FILE}: tensor {name} holds infinite values"):
        CaptionHead.from_pretrained(out)
