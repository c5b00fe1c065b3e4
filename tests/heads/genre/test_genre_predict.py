"""GenreHead's inference: probabilities, thresholds and the predicted genres users see.

The head wraps a hand-made module whose logits are known, so every expected genre is computed
here from the definition (probability >= that genre's threshold), never read off a run.
"""
import numpy as np
import pytest
import torch
from torch import nn

from clipposter.embedding.backbone import BackboneIdentity
from clipposter.errors import ClipposterError, ConfigError
from clipposter.heads.genre.head import GenreHead

GENRES = ["Action", "Comedy", "Drama", "Horror"]
DIM = 4


def ident():
    return BackboneIdentity(model="m", weights="sha256:aa", image_size=32, mean=(0.5, 0.5, 0.5),
                            std=(0.2, 0.2, 0.2), interpolation="bicubic", resize_mode="shortest", embed_dim=DIM)


class Identity(nn.Module):
    """Logits = the embedding itself, so a test chooses each genre's logit directly."""

    def forward(self, x):
        return x * 1.0


def head(kind="ml-decoder", thresholds=None):
    return GenreHead(kind, GENRES, Identity(), identity=ident(), backbone_spec=None, thresholds=thresholds)


def logit(p):
    return float(np.log(p / (1 - p)))


THRESHOLDS = {"mode": "per-genre", "per_genre": [0.3, 0.5, 0.7, 0.9], "global": 0.6}
# Probabilities per poster, chosen around the thresholds above.
PROBS = np.array([[0.31, 0.49, 0.71, 0.95],
                  [0.29, 0.51, 0.69, 0.10],
                  [0.62, 0.58, 0.65, 0.20],
                  [0.05, 0.05, 0.05, 0.05]])
X = np.vectorize(logit)(PROBS).astype(np.float32)


def expected(probs, t):
    return [[g for g, p, tg in zip(GENRES, row, t) if p >= tg] for row in probs]


def test_sigmoid_heads_give_sigmoid_probabilities_and_zero_shot_a_softmax():
    np.testing.assert_allclose(head().predict_proba(X), PROBS, atol=1e-6)
    np.testing.assert_allclose(head("linear-probe").predict_proba(X), PROBS, atol=1e-6)
    soft = head("zero-shot").predict_proba(X)
    np.testing.assert_allclose(soft, torch.softmax(torch.from_numpy(X), -1).numpy(), atol=1e-6)
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)


def test_batched_inference_equals_one_batch():
    x = np.random.default_rng(0).normal(size=(7, DIM)).astype(np.float32)
    np.testing.assert_allclose(head().predict_proba(x, batch_size=2), head().predict_proba(x), atol=0)
    assert head().predict_proba(np.zeros((0, DIM), np.float32)).shape == (0, len(GENRES))


def test_bad_embeddings_are_clear_errors():
    with pytest.raises(ClipposterError, match=r"embeddings of width 3 given to a head trained on width 4"):
        head().predict_proba(np.zeros((2, 3), np.float32))
    with pytest.raises(ClipposterError, match=r"must be \(N, D\) or \(N, T, D\), got shape \(4,\)"):
        head().predict_proba(np.zeros(4, np.float32))


@pytest.mark.parametrize("threshold", [None, "calibrated", "per-genre"])
def test_predicted_genres_are_those_at_or_above_their_own_threshold(threshold):
    h = head(thresholds=THRESHOLDS)
    want = expected(PROBS, THRESHOLDS["per_genre"])
    assert want == [["Action", "Drama", "Horror"], ["Comedy"], ["Action", "Comedy"], []]
    pred = h.predict(X, threshold)
    assert [[GENRES[j] for j in np.flatnonzero(row)] for row in pred] == want
    described = h.describe_predictions([f"p{i}" for i in range(4)], PROBS, ["cache"] * 4, threshold)
    assert [d.predicted for d in described] == [[g for g in sorted(w, key=lambda g: -PROBS[i][GENRES.index(g)])]
                                                for i, w in enumerate(want)]


def test_global_and_numeric_thresholds():
    h = head(thresholds=THRESHOLDS)
    np.testing.assert_array_equal(h.thresholds_for("global"), [0.6] * 4)
    pred = h.predict(X, "global")
    assert pred.tolist() == (PROBS >= 0.6).astype(int).tolist()
    saved_global = head(thresholds={**THRESHOLDS, "mode": "global"})
    assert saved_global.predict(X).tolist() == (PROBS >= 0.6).astype(int).tolist()
    np.testing.assert_array_equal(h.thresholds_for(0.5), [0.5] * 4)
    np.testing.assert_array_equal(h.thresholds_for("0.25"), [0.25] * 4)
    assert h.predict(X, 0.5).tolist() == (PROBS >= 0.5).astype(int).tolist()


def test_a_probability_equal_to_its_threshold_is_predicted():
    h = head(thresholds={"per_genre": [0.5, 0.5, 0.5, 0.5]})
    x = np.zeros((1, DIM), np.float32)  # sigmoid(0) = 0.5 exactly
    assert h.predict(x).tolist() == [[1, 1, 1, 1]]
    assert h.describe_predictions(["p"], h.predict_proba(x), ["cache"])[0].predicted == GENRES


def test_default_thresholds_are_one_half_per_genre():
    h = head()
    assert h.thresholds == {"mode": "per-genre", "per_genre": [0.5] * 4, "global": 0.5, "fallback_genres": []}
    np.testing.assert_array_equal(h.thresholds_for(), [0.5] * 4)
    np.testing.assert_array_equal(h.thresholds_for("global"), [0.5] * 4)


@pytest.mark.parametrize("bad", ["best", 0, 1, 1.5, -0.1, "0"])
def test_bad_threshold_is_a_clear_error(bad):
    h = head(thresholds=THRESHOLDS)
    with pytest.raises(ConfigError, match=r"^threshold must be") as caught:
        h.thresholds_for(bad)
    assert caught.value.field == "threshold"


def test_wrong_number_of_thresholds_is_a_clear_error():
    with pytest.raises(ClipposterError, match="3 thresholds for 4 genres"):
        head(thresholds={"per_genre": [0.5, 0.5, 0.5]})


def test_described_prediction_ranks_rounds_and_cuts():
    h = head(thresholds=THRESHOLDS)
    probs = np.array([[0.2, 0.9, 0.2, 0.123456789]])
    (d,) = h.describe_predictions(["a.jpg"], probs, ["encoded"], top_k=3)
    assert d.path == "a.jpg" and d.source == "encoded"
    # Ties keep vocabulary order (a stable sort), probabilities are rounded to 6 decimals.
    assert d.top == [("Comedy", 0.9), ("Action", 0.2), ("Drama", 0.2)]
    assert d.probabilities == {"Action": 0.2, "Comedy": 0.9, "Drama": 0.2, "Horror": 0.123457}
    assert d.predicted == ["Comedy"]
    assert d.to_dict()["top"][0] == {"genre": "Comedy", "probability": 0.9}
    assert len(h.describe_predictions(["a"], probs, ["cache"])[0].top) == 4  # top_k None: all genres
    assert len(h.describe_predictions(["a"], probs, ["cache"], top_k=10)[0].top) == 4
    assert h.describe_predictions(["a"], probs, ["cache"], top_k=0)[0].top == []
    assert h.describe_predictions(["a"], probs, ["cache"], top_k=-2)[0].top == []
    assert [x.path for x in h.describe_predictions(["a", "b"], np.vstack([probs, probs]), ["cache", "cache"])] == ["a", "b"]


def test_described_prediction_uses_the_threshold_asked_for():
    h = head(thresholds=THRESHOLDS)
    (g,) = h.describe_predictions(["a"], PROBS[2:3], ["cache"], threshold="global")
    assert g.predicted == ["Drama", "Action"]  # 0.65, 0.62 >= 0.6; Comedy 0.58 is not
    (n,) = h.describe_predictions(["a"], PROBS[2:3], ["cache"], threshold=0.55)
    assert n.predicted == ["Drama", "Action", "Comedy"]
    (c,) = h.describe_predictions(["a"], PROBS[2:3], ["cache"])
    assert c.predicted == ["Action", "Comedy"]  # per-genre 0.3 and 0.5; Drama 0.65 < 0.7


def test_ranking_of_many_tied_genres_keeps_vocabulary_order():
    genres = [f"g{i:02d}" for i in range(40)]
    many = GenreHead("ml-decoder", genres, Identity(), identity=BackboneIdentity(
        model="m", weights="sha256:aa", image_size=32, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2),
        interpolation="bicubic", resize_mode="shortest", embed_dim=40), backbone_spec=None)
    p = np.full(40, 0.5)
    p[[3, 17, 30]] = 0.9
    (d,) = many.describe_predictions(["a"], p[None], ["cache"], top_k=8)
    assert [g for g, _ in d.top] == ["g03", "g17", "g30", "g00", "g01", "g02", "g04", "g05"]
    assert d.predicted == ["g03", "g17", "g30"] + [g for i, g in enumerate(genres) if i not in (3, 17, 30)]


def test_top_probabilities_are_rounded_to_six_decimals():
    (d,) = head().describe_predictions(["a"], np.array([[0.123456789, 0.9876543211, 0.5, 0.25]]), ["cache"])
    assert d.top == [("Comedy", 0.987654), ("Drama", 0.5), ("Horror", 0.25), ("Action", 0.123457)]
