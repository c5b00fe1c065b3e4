"""Genre metrics (functions named `genre_*`): multi-label precision / recall / F1 with micro, macro and
per-sample averaging, mAP, per-genre scores, threshold calibration and the constant
most-frequent-genres baseline. All counting is done by scikit-learn; this module only decides what
is counted. The text tables and the chart of these numbers are in `clipposter.heads.genre.evaluation`.

Conventions: `y_true` is an (N, G) 0/1 matrix, `scores` an (N, G) float matrix, and a genre is
predicted when its score is >= its threshold (the same `>=` everywhere, 0.5 included).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from clipposter.errors import ConfigError

GENRE_AVERAGES = ("micro", "macro", "samples")


def _as_labels(y_true) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 2:
        raise ValueError(f"labels must be an (N, G) matrix, got shape {y.shape}")
    return (y > 0).astype(np.int8)


def genre_predictions(scores, thresholds) -> np.ndarray:
    """0/1 predictions: score >= threshold, with one threshold per genre or one for all."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (s.shape[1],))
    return (s >= t[None, :]).astype(np.int8)


def genre_prf(y_true, y_pred) -> dict[str, dict[str, float]]:
    """Precision, recall and F1 under micro, macro and per-sample averaging.

    Undefined ratios (a genre never predicted, a poster with no labels) count as 0, as the paper's
    table would, rather than being skipped: a model that predicts nothing must not look precise.
    """
    from sklearn.metrics import precision_recall_fscore_support

    y, p = _as_labels(y_true), _as_labels(y_pred)
    out: dict[str, dict[str, float]] = {}
    for avg in GENRE_AVERAGES:
        prec, rec, f1, _ = precision_recall_fscore_support(y, p, average=avg, zero_division=0)
        out[avg] = {"precision": float(prec), "recall": float(rec), "f1": float(f1)}
    return out


def genre_average_precision(y_true, scores) -> tuple[list[float | None], float | None]:
    """Average precision per genre (None where the split has no positive of it) and their mean (mAP).

    Genres without a positive have no defined AP; they are left out of the mean instead of counted
    as 0 or 1, and the per-genre list says which they were.
    """
    from sklearn.metrics import average_precision_score

    y = _as_labels(y_true)
    s = np.asarray(scores, dtype=np.float64)
    per: list[float | None] = []
    for g in range(y.shape[1]):
        if y[:, g].sum() == 0:
            per.append(None)
        else:
            per.append(float(average_precision_score(y[:, g], s[:, g])))
    defined = [a for a in per if a is not None]
    return per, (float(np.mean(defined)) if defined else None)


def genre_per_genre(y_true, y_pred, genres: Sequence[str], ap: Sequence[float | None] | None = None,
                    thresholds=None) -> list[dict]:
    """Precision, recall, F1 and support of each genre (plus AP and threshold when given)."""
    from sklearn.metrics import precision_recall_fscore_support

    y, p = _as_labels(y_true), _as_labels(y_pred)
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, average=None, zero_division=0,
                                                         labels=list(range(y.shape[1])))
    t = None if thresholds is None else np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (y.shape[1],))
    rows = []
    for g, name in enumerate(genres):
        row = {"genre": name, "precision": float(prec[g]), "recall": float(rec[g]), "f1": float(f1[g]),
               "support": int(sup[g]), "predicted": int(p[:, g].sum())}
        if ap is not None:
            row["ap"] = ap[g]
        if t is not None:
            row["threshold"] = float(t[g])
        rows.append(row)
    return rows


def genre_scores(y_true, scores, thresholds, genres: Sequence[str]) -> dict | None:
    """Every genre metric of one model on one split at the given thresholds; None for an empty split."""
    y = _as_labels(y_true)
    if y.shape[0] == 0:
        return None
    pred = genre_predictions(scores, thresholds)
    ap, mean_ap = genre_average_precision(y, scores)
    return {
        "posters": int(y.shape[0]),
        **genre_prf(y, pred),
        "map": mean_ap,
        "labels_per_poster": float(y.sum(1).mean()),
        "predicted_per_poster": float(pred.sum(1).mean()),
        "per_genre": genre_per_genre(y, pred, genres, ap, thresholds),
    }


# ----- threshold calibration -------------------------------------------------------------------

def _best_f1_threshold(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """The threshold maximising binary F1 of `s >= t`, and that F1. `y` must hold a positive.

    The returned threshold sits halfway between the chosen score and the next lower score, so it
    makes exactly the chosen cut on these data while not sitting on one validation poster's score.
    """
    from sklearn.metrics import precision_recall_curve

    prec, rec, thr = precision_recall_curve(y, s)
    prec, rec = prec[:len(thr)], rec[:len(thr)]
    denom = prec + rec
    f1 = np.divide(2 * prec * rec, denom, out=np.zeros_like(denom), where=denom > 0)
    i = int(np.argmax(f1))  # first maximum = lowest threshold among ties: more recall for the same F1
    chosen = float(thr[i])
    lower = s[s < chosen]
    t = (chosen + float(lower.max())) / 2 if lower.size else chosen
    return t, float(f1[i])


# The rule that holds on small validation splits (docs/genres.md has the measurements behind it).
CALIBRATION_MIN_SUPPORT = 5  # validation positives a genre needs for a threshold of its own
CALIBRATION_SHRINKAGE = 20.0  # weight of the global threshold, in validation positives
RARE_FREQUENCY = 0.25  # a genre on fewer training posters than this share is never predicted on ...
MAX_RARE_SHARE = 0.5  # ... more than this share of validation posters


def _cap_share(s: np.ndarray, share: float) -> float:
    """The lowest threshold at which at most `share` of the scores `s` are predicted (score >= t),
    placed halfway between the last score let through and the next lower one."""
    keep = int(np.floor(share * s.size))
    ordered = np.sort(s)[::-1]
    if keep >= s.size:
        return float(ordered[-1])
    below = ordered[keep]  # the highest score that must stay out
    above = ordered[ordered > below]
    if above.size == 0:
        return float(np.nextafter(below, np.inf))
    return (float(above.min()) + float(below)) / 2


def genre_calibrate_thresholds(y_true, scores, fallback: float = 0.5, *, train_frequency=None,
                               min_support: int = CALIBRATION_MIN_SUPPORT,
                               shrinkage: float = CALIBRATION_SHRINKAGE) -> dict:
    """Thresholds chosen on a (validation) split for F1, by a rule that holds on small splits.

    The global threshold maximises micro-F1 over all genres' scores pooled. Each genre's own
    F1-best cut is trusted in proportion to its validation support n (its positives there): the
    genre's threshold is (n × its cut + `shrinkage` × global) / (n + `shrinkage`), and a genre with
    fewer than `min_support` positives takes the global threshold (listed in `fallback_genres` by
    index). With `train_frequency` (each genre's share of training posters), a genre rarer than
    RARE_FREQUENCY never gets a threshold that predicts it on more than MAX_RARE_SHARE of the
    split's posters: it is raised to the lowest one that does not (listed in `capped_genres`).
    `min_support=1, shrinkage=0` without `train_frequency` is the plain per-genre F1-best cut.

    Returns {"per_genre": [...], "global": t, "fallback_genres": [...], "capped_genres": [...]};
    with no positive at all, every threshold is `fallback`.
    """
    y = _as_labels(y_true)
    s = np.asarray(scores, dtype=np.float64)
    g = y.shape[1]
    if min_support < 1:
        raise ConfigError("min_support", f"must be at least 1, got {min_support}")
    if not shrinkage >= 0:
        raise ConfigError("shrinkage", f"must be non-negative, got {shrinkage}")
    freq = None if train_frequency is None else np.asarray(train_frequency, dtype=np.float64).ravel()
    if freq is not None and freq.size != g:
        raise ConfigError("train_frequency", f"must hold one value per genre: {freq.size} values for {g} genres")
    if y.shape[0] == 0 or y.sum() == 0:
        return {"per_genre": [float(fallback)] * g, "global": float(fallback),
                "fallback_genres": list(range(g)), "capped_genres": []}
    global_t, _ = _best_f1_threshold(y.ravel(), s.ravel())
    per, fallback_genres, capped = [], [], []
    for j in range(g):
        support = int(y[:, j].sum())
        if support < min_support:
            t = global_t
            fallback_genres.append(j)
        else:
            own, _ = _best_f1_threshold(y[:, j], s[:, j])
            t = (support * own + shrinkage * global_t) / (support + shrinkage)
        if freq is not None and freq[j] < RARE_FREQUENCY and (s[:, j] >= t).mean() > MAX_RARE_SHARE:
            t = _cap_share(s[:, j], MAX_RARE_SHARE)
            capped.append(j)
        per.append(float(t))
    return {"per_genre": per, "global": float(global_t), "fallback_genres": fallback_genres, "capped_genres": capped}


# ----- the constant baseline -------------------------------------------------------------------

def genre_constant_top_k(train_y, val_y, max_k: int | None = None) -> dict:
    """The baseline that predicts the k most frequent training genres for every poster.

    k is chosen on the validation split by micro-F1 (on 7,242 real IMDb posters, Drama+Comedy for
    everyone already gives micro-F1 0.42). Returns {"k", "order", "frequency", "validation_f1"}:
    `order` lists genre indices by training frequency (ties broken by vocabulary order), and
    `frequency` doubles as the constant score used for mAP.
    """
    ytr = _as_labels(train_y)
    yva = _as_labels(val_y)
    g = ytr.shape[1]
    freq = ytr.mean(0) if ytr.shape[0] else np.zeros(g)
    order = sorted(range(g), key=lambda j: (-freq[j], j))
    max_k = g if max_k is None else max(1, min(max_k, g))
    best_k, best_f1 = 1, -1.0
    ref = yva if yva.shape[0] else ytr  # no validation posters: choose k on the training split
    for k in range(1, max_k + 1):
        pred = np.zeros_like(ref)
        pred[:, order[:k]] = 1
        f1 = genre_prf(ref, pred)["micro"]["f1"] if ref.shape[0] else 0.0
        if f1 > best_f1 + 1e-12:
            best_k, best_f1 = k, f1
    return {"k": best_k, "order": order, "frequency": [float(f) for f in freq], "validation_f1": best_f1}


def genre_constant_predictions(n: int, order: Sequence[int], k: int, num_genres: int) -> np.ndarray:
    pred = np.zeros((n, num_genres), np.int8)
    pred[:, list(order[:k])] = 1
    return pred
