"""Evaluating a genre head: `evaluate_genres` (also exported as `evaluate`) scores the head and its
baselines on every split of a cache; the writers turn that report into the text tables of
`clipposter evaluate genres`, a JSON file (the per-genre F1 chart is the report's SVG chart).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clipposter.errors import ClipposterError, ConfigError
from clipposter.files import write_json
from clipposter.heads.genre.baselines import fit_linear_probe, zero_shot_head
from clipposter.heads.genre.config import BASELINES
from clipposter.heads.genre.data import load_genre_data, memory_inputs
from clipposter.heads.genre.head import GenreHead
from clipposter.heads.genre.metrics import genre_calibrate_thresholds, genre_constant_top_k, genre_scores
from clipposter.records import SPLITS

__all__ = ["evaluate_genres", "evaluate", "format_genre_table", "format_genre_per_genre",
           "write_genre_evaluation"]


def evaluate_genres(head: GenreHead, cache, *, baselines: Sequence[str] = BASELINES,
                    probe_c: float = 1.0, seed: int = 0, progress: bool = True) -> dict:
    """The head and its baselines on every split of `cache`: the report `clipposter evaluate genres`
    prints and writes. The head is scored at 0.5 and at its saved calibrated thresholds; the zero-shot
    and linear-probe baselines are built here on the cache's training split over the head's
    genres and calibrated on its validation split; the constant baseline predicts the k most frequent
    training genres for every poster, with k chosen on validation."""
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError("baselines", f"must be chosen from {', '.join(BASELINES)}, got {unknown[0]!r}")
    head.check_backbone(cache.identity, f"the cache {cache.root}")
    data = load_genre_data(cache, head.genres)
    g = len(head.genres)
    splits = {s: data.splits[s] for s in SPLITS}
    half = np.full(g, 0.5)

    def score_model(name: str, head_like: GenreHead, calibrated: np.ndarray) -> dict:
        probs = {s: head_like.predict_proba(memory_inputs(cache, d, head_like.memory)) for s, d in splits.items()}
        return {
            "kind": head_like.kind,
            "thresholds": {"0.5": half.tolist(), "calibrated": calibrated.tolist()},
            "results": {setting: {s: genre_scores(d.labels, probs[s], t, head.genres) for s, d in splits.items()}
                        for setting, t in (("0.5", half), ("calibrated", calibrated))},
        }

    main_name = head.kind
    models: dict[str, dict] = {main_name: score_model(main_name, head, head.thresholds_for())}
    val = splits["validation"]
    train_freq = splits["train"].labels.mean(0) if len(splits["train"].ids) else None
    if "zero-shot" in baselines and head.kind != "zero-shot":
        if head.genre_text is None:
            raise ClipposterError(f"the head {head.source} stores no genre prompt embeddings; retrain it")
        zs = zero_shot_head(head.genres, head.genre_text, head.identity, head.backbone_spec, head.templates)
        cal = genre_calibrate_thresholds(val.labels, zs.predict_proba(val.embeddings), train_frequency=train_freq)
        models["zero-shot"] = score_model("zero-shot", zs, np.asarray(cal["per_genre"]))
    if "linear-probe" in baselines and head.kind != "linear-probe" and len(splits["train"].ids):
        module, _ = fit_linear_probe(splits["train"].embeddings, splits["train"].labels, c=probe_c, seed=seed,
                                     progress=progress, genres=head.genres)
        lp = GenreHead("linear-probe", head.genres, module, identity=head.identity,
                       backbone_spec=head.backbone_spec, config={"embed_dim": cache.dim, "num_genres": g, "C": probe_c})
        cal = genre_calibrate_thresholds(val.labels, lp.predict_proba(val.embeddings), train_frequency=train_freq)
        models["linear-probe"] = score_model("linear-probe", lp, np.asarray(cal["per_genre"]))
    if "constant" in baselines and len(splits["train"].ids):
        const = genre_constant_top_k(splits["train"].labels, val.labels)
        k, order, freq = const["k"], const["order"], np.asarray(const["frequency"])
        # Scores are the training frequencies (the same for every poster, so AP = prevalence); the
        # thresholds pick exactly the top k: 0 for them (always reached), 2 for the rest (never).
        cut = np.full(g, 2.0)
        cut[order[:k]] = 0.0
        results = {s: genre_scores(d.labels, np.tile(freq, (len(d.ids), 1)), cut, head.genres)
                   for s, d in splits.items()}
        models["constant"] = {"kind": "constant", "k": k, "genres": [head.genres[i] for i in order[:k]],
                              "results": {"top-k": results}}
    per_split = next((s for s in ("test", "validation") if len(splits[s].ids)), None)
    return {
        "head": {"name": main_name, "kind": head.kind, "path": str(head.source) if head.source else None,
                 "genres": head.genres, "threshold_mode": head.thresholds["mode"]},
        "cache": str(cache.root),
        "backbone": head.identity.to_dict(),
        "posters": {s: len(d.ids) for s, d in splits.items()},
        "data": data.summary(),
        "warnings": data.warnings(),
        "models": models,
        "per_genre_split": per_split,
    }


evaluate = evaluate_genres


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


def write_genre_evaluation(report: dict, genres: Sequence[str], out: str | os.PathLike) -> dict:
    """Save a genre evaluation report as JSON (atomically). Records its path in the report ("json") and
    returns it. The per-genre F1 chart is drawn by the presentation layer (`clipposter.report.charts`);
    a caller that wrote one records its path in report["chart"] before saving."""
    out = Path(out)
    report.setdefault("chart", None)
    report["json"] = str(out)
    write_json(out, report)
    return report
