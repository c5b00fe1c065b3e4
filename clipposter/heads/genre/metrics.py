"""Evaluation metrics.

Genre section (functions named `genre_*`): multi-label precision / recall / F1 with micro, macro and
per-sample averaging, mAP, per-genre scores, threshold calibration, the constant most-frequent-genres
baseline, the text tables of `clipposter evaluate genres` and its per-genre F1 chart. All counting
is done by scikit-learn; this module only decides what is counted and how it is shown.

Conventions: `y_true` is an (N, G) 0/1 matrix, `scores` an (N, G) float matrix, and a genre is
predicted when its score is >= its threshold (the same `>=` everywhere, 0.5 included).
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

# ======================================================================================= genres ==

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


def genre_calibrate_thresholds(y_true, scores, fallback: float = 0.5) -> dict:
    """Thresholds chosen on a (validation) split to maximise F1.

    Returns {"per_genre": [...], "global": t, "fallback_genres": [...]}: one threshold per genre
    maximising that genre's F1, and one threshold for all genres maximising micro-F1. Genres with no
    positive in the split have no F1 to maximise and take the global threshold (listed in
    `fallback_genres` by index); with no positive at all, everything takes `fallback`.
    """
    y = _as_labels(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape[0] == 0 or y.sum() == 0:
        return {"per_genre": [float(fallback)] * y.shape[1], "global": float(fallback),
                "fallback_genres": list(range(y.shape[1]))}
    global_t, _ = _best_f1_threshold(y.ravel(), s.ravel())
    per, fallback_genres = [], []
    for g in range(y.shape[1]):
        if y[:, g].sum() == 0:
            per.append(global_t)
            fallback_genres.append(g)
        else:
            per.append(_best_f1_threshold(y[:, g], s[:, g])[0])
    return {"per_genre": per, "global": global_t, "fallback_genres": fallback_genres}


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


# ----- presentation ----------------------------------------------------------------------------

def _fmt(x: float | None, width: int = 6) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a".rjust(width)
    return f"{x:.3f}".rjust(width)


def format_genre_table(report: Mapping) -> str:
    """The paper's Table 1 (micro P/R/F1 on train, validation, test) with macro, per-sample and mAP
    beside it, one row per model × threshold setting × split."""
    head = (f"{'model':<16}{'thresholds':<12}{'split':<12}"
            f"{'micro P':>8}{'R':>7}{'F1':>7}  |{'macro P':>8}{'R':>7}{'F1':>7}  |"
            f"{'sample P':>9}{'R':>7}{'F1':>7}  |{'mAP':>7}  |{'labels':>7}{'pred':>6}")
    lines = [head, "-" * len(head)]
    for name, model in report["models"].items():
        for setting, by_split in model["results"].items():
            for split, r in by_split.items():
                label = setting if setting != "top-k" else f"top-{model.get('k')}"
                if r is None:
                    lines.append(f"{name:<16}{label:<12}{split:<12}{'(no posters)':>22}")
                    continue
                mi, ma, sa = r["micro"], r["macro"], r["samples"]
                lines.append(
                    f"{name:<16}{label:<12}{split:<12}"
                    f"{_fmt(mi['precision'], 8)}{_fmt(mi['recall'], 7)}{_fmt(mi['f1'], 7)}  |"
                    f"{_fmt(ma['precision'], 8)}{_fmt(ma['recall'], 7)}{_fmt(ma['f1'], 7)}  |"
                    f"{_fmt(sa['precision'], 9)}{_fmt(sa['recall'], 7)}{_fmt(sa['f1'], 7)}  |"
                    f"{_fmt(r['map'], 7)}  |{r['labels_per_poster']:>7.2f}{r['predicted_per_poster']:>6.2f}")
            lines.append("")
    return "\n".join(lines).rstrip()


def format_genre_per_genre(report: Mapping) -> str:
    """Per-genre precision/recall/F1/support of the head at its calibrated thresholds on the
    report's per-genre split, with each baseline's F1 beside it."""
    split = report.get("per_genre_split")
    if split is None:
        return "(no labelled validation or test posters: no per-genre table)"
    main = report["head"]["name"]
    rows = report["models"][main]["results"]["calibrated"][split]["per_genre"]
    others = []
    for name, model in report["models"].items():
        if name == main:
            continue
        setting = "calibrated" if "calibrated" in model["results"] else "top-k"
        others.append((name, model["results"][setting][split]["per_genre"]))
    width = max([5] + [len(r["genre"]) for r in rows]) + 2
    head = (f"{'genre':<{width}}{'support':>8}{'thresh':>8}{'P':>7}{'R':>7}{'F1':>7}{'AP':>7}"
            + "".join(f"{(n + ' F1'):>{max(len(n) + 5, 10)}}" for n, _ in others))
    lines = [f"per genre on {split} ({main} at calibrated thresholds; baselines' F1 beside it)", head,
             "-" * len(head)]
    for g, r in enumerate(rows):
        lines.append(f"{r['genre']:<{width}}{r['support']:>8}{_fmt(r.get('threshold'), 8)}"
                     f"{_fmt(r['precision'], 7)}{_fmt(r['recall'], 7)}{_fmt(r['f1'], 7)}{_fmt(r.get('ap'), 7)}"
                     + "".join(f"{_fmt(o[g]['f1'], max(len(n) + 5, 10))}" for n, o in others))
    return "\n".join(lines)


def genre_f1_chart(genres: Sequence[str], series: Mapping[str, Sequence[float]], path: str | os.PathLike,
                   title: str = "per-genre F1") -> Path:
    """A grouped bar chart of per-genre F1, one bar colour per model, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(genres)
    names = list(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * n * max(1, len(names)) / 2 + 2), 4.2))
    width = 0.8 / max(1, len(names))
    x = np.arange(n)
    for i, name in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * width, list(series[name]), width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(list(genres), rotation=45, ha="right")
    # Headroom above 1.0 so the legend never covers a perfect score.
    ax.set_ylim(0, 1.18)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("F1")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(4, len(names)), loc="upper center", frameon=False)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tight_layout warns about crowded tick labels on many genres
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_genre_evaluation(report: dict, genres: Sequence[str], out: str | os.PathLike,
                           chart: str | os.PathLike | None = None) -> dict:
    """Save a genre evaluation report as JSON (atomically) and, when it has a per-genre split, its
    per-genre F1 chart as PNG. Records both paths in the report ("json", "chart") and returns it."""
    import json

    out = Path(out)
    chart = Path(chart) if chart is not None else out.with_suffix(".png")
    split = report["per_genre_split"]
    report["chart"] = None
    if split is not None:
        series = {}
        for name, model in report["models"].items():
            setting = "calibrated" if "calibrated" in model["results"] else "top-k"
            label = name if setting == "calibrated" else f"{name} top-{model['k']}"
            series[label] = [r["f1"] for r in model["results"][setting][split]["per_genre"]]
        genre_f1_chart(genres, series, chart, title=f"per-genre F1 on {split} (calibrated thresholds)")
        report["chart"] = str(chart)
    report["json"] = str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    return report
