"""The genre head's losses against their formulas and torch, and the ML-Decoder module: the pooled
fast path against the plain decoder (with gradcheck), token memory, and settings errors."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clipposter.errors import ConfigError
from clipposter.heads.genre.config import DecoderConfig, TrainConfig
from clipposter.heads.genre.model import MLDecoder, _HiddenReadout, genre_loss
from clipposter.heads.genre.train import fit_decoder, train_genre_head
from loss_reference import loss_by_hand

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ================================================================================== losses ==

EXTREME = torch.tensor([[-1e4, -100.0, -10.0, 0.0, 10.0, 100.0, 1e4]] * 2)
TARGETS = torch.tensor([[0, 1, 0, 1, 0, 1, 0], [1, 0, 1, 0, 1, 0, 1]], dtype=torch.float32)


@pytest.mark.parametrize("kind", ["bce", "focal", "asl"])
@pytest.mark.parametrize("pos_weight", [None, torch.full((7,), 5.0)])
def test_losses_finite_and_non_negative_at_extreme_logits(kind, pos_weight):
    logits = EXTREME.clone().requires_grad_(True)
    loss = genre_loss(logits, TARGETS, kind, pos_weight)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() >= 0
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("kind", ["bce", "focal", "asl"])
def test_losses_are_mean_reduced(kind):
    torch.manual_seed(0)
    x, y = torch.randn(6, 5) * 3, (torch.rand(6, 5) > 0.5).float()
    one = genre_loss(x, y, kind)
    # Mean, not sum: repeating the batch leaves the loss unchanged, and it is on the per-element scale.
    assert torch.allclose(one, genre_loss(torch.cat([x, x]), torch.cat([y, y]), kind))
    assert 0 < one.item() < 5


def test_bce_matches_torch_and_special_cases_reduce_to_it():
    torch.manual_seed(1)
    x, y = torch.randn(8, 6) * 4, (torch.rand(8, 6) > 0.6).float()
    w = torch.linspace(1, 3, 6)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(x, y, pos_weight=w)
    assert torch.allclose(genre_loss(x, y, "bce", w), ref, atol=1e-6)
    bce = genre_loss(x, y, "bce")
    assert torch.allclose(genre_loss(x, y, "focal", focal_gamma=0.0), bce, atol=1e-6)
    assert torch.allclose(genre_loss(x, y, "asl", asl_gamma_neg=0.0, asl_gamma_pos=0.0, asl_clip=0.0), bce, atol=1e-6)
    # Focusing down-weights easy examples: focal < BCE.
    assert genre_loss(x, y, "focal").item() < bce.item()


# A hand-made batch: confident right and wrong answers, unsure ones, and negatives below the ASL clip.
HAND_LOGITS = np.array([[2.0, -1.0, 0.5, -4.0],
                        [-3.0, 0.0, 1.5, -2.5],
                        [0.3, 3.0, -0.7, 1.0]])
HAND_TARGETS = np.array([[1, 0, 1, 0],
                         [1, 0, 0, 0],
                         [0, 1, 1, 1]])


@pytest.mark.parametrize("kind, params", [
    ("bce", {}),
    ("focal", {}),
    ("focal", {"focal_gamma": 0.5}),
    ("asl", {}),
    ("asl", {"asl_gamma_neg": 2.0, "asl_gamma_pos": 1.0, "asl_clip": 0.2}),
])
@pytest.mark.parametrize("weighted", [False, True])
def test_each_loss_matches_its_formula_on_a_hand_made_batch(kind, params, weighted):
    w = np.array([1.0, 3.0, 0.5, 2.0]) if weighted else None
    got = genre_loss(torch.tensor(HAND_LOGITS), torch.tensor(HAND_TARGETS), kind,
                     None if w is None else torch.tensor(w), **params)
    assert got.item() == pytest.approx(loss_by_hand(HAND_LOGITS, HAND_TARGETS, kind, w, **params), rel=1e-5)


def test_asl_ignores_easy_negatives_below_the_clip():
    easy_negative = torch.tensor([[-5.0]])  # p ≈ 0.0067 < clip 0.05
    assert genre_loss(easy_negative, torch.zeros(1, 1), "asl").item() == 0.0
    assert genre_loss(easy_negative, torch.zeros(1, 1), "bce").item() > 0.0


# ================================================================================== module ==

def _perturbed_decoder(**overrides) -> MLDecoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(embed_dim=32, num_genres=7, width=16, mlp_hidden=24, num_heads=4, **overrides)
    m = MLDecoder(cfg, np.random.default_rng(0).standard_normal((7, 32)))
    with torch.no_grad():
        for p in m.parameters():  # move LayerNorm away from its identity initialisation
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("overrides", [{}, {"num_groups": 3}, {"self_attention": True, "num_groups": 2}])
def test_pooled_fast_path_equals_plain_decoder(overrides):
    m = _perturbed_decoder(dropout=0.0, **overrides)
    x = torch.randn(9, 32)
    y = (torch.rand(9, 7) > 0.5).float()
    m.eval()
    fast = m(x)
    m.force_general = True
    plain = m(x)
    assert fast.shape == (9, 7)
    assert torch.allclose(fast, plain, atol=1e-5)
    grads = []
    m.train()
    for general in (False, True):
        m.force_general = general
        m.zero_grad()
        genre_loss(m(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dropped", [False, True])
def test_fused_hidden_readout_gradients(k, dropped):
    torch.manual_seed(k)
    q, b, h = 3, 5, 7
    args = [torch.randn(q, h, dtype=torch.double, requires_grad=True),
            torch.randn(b, h, dtype=torch.double, requires_grad=True),
            (torch.rand(q, b, dtype=torch.double) + 0.5).requires_grad_(True),
            torch.randn(h, dtype=torch.double, requires_grad=True),
            torch.randn(q, k, h, dtype=torch.double, requires_grad=True)]
    keep = (torch.rand(1, b, h) > 0.5).double() * 2 if dropped else None
    scale = 2.0 if dropped else 1.0
    assert torch.autograd.gradcheck(lambda *a: _HiddenReadout.apply(*a, keep, scale), args)


def test_one_memory_token_gives_every_query_the_same_attended_vector():
    m = _perturbed_decoder(memory="tokens").eval()
    attn = m.layers[0].cross_attn
    queries = torch.randn(1, 7, 16)
    with torch.no_grad():
        one, _ = attn(queries, torch.randn(1, 1, 16), torch.randn(1, 1, 16))
        many, _ = attn(queries, *(torch.randn(1, 6, 16),) * 2)
    assert torch.allclose(one[0, 0], one[0, 3], atol=1e-6)  # one token: same vector for every genre
    assert not torch.allclose(many[0, 0], many[0, 3], atol=1e-3)  # tokens: each genre attends its own way
    with torch.no_grad():
        assert m(torch.randn(4, 6, 32)).shape == (4, 7)
        assert m(torch.randn(4, 32)).shape == (4, 7)  # a pooled embedding is a one-token sequence


def test_token_memory_head_trains_through_the_api():
    rng = np.random.default_rng(0)
    y = (rng.random((120, 7)) < 0.3).astype(np.int8)
    x = rng.standard_normal((120, 5, 32)).astype(np.float32) + y[:, None, :] @ rng.standard_normal((7, 32)).astype(np.float32)
    m = _perturbed_decoder(memory="tokens", dropout=0.1)
    m.set_input_stats(x[:100])
    history = fit_decoder(m, x[:100], y[:100], x[100:], y[100:], TrainConfig(lr=3e-3, epochs=3, batch_size=32),
                          progress=False)
    assert len(history) == 3 and all(math.isfinite(e.train_loss) for e in history)
    assert history[-1].train_loss < history[0].train_loss


@pytest.mark.parametrize("make, field, message", [
    (lambda: DecoderConfig(embed_dim=8, num_genres=3, width=64, num_heads=5).validate(), "num_heads",
     r"num_heads must divide width \(64\), got 5"),
    (lambda: DecoderConfig(embed_dim=8, num_genres=3, num_groups=4).validate(), "num_groups",
     r"num_groups must be between 1 and the number of genres \(3\), got 4"),
    (lambda: DecoderConfig(embed_dim=8, num_genres=3, memory="patches").validate(), "memory", "memory must be one of"),
    (lambda: TrainConfig(loss="hinge").validate(), "loss", "loss must be one of bce, focal, asl, got 'hinge'"),
    (lambda: TrainConfig(pos_weight="lots").validate(), "pos_weight",
     "pos_weight must be none, auto or a positive number, got 'lots'"),
    (lambda: TrainConfig(asl_clip=1.0).validate(), "asl_clip", r"asl_clip must be in \[0, 1\)"),
    (lambda: train_genre_head(SimpleNamespace(root="c"), kind="svm"), "kind", "kind must be one of"),
    (lambda: train_genre_head(SimpleNamespace(root="c"), architecture={"memory": "tokens"}), "memory",
     "memory 'tokens' needs ViT token sequences, but the cache c stores one pooled embedding per poster"),
])
def test_bad_settings_are_config_errors_that_name_the_parameter(make, field, message):
    with pytest.raises(ConfigError, match=f"^{message}") as caught:
        make()
    assert caught.value.field == field
    assert "--" not in str(caught.value)  # library messages name parameters; the CLI names its flags
