"""Genre metrics against hand counts: predictions at thresholds, P/R/F1 averages, AP, calibration,
the constant baseline, and the tables users read."""
import json

import numpy as np
import pytest

from clipposter.heads.genre.evaluation import format_genre_per_genre, format_genre_table, write_genre_evaluation
from clipposter.heads.genre.metrics import (genre_average_precision, genre_calibrate_thresholds, genre_constant_predictions,
                                            genre_constant_top_k, genre_per_genre, genre_predictions, genre_prf,
                                            genre_scores)

GENRES = ["Drama", "Comedy", "Horror"]
Y = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
P = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
# Hand counts per genre: Drama tp2 fp0 fn0; Comedy tp0 fp1 fn2; Horror tp0 fp1 fn0.


def test_predictions_use_greater_or_equal_per_genre_or_shared_threshold():
    scores = np.array([[0.5, 0.2, 0.9], [0.49, 0.3, 0.3]])
    assert genre_predictions(scores, 0.5).tolist() == [[1, 0, 1], [0, 0, 0]]
    assert genre_predictions(scores, [0.5, 0.2, 0.95]).tolist() == [[1, 1, 0], [0, 1, 0]]
    assert genre_predictions(scores, 0.5).dtype == np.int8


def test_prf_micro_macro_samples_against_hand_counts():
    r = genre_prf(Y, P)
    # micro: tp 2, fp 2, fn 2
    assert r["micro"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    # macro: Drama P1 R1 F1 1; Comedy 0 0 0; Horror 0 0 0 (undefined recall counts as 0)
    assert r["macro"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})
    # samples: p0 P1/2 R1; p1 P1 R1/2; p2 P0 R0; p3 (no labels, nothing predicted) 0 0
    assert r["samples"]["precision"] == pytest.approx((0.5 + 1 + 0 + 0) / 4)
    assert r["samples"]["recall"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert r["samples"]["f1"] == pytest.approx((2 / 3 + 2 / 3) / 4)
    with pytest.raises(ValueError, match=r"\(N, G\) matrix, got shape \(3,\)"):
        genre_prf([1, 0, 1], [1, 0, 1])
    # Scores above zero count as labels (a 0/1 matrix in another dtype, or soft labels).
    assert genre_prf(Y * 0.7, P)["micro"]["f1"] == pytest.approx(0.5)


def test_average_precision_per_genre_and_mean_skips_genres_without_positives():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    s = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.5], [0.1, 0.6, 0.5], [0.2, 0.9, 0.5]])
    per, mean = genre_average_precision(y, s)
    # Drama ranking 0.9(+) 0.8(-) 0.2(-) 0.1(+): AP = (1/1 + 2/4) / 2; Comedy 0.9(+) 0.7(+): AP 1.
    assert per[0] == pytest.approx(0.75) and per[1] == pytest.approx(1.0) and per[2] is None
    assert mean == pytest.approx(0.875)
    assert genre_average_precision(np.zeros((2, 2)), np.ones((2, 2))) == ([None, None], None)


def test_per_genre_rows():
    rows = genre_per_genre(Y, P, GENRES, ap=[0.9, None, 0.1], thresholds=[0.3, 0.4, 0.5])
    assert rows[0] == {"genre": "Drama", "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2,
                       "predicted": 2, "ap": 0.9, "threshold": 0.3}
    assert rows[1] == {"genre": "Comedy", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2,
                       "predicted": 1, "ap": None, "threshold": 0.4}
    assert rows[2]["support"] == 0 and rows[2]["predicted"] == 1 and rows[2]["threshold"] == 0.5
    bare = genre_per_genre(Y, P, GENRES)
    assert "ap" not in bare[0] and "threshold" not in bare[0]
    assert genre_per_genre(Y, P, GENRES, thresholds=0.5)[2]["threshold"] == 0.5


def test_scores_of_one_split():
    scores = np.array([[0.9, 0.6, 0.1], [0.8, 0.4, 0.2], [0.1, 0.3, 0.7], [0.2, 0.1, 0.3]])
    r = genre_scores(Y, scores, 0.5, GENRES)
    assert r["posters"] == 4
    assert r["micro"] == genre_prf(Y, P)["micro"]
    assert r["labels_per_poster"] == pytest.approx(4 / 4) and r["predicted_per_poster"] == pytest.approx(4 / 4)
    assert r["map"] == genre_average_precision(Y, scores)[1]
    assert [row["predicted"] for row in r["per_genre"]] == [2, 1, 1]
    assert genre_scores(np.zeros((0, 3)), np.zeros((0, 3)), 0.5, GENRES) is None


# The F1-best cut itself is checked with the small-split guards off (min_support=1, shrinkage=0);
# tests/heads/genre/test_calibration.py checks the guards.
PLAIN = {"min_support": 1, "shrinkage": 0}


def test_calibration_picks_the_best_f1_cut_halfway_below_it():
    y = np.array([[1], [1], [0], [1], [0]])
    s = np.array([[0.9], [0.8], [0.7], [0.6], [0.2]])
    # Cuts: >=0.9 F1 .5; >=0.8 F1 .8; >=0.7 F1 .667; >=0.6 F1 .857 (best); >=0.2 F1 .75.
    out = genre_calibrate_thresholds(y, s, **PLAIN)
    assert out["per_genre"] == [pytest.approx((0.6 + 0.2) / 2)]
    assert out["global"] == pytest.approx(0.4) and out["fallback_genres"] == []
    # The best cut at the lowest score keeps that score as the threshold (nothing lies below it).
    out = genre_calibrate_thresholds(np.array([[1], [1]]), np.array([[0.3], [0.6]]), **PLAIN)
    assert out["per_genre"] == [pytest.approx(0.3)]


def test_calibration_prefers_the_lower_threshold_among_equal_f1():
    y = np.array([[1], [0], [0], [1]])
    s = np.array([[0.9], [0.6], [0.5], [0.3]])
    # >=0.9: P1 R.5 F1 2/3; >=0.6: F1 .5; >=0.5: F1 .4; >=0.3: P.5 R1 F1 2/3 -> the lower cut (more recall).
    assert genre_calibrate_thresholds(y, s, **PLAIN)["per_genre"] == [pytest.approx(0.3)]


def test_calibration_fallbacks():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.9, 0.9], [0.1, 0.2], [0.8, 0.3]])
    out = genre_calibrate_thresholds(y, s, **PLAIN)
    assert out["fallback_genres"] == [1] and out["per_genre"][1] == out["global"]
    assert out["per_genre"][0] == pytest.approx((0.8 + 0.1) / 2)
    # With the default minimum support, two positives are too few for a threshold of its own.
    assert genre_calibrate_thresholds(y, s)["per_genre"] == [out["global"]] * 2
    empty = genre_calibrate_thresholds(np.zeros((3, 2)), s, fallback=0.4)
    assert empty == {"per_genre": [0.4, 0.4], "global": 0.4, "fallback_genres": [0, 1], "capped_genres": []}
    none = genre_calibrate_thresholds(np.zeros((0, 2)), np.zeros((0, 2)))
    assert none == {"per_genre": [0.5, 0.5], "global": 0.5, "fallback_genres": [0, 1], "capped_genres": []}


def test_constant_top_k_orders_by_training_frequency_and_picks_k_on_validation():
    train = np.array([[0, 1, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1]])  # freq .25 .75 .75
    val = np.array([[0, 1, 1], [0, 1, 1]])
    out = genre_constant_top_k(train, val)
    assert out["order"] == [1, 2, 0]  # ties in frequency keep vocabulary order
    assert out["frequency"] == [0.25, 0.75, 0.75]
    assert out["k"] == 2 and out["validation_f1"] == pytest.approx(1.0)
    assert genre_constant_top_k(train, val, max_k=1)["k"] == 1
    assert genre_constant_top_k(train, val, max_k=0)["k"] == 1
    # k = 1 (2tp/(2tp+fp+fn) = 2/4) and k = 3 (4/8) tie on this validation split: the smaller k is kept.
    tie = genre_constant_top_k(train, np.array([[0, 1, 0], [1, 0, 0]]))
    assert tie["k"] == 1
    # No validation posters: k is chosen on the training split.
    # (k=1: 2*3/(6+1+4); k=2: 12/(12+2+1) = 0.8; k=3: 14/(14+5))
    on_train = genre_constant_top_k(train, np.zeros((0, 3)))
    assert on_train["k"] == 2 and on_train["validation_f1"] == pytest.approx(0.8)
    no_train = genre_constant_top_k(np.zeros((0, 3)), val)
    assert no_train["frequency"] == [0.0, 0.0, 0.0] and no_train["order"] == [0, 1, 2]
    pred = genre_constant_predictions(2, [2, 0, 1], 2, 3)
    assert pred.tolist() == [[1, 0, 1], [1, 0, 1]] and pred.dtype == np.int8


def _report(with_split=True):
    def result(f1):
        prf = {"precision": 0.9, "recall": 0.25, "f1": f1}
        return {"micro": prf, "macro": prf, "samples": prf, "map": None, "labels_per_poster": 2.0,
                "predicted_per_poster": 1.25,
                "per_genre": [{"genre": g, "precision": 0.5, "recall": 0.5, "f1": f1 + i / 10, "support": 3,
                               "threshold": 0.4, "ap": 0.75} for i, g in enumerate(GENRES)]}
    split = "test" if with_split else None
    return {"per_genre_split": split, "head": {"name": "ml-decoder"},
            "models": {"ml-decoder": {"results": {"calibrated": {"test": result(0.5), "train": None}}},
                       "constant": {"k": 2, "results": {"top-k": {"test": result(0.25)}}}}}


def test_genre_table_shows_each_model_setting_and_split():
    text = format_genre_table(_report())
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["model", "thresholds", "split", "micro"]
    row = next(l for l in lines if l.startswith("ml-decoder") and "test" in l)
    assert row.split() == ["ml-decoder", "calibrated", "test", "0.900", "0.250", "0.500", "|", "0.900", "0.250",
                           "0.500", "|", "0.900", "0.250", "0.500", "|", "n/a", "|", "2.00", "1.25"]
    assert any(l.split()[:4] == ["ml-decoder", "calibrated", "train", "(no"] for l in lines)
    assert any(l.startswith("constant") and "top-2" in l and "0.250" in l for l in lines)


def test_per_genre_table_puts_baselines_beside_the_head():
    text = format_genre_per_genre(_report())
    lines = text.splitlines()
    assert lines[0] == "per genre on test (ml-decoder at calibrated thresholds; baselines' F1 beside it)"
    assert lines[1].split() == ["genre", "support", "thresh", "P", "R", "F1", "AP", "constant", "F1"]
    assert lines[3].split() == ["Drama", "3", "0.400", "0.500", "0.500", "0.500", "0.750", "0.250"]
    assert lines[5].split() == ["Horror", "3", "0.400", "0.500", "0.500", "0.700", "0.750", "0.450"]
    assert format_genre_per_genre(_report(False)).startswith("(no labelled validation or test posters")


def test_evaluation_is_written_as_json(tmp_path):
    report = write_genre_evaluation(_report(), GENRES, tmp_path / "eval" / "genres.json")
    saved = json.loads((tmp_path / "eval" / "genres.json").read_text())
    assert saved["json"] == str(tmp_path / "eval" / "genres.json") == report["json"]
    assert saved["chart"] is None  # the chart is the presentation layer's (clipposter.report.charts)
    assert saved["models"] == json.loads(json.dumps(_report()["models"]))
    assert not list((tmp_path / "eval").glob("*.tmp"))
    drawn = write_genre_evaluation({**_report(), "chart": "c.svg"}, GENRES, tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text())["chart"] == "c.svg" == drawn["chart"]


def test_calibration_skips_cuts_that_catch_no_positive():
    # The highest cut (>= 0.9) has precision and recall 0: its F1 is 0, not 0/0.
    out = genre_calibrate_thresholds(np.array([[0], [1]]), np.array([[0.9], [0.2]]), **PLAIN)
    assert out["per_genre"] == [pytest.approx(0.2)]


def test_calibration_can_choose_a_cut_whose_precision_and_recall_sum_to_one():
    # >= 0.8: P .5, R .5, F1 .5 (P + R = 1) beats predicting everything (P .2, R 1, F1 .333).
    y = np.array([[0], [1], [0], [0], [0], [0], [0], [0], [0], [1]])
    s = np.array([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4], [0.3], [0.2], [0.15], [0.1]])
    assert genre_calibrate_thresholds(y, s, **PLAIN)["per_genre"] == [pytest.approx(0.75)]


def test_calibration_on_a_single_labelled_poster():
    out = genre_calibrate_thresholds(np.array([[1, 0]]), np.array([[0.3, 0.8]]), **PLAIN)
    assert out == {"per_genre": [pytest.approx(0.3), pytest.approx(0.3)], "global": pytest.approx(0.3),
                   "fallback_genres": [1], "capped_genres": []}
