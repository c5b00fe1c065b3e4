"""Baselines for the genre head, in the same framework (each is a `GenreHead` with a torch module of
`clipposter.heads.genre.model`, saved and loaded the same way, scored by the same metrics):

- zero-shot CLIP: cosine between the poster and each genre's prompt embedding, ×100 and softmaxed
  over the genres as CLIP's zero-shot classifier does; no training at all.
- linear probe: one scikit-learn logistic regression per genre on the standardised cached
  embeddings; its coefficients are copied into a torch module, so it needs no pickle.
- the constant baseline (predict the k most frequent training genres for every poster) lives in
  `clipposter.heads.genre.metrics.genre_constant_top_k`: it has no model to save.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from clipposter.embedding.identity import BackboneIdentity
from clipposter.embedding.prompts import DEFAULT_TEMPLATES
from clipposter.heads.genre.head import GenreHead
from clipposter.heads.genre.model import LinearProbe, ZeroShotClassifier

__all__ = ["fit_linear_probe", "zero_shot_head", "LinearProbe", "ZeroShotClassifier"]


def fit_linear_probe(x: np.ndarray, y: np.ndarray, c: float = 1.0, seed: int = 0, max_iter: int = 1000,
                     progress: bool = False, genres: Sequence[str] | None = None) -> tuple[LinearProbe, list[str]]:
    """Fit one L2 logistic regression per genre on standardised embeddings.

    A genre whose training labels are all 0 (or all 1) has nothing to separate: it gets a constant
    probability (its smoothed training frequency) instead of a solver error. Returns the module and
    warnings (constant genres, solver non-convergence).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from tqdm.auto import tqdm

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    n, d = x.shape
    g = y.shape[1]
    names = list(genres) if genres is not None else [str(i) for i in range(g)]
    mean = x.mean(0) if n else np.zeros(d)
    # Standardising matters: CLIP embeddings share a large common direction, and an unscaled L2
    # penalty would then mostly shrink the informative directions.
    scale = np.clip(x.std(0), 1e-6, None) if n else np.ones(d)
    xs = (x - mean) / scale
    weight = np.zeros((g, d))
    bias = np.zeros(g)
    constant, unconverged = [], []
    for j in tqdm(range(g), desc="linear probe", unit="genre", disable=not progress, leave=False):
        col = (y[:, j] > 0).astype(np.int64)
        pos = int(col.sum())
        if pos == 0 or pos == n:
            p = (pos + 0.5) / (n + 1.0)
            bias[j] = np.log(p / (1 - p))
            constant.append(names[j])
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(xs, col)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            unconverged.append(names[j])
        weight[j] = model.coef_[0]
        bias[j] = model.intercept_[0]
    module = LinearProbe(d, g)
    with torch.no_grad():
        module.mean.copy_(torch.from_numpy(mean).float())
        module.scale.copy_(torch.from_numpy(scale).float())
        module.weight.copy_(torch.from_numpy(weight).float())
        module.bias.copy_(torch.from_numpy(bias).float())
    notes = []
    if constant:
        notes.append(f"linear probe: {', '.join(constant)} {'has' if len(constant) == 1 else 'have'} a single label "
                     f"value in training; predicted with a constant probability")
    if unconverged:
        notes.append(f"linear probe: the solver did not converge for {', '.join(unconverged)} in {max_iter} "
                     f"iterations; scores may improve with a smaller C (probe_c)")
    return module.eval(), notes


def zero_shot_head(genres: Sequence[str], genre_text: np.ndarray, identity: BackboneIdentity,
                   backbone_spec: dict | None, templates: Sequence[str] = DEFAULT_TEMPLATES) -> GenreHead:
    """CLIP zero-shot classification over `genres` as a GenreHead (thresholds 0.5 until calibrated)."""
    module = ZeroShotClassifier(genre_text)
    return GenreHead("zero-shot", genres, module, identity=identity, backbone_spec=backbone_spec,
                     templates=templates, genre_text=genre_text,
                     config={"embed_dim": identity.embed_dim, "num_genres": len(genres),
                             "logit_scale": module.logit_scale})
