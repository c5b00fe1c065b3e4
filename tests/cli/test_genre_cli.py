"""`clipposter train genres`, `evaluate genres` and `predict` end to end on synthetic posters."""
from __future__ import annotations

import dataclasses
import json

import pytest

from clipposter.embedding.cache import EmbeddingCache
from clipposter.cli.main import main
from clipposter.embedding.embed import embed_records
from clipposter.records import PosterRecord
from clipposter.ingest.synthetic import generate_posters

SMALL = ["--width", 32, "--mlp-hidden", 32, "--heads", 2, "--dropout", 0.2, "--lr", 3e-3, "--epochs", 8,
         "--batch-size", 32]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_backbone, synthetic_set):
    """The 120 shared synthetic posters in a cache that has no prompt embeddings yet (training must
    load the backbone from the cache's recorded spec to encode them)."""
    _, records = synthetic_set
    d = tmp_path_factory.mktemp("genre-cli") / "cache"
    with EmbeddingCache.open(d, tiny_backbone.identity, backbone_spec=tiny_backbone.spec) as cache:
        embed_records([PosterRecord.from_dict(r.to_dict()) for r in records], cache, tiny_backbone, progress=False)
    return d


@pytest.fixture(scope="module")
def head_dir(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("genre-cli-head") / "head"
    code = main(["train", "genres", "--cache", str(cache_dir), "--out", str(out), "--json"] + [str(a) for a in SMALL])
    assert code == 0
    return out


def test_train_json_and_saved_folder(capsys, cache_dir, tmp_path):
    out = tmp_path / "h"
    code, stdout, err = run(capsys, "train", "genres", "--cache", cache_dir, "--out", out, *SMALL, "--json")
    assert code == 0, err
    payload = json.loads(stdout)
    assert payload["kind"] == "ml-decoder" and payload["out"] == str(out)
    assert payload["data"]["posters"]["train"] > 50 and payload["epochs_run"] >= 1
    assert set(payload["metrics"]["validation"]) == {"0.5", "calibrated"}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "genres.txt", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"]["width"] == 32 and cfg["thresholds"]["mode"] == "per-genre"


def test_train_text_output_and_baseline_kinds(capsys, cache_dir, tmp_path):
    code, stdout, _ = run(capsys, "train", "genres", "--cache", cache_dir, "--out", tmp_path / "lp",
                          "--model", "linear-probe", "--threshold-mode", "global")
    assert code == 0
    assert "linear-probe head over 8 genres" in stdout and "at calibrated thresholds (global)" in stdout
    code, stdout, _ = run(capsys, "train", "genres", "--cache", cache_dir, "--out", tmp_path / "zs",
                          "--model", "zero-shot", "--json")
    assert code == 0 and json.loads(stdout)["kind"] == "zero-shot"


def test_evaluate_writes_json_and_chart(capsys, head_dir, cache_dir, tmp_path):
    out = tmp_path / "eval" / "report.json"
    code, stdout, err = run(capsys, "evaluate", "genres", "--head", head_dir, "--cache", cache_dir, "--out", out)
    assert code == 0, err
    for needle in ("micro P", "macro P", "sample P", "mAP", "ml-decoder", "zero-shot", "linear-probe",
                   "constant", "calibrated", "validation", "per genre on test"):
        assert needle in stdout
    report = json.loads(out.read_text())
    assert report["chart"] == str(out.with_suffix(".svg"))
    assert "ml-decoder (head)" in out.with_suffix(".svg").read_text()
    code, stdout, _ = run(capsys, "evaluate", "genres", "--head", head_dir, "--cache", cache_dir, "--out", out,
                          "--baselines", "constant", "--json")
    assert code == 0
    assert set(json.loads(stdout)["models"]) == {"ml-decoder", "constant"}


def test_predict_cached_and_new_posters(capsys, head_dir, cache_dir, synthetic_set, tmp_path):
    _, records = synthetic_set
    fresh = generate_posters(tmp_path / "new", n=1, seed=123)[0].image  # not in any cache
    code, stdout, err = run(capsys, "predict", records[0].image, fresh, "--head", head_dir, "--cache", cache_dir,
                            "--top-k", 3, "--json")
    assert code == 0, err
    payload = json.loads(stdout)
    assert (payload["from_cache"], payload["encoded"]) == (1, 1)
    first, second = payload["predictions"]
    assert first["source"] == "cache" and second["source"] == "encoded"
    assert len(first["top"]) == 3 and set(first["probabilities"]) == set((head_dir / "genres.txt").read_text().split())
    # Without --cache every poster is encoded through the backbone named in the head.
    code, stdout, _ = run(capsys, "predict", records[0].image, "--head", head_dir, "--json")
    again = json.loads(stdout)["predictions"][0]
    assert again["source"] == "encoded"
    for g, p in first["probabilities"].items():
        assert again["probabilities"][g] == pytest.approx(p, abs=2e-3)  # float16 cache vs float32 encode
    code, stdout, _ = run(capsys, "predict", records[0].image, "--head", head_dir, "--cache", cache_dir,
                          "--top-k", 2)
    assert code == 0 and stdout.startswith(records[0].image + ": ") and "* = above" in stdout


def _predicted_by_hand(head_dir, cache_dir, records, setting) -> list[set[str]]:
    """Genres whose probability is >= their threshold, with the thresholds read from the head's
    config.json: the saved mode's thresholds by default, else the setting's."""
    from clipposter.heads.genre.head import GenreHead

    th = json.loads((head_dir / "config.json").read_text())["thresholds"]
    head = GenreHead.from_pretrained(head_dir)
    with EmbeddingCache.open(cache_dir) as cache:
        probs = head.predict_proba(cache.embeddings_for_ids([r.id for r in records]))
    chosen = th["mode"] if setting is None else setting
    cut = {"per-genre": th["per_genre"], "global": [th["global"]] * len(head.genres)}.get(chosen)
    cut = cut if cut is not None else [float(chosen)] * len(head.genres)
    return [{g for g, p, t in zip(head.genres, row, cut) if p >= t} for row in probs]


def _text_sets(stdout: str, paths: list[str], starred: bool) -> list[set[str]]:
    """The genres each line of `predict`'s text output names as predicted."""
    lines = stdout.splitlines()
    out = []
    for path, line in zip(paths, lines):
        assert line.startswith(path + ": "), line
        shown = line[len(path) + 2:]
        if starred:  # "Comedy 0.93*, Action 0.65": the starred ones
            out.append({item.rsplit(" ", 1)[0] for item in shown.split(", ") if item.endswith("*")})
        elif shown.startswith("(none above threshold"):
            out.append(set())
        else:  # "Comedy 0.93, Western 0.47": every listed genre
            out.append({item.rsplit(" ", 1)[0] for item in shown.split(", ")})
    assert len(out) == len(paths)
    return out


@pytest.fixture(scope="module")
def spread_head_dir(head_dir, tmp_path_factory):
    """The trained head with per-genre thresholds set apart from the global one (on its ~12
    validation posters every genre took the global threshold)."""
    import shutil

    out = tmp_path_factory.mktemp("genre-cli-spread") / "head"
    shutil.copytree(head_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    g = cfg["thresholds"]["global"]
    cfg["thresholds"]["per_genre"] = [min(0.95, max(0.05, g + (0.15 if i % 2 else -0.15)))
                                      for i in range(len(cfg["genres"]))]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_predict_shows_the_genres_at_or_above_their_threshold(capsys, spread_head_dir, cache_dir, synthetic_set):
    """JSON, the plain text list and the starred --top-k list, at the saved thresholds, the global
    one and a fixed cut: each names exactly the genres whose probability reaches the threshold."""
    head_dir = spread_head_dir
    _, records = synthetic_set
    records = records[:40]
    paths = [r.image for r in records]
    genres = (head_dir / "genres.txt").read_text().split()
    seen = {}
    for setting in (None, "global", "0.5"):
        expected = _predicted_by_hand(head_dir, cache_dir, records, setting)
        flag = [] if setting is None else ["--threshold", setting]
        code, stdout, err = run(capsys, "predict", *paths, "--head", head_dir, "--cache", cache_dir, *flag, "--json")
        assert code == 0, err
        payload = json.loads(stdout)
        assert [p["path"] for p in payload["predictions"]] == paths
        assert [set(p["predicted"]) for p in payload["predictions"]] == expected, setting
        code, stdout, _ = run(capsys, "predict", *paths, "--head", head_dir, "--cache", cache_dir, *flag)
        assert code == 0 and _text_sets(stdout, paths, starred=False) == expected, setting
        code, stdout, _ = run(capsys, "predict", *paths, "--head", head_dir, "--cache", cache_dir, *flag,
                              "--top-k", len(genres))
        assert code == 0 and _text_sets(stdout, paths, starred=True) == expected, setting
        seen[setting] = expected
    # the posters tell the settings apart, and genres are predicted: a wrong threshold or an empty list shows
    assert seen[None] != seen["global"] != seen["0.5"] != seen[None]
    assert sum(map(len, seen[None])) >= len(records)


def test_predict_unreadable_posters(capsys, head_dir, cache_dir, synthetic_set, tmp_path):
    _, records = synthetic_set
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    code, stdout, err = run(capsys, "predict", bad, records[1].image, "--head", head_dir, "--cache", cache_dir)
    assert code == 0
    assert f"warning: {bad}: empty file (0 bytes) (skipped)" in err
    assert stdout.startswith(records[1].image)
    code, _, err = run(capsys, "predict", bad, tmp_path / "missing.jpg", "--head", head_dir)
    assert code == 2 and err.strip().splitlines()[-1] == "error: none of the 2 posters could be read"


def test_predict_refuses_a_cache_of_another_backbone(capsys, head_dir, cache_dir, synthetic_set, tmp_path):
    other = tmp_path / "other"
    with EmbeddingCache.open(cache_dir) as cache:
        identity = dataclasses.replace(cache.identity, weights="sha256:" + "1" * 64)
    EmbeddingCache.open(other, identity).close()
    code, _, err = run(capsys, "predict", synthetic_set[1][0].image, "--head", head_dir, "--cache", other)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: the genre head") and "was trained on backbone" in line and str(other) in line
    code, _, err = run(capsys, "evaluate", "genres", "--head", head_dir, "--cache", other)
    assert code == 2 and "was trained on backbone" in err


@pytest.mark.parametrize("argv, message", [
    # library errors name the parameter; the command line names the flag that sets it
    (["--memory", "tokens"], "error: --memory 'tokens' needs ViT token sequences"),
    (["--heads", "3"], "error: --heads must divide width (32), got 3"),
    (["--pos-weight", "many"], "--pos-weight must be none, auto or a positive number"),
])
def test_train_bad_options_are_one_line_errors(capsys, cache_dir, tmp_path, argv, message):
    code, _, err = run(capsys, "train", "genres", "--cache", cache_dir, "--out", tmp_path / "h", *SMALL, *argv)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err


def test_train_with_fixed_vocabulary_reports_out_of_vocabulary(capsys, cache_dir, tmp_path):
    code, stdout, err = run(capsys, "train", "genres", "--cache", cache_dir, "--out", tmp_path / "h", *SMALL,
                            "--genres", "Drama,Comedy,Film-Noir", "--json")
    assert code == 0
    data = json.loads(stdout)["data"]
    assert data["genres"] == ["Drama", "Comedy", "Film-Noir"]
    assert data["out_of_vocabulary"]["Horror"] > 0 and "Drama" not in data["out_of_vocabulary"]
    assert data["missing_train_positives"] == ["Film-Noir"]
    assert "outside the head's vocabulary" in err and "no training poster is labelled Film-Noir" in err
    code, stdout, _ = run(capsys, "train", "genres", "--cache", cache_dir, "--out", tmp_path / "h2", *SMALL,
                          "--genres", "Drama", "--genres-from-data", "--json")
    data = json.loads(stdout)["data"]
    assert code == 0 and data["out_of_vocabulary"] == {} and len(data["genres"]) == 8


def test_train_on_cache_without_training_posters(capsys, cache_dir, tmp_path):
    d = tmp_path / "c"
    with EmbeddingCache.open(cache_dir) as src, EmbeddingCache.open(d, src.identity, backbone_spec=src.backbone_spec) as dst:
        recs = [r for r in src.records() if r.split != "train"]
        emb = src.embeddings_for_ids([r.id for r in recs])
        hashes = [f"{i:064x}" for i in range(len(recs))]
        dst.add_posters(hashes, emb, list(zip(recs, hashes)))
    code, _, err = run(capsys, "train", "genres", "--cache", d, "--out", tmp_path / "h", "--genres", "Drama")
    assert code == 2 and "has no labelled training posters" in err and "Traceback" not in err


def test_predict_bad_threshold_and_top_k(capsys, head_dir, synthetic_set):
    poster = synthetic_set[1][0].image
    code, _, err = run(capsys, "predict", poster, "--head", head_dir, "--threshold", "lots")
    assert code == 2 and "--threshold must be calibrated, per-genre, global or a number" in err
    code, _, err = run(capsys, "predict", poster, "--head", head_dir, "--top-k", 0)
    assert code == 2 and "--top-k must be at least 1" in err


# ================================================================ small data, overwrite, threads ==

def test_train_on_few_posters_says_it_uses_the_small_data_settings(capsys, cache_dir, tmp_path):
    code, stdout, err = run(capsys, "train", "genres", "--cache", cache_dir, "--out", tmp_path / "h", "--epochs", 2)
    assert code == 0, err
    line = next(l for l in stdout.splitlines() if l.startswith("small data"))
    n = json.loads((tmp_path / "h" / "config.json").read_text())["data"]["posters"]["train"]
    assert line == (f"small data ({n} training posters < 5000): --width 64, --mlp-hidden 64, --heads 4, "
                    f"--dropout 0.3, --lr 0.001, --batch-size 32, --patience 5; pass --no-small-data or explicit "
                    f"flags to override")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["architecture"]["width"] == 64 and cfg["training"]["lr"] == 1e-3 and cfg["training"]["epochs"] == 2
    # Explicit flags win one by one; --no-small-data restores every default.
    code, stdout, _ = run(capsys, "train", "genres", "--cache", cache_dir, "--out", tmp_path / "w", "--epochs", 1,
                          "--width", 32, "--lr", 0.01, "--json")
    payload = json.loads(stdout)
    assert code == 0 and payload["small_data"]["architecture"] == {"mlp_hidden": 64, "num_heads": 4, "dropout": 0.3}
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert (cfg["architecture"]["width"], cfg["training"]["lr"], cfg["training"]["batch_size"]) == (32, 0.01, 32)
    code, stdout, _ = run(capsys, "train", "genres", "--cache", cache_dir, "--out", tmp_path / "p", "--epochs", 1,
                          "--no-small-data")
    assert code == 0 and "small data" not in stdout
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (cfg["architecture"]["width"], cfg["training"]["lr"], cfg["training"]["batch_size"]) == (768, 1e-4, 256)


def test_train_refuses_to_replace_a_head_without_overwrite(capsys, cache_dir, tmp_path):
    out = tmp_path / "h"
    code, _, err = run(capsys, "train", "genres", "--cache", cache_dir, "--out", out, *SMALL)
    assert code == 0, err
    (out / "evaluation.json").write_text("{}")  # what `evaluate genres` wrote for this head
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, stdout, err = run(capsys, "train", "genres", "--cache", cache_dir, "--out", out, *SMALL, "--seed", 1)
    assert code == 2 and stdout == ""
    assert err.strip().splitlines() == [f"error: --overwrite is off, but {out} already holds a genre head; turn it "
                                        f"on to replace it, or train into another out folder"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # With --overwrite the new head replaces it, and the old head's evaluation goes with it.
    code, _, err = run(capsys, "train", "genres", "--cache", cache_dir, "--out", out, *SMALL, "--seed", 1,
                       "--overwrite")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["training"]["seed"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "genres.txt", "model.safetensors"]


def test_train_into_a_file_is_a_one_line_error(capsys, cache_dir, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("not a folder")
    code, stdout, err = run(capsys, "train", "genres", "--cache", cache_dir, "--out", out, *SMALL)
    assert code == 2 and stdout == "" and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: --out {out} is a file; give a folder for the head"]


def test_threads_flag_sets_torch_threads_and_rejects_zero(capsys, cache_dir, tmp_path, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    code, _, err = run(capsys, "train", "genres", "--cache", cache_dir, "--out", tmp_path / "h", *SMALL,
                       "--epochs", 1, "--threads", 3)
    assert code == 0, err
    assert calls == [3]
    code, _, _ = run(capsys, "train", "genres", "--cache", cache_dir, "--out", tmp_path / "h2", *SMALL, "--epochs", 1)
    assert code == 0 and calls == [3]  # no flag: the thread count is left alone
    code, _, err = run(capsys, "train", "genres", "--cache", cache_dir, "--out", tmp_path / "h3", "--threads", 0)
    assert code == 2 and err.strip().splitlines() == ["error: --threads must be at least 1, got 0"]


def test_predict_with_a_head_holding_nan_weights_is_a_one_line_error(capsys, head_dir, synthetic_set, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "head"
    shutil.copytree(head_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    name = next(k for k in sorted(state) if state[k].is_floating_point() and k != "head.genre_text")
    state[name] = torch_full_nan(state[name])
    save_file(state, str(broken / "model.safetensors"))
    code, stdout, err = run(capsys, "predict", synthetic_set[1][0].image, "--head", broken)
    assert code == 2 and stdout == ""
    n = state[name].numel()
    assert err.strip().splitlines() == [f"error: {broken / 'model.safetensors'}: tensor {name} holds NaN ({n} of {n} "
                                        f"values); the file is damaged or the training diverged: retrain the head"]


def torch_full_nan(t):
    import torch

    return torch.full_like(t, float("nan"))
