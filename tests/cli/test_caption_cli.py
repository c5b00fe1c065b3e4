"""`clipposter train captions`, `caption` and `evaluate captions`, run in-process through cli.main."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

import lm_fixtures
from clipposter.embedding.cache import EmbeddingCache
from clipposter.cli.main import main


pytestmark = pytest.mark.usefixtures("single_torch_thread")




@pytest.fixture(scope="module")
def head_dir(tmp_path_factory, tiny_backbone):
    return lm_fixtures.trained_head(tmp_path_factory, tiny_backbone)[0]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_train_resume_and_refuse_overwrite(capsys, caption_cache_dir, tiny_lm_dir, tmp_path):
    out = tmp_path / "head"
    common = ["train", "captions", "--cache", caption_cache_dir, "--out", out, "--lm", tiny_lm_dir, "--prefix-length", 4,
              "--max-tokens", 16, "--lr", 3e-3, "--batch-size", 32, "--device", "cpu"]
    code, stdout, _ = run(capsys, *common, "--epochs", 1, "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["epochs"] == 1 and summary["train_examples"] > 300 and summary["target"] == "tagline"
    assert summary["skipped"] == {"train": 0, "validation": 0}
    for name in ("config.json", "mapper.safetensors", "lm/config.json", "lm/tokenizer.json",
                 "checkpoints/latest.json"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "caption" and config["backbone_spec"]["pretrained"]

    code, _, err = run(capsys, *common, "--epochs", 2)
    assert code == 2 and "--resume" in error_line(err)
    code, stdout, _ = run(capsys, *common, "--epochs", 2, "--resume")
    assert code == 0 and "resumed after epoch 1" in stdout and "epoch 2: train loss" in stdout


def test_train_overview_target(capsys, caption_cache_dir, tiny_lm_dir, tmp_path):
    code, stdout, _ = run(capsys, "train", "captions", "--cache", caption_cache_dir, "--out", tmp_path / "plots",
                          "--lm", tiny_lm_dir, "--target", "overview", "--max-tokens", 8, "--prefix-length", 2,
                          "--epochs", 1, "--batch-size", 64, "--mode", "prefix", "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["target"] == "overview" and summary["mode"] == "prefix"
    assert summary["truncated"]["train"] > 0  # overviews are longer than 8 tokens


def test_caption_posters_from_the_cache_and_encoded_on_the_fly(capsys, caption_cache_dir, head_dir, tmp_path):
    with EmbeddingCache.open(caption_cache_dir) as cache:
        record = cache.records("test")[0]
    # A poster the cache has never seen: the same picture saved again as PNG (new bytes, new hash).
    fresh = tmp_path / "new-poster.png"
    Image.open(record.image).save(fresh)
    code, stdout, _ = run(capsys, "caption", record.image, fresh, record.id, "--head", head_dir, "--cache",
                          caption_cache_dir, "--strategy", "beam", "--num-return", 2, "--max-new-tokens", 12, "--json")
    assert code == 0
    result = json.loads(stdout)
    assert [r["source"] for r in result["results"]] == ["cache", "encoded", "cache"]
    assert all(len(r["captions"]) == 2 for r in result["results"])
    assert result["decoding"]["num_beams"] == 4 and result["decoding"]["max_new_tokens"] == 12
    # Without a cache every poster is encoded with the backbone recorded in the head.
    code, stdout, _ = run(capsys, "caption", fresh, "--head", head_dir, "--strategy", "greedy")
    assert code == 0 and stdout.startswith(f"{fresh}: ") and len(stdout.strip().splitlines()) == 1


def test_evaluate_captions_report(capsys, caption_cache_dir, head_dir, tmp_path):
    report_file = tmp_path / "report.json"
    code, stdout, _ = run(capsys, "evaluate", "captions", "--cache", caption_cache_dir, "--head", head_dir, "--split",
                          "validation", "--limit", 30, "--samples", 4, "--out", report_file)
    assert code == 0
    for needle in ("cosine", "margin", "retr@10", "chance (random train)", "constant (best train)", "constant text",
                   "strategy lstm", "reference"):
        assert needle in stdout
    report = json.loads(report_file.read_text())
    assert report["posters"] == 30 and len(report["samples"]) == 4 and report["split"] == "validation"
    assert set(report["scores"]["systems"]) == {"generated", "chance", "constant"}
    for metrics in report["scores"]["systems"].values():
        assert set(metrics) == {"cosine", "margin", "retrieval", "bleu", "distinct_1", "distinct_2",
                                "identical_share"}
    code, stdout, _ = run(capsys, "evaluate", "captions", "--cache", caption_cache_dir, "--head", head_dir, "--limit", 5,
                          "--strategy", "poster2plot", "--json")
    assert code == 0 and json.loads(stdout)["decoding"]["no_repeat_ngram_size"] == 3


def _evaluate(capsys, cache_dir, head_dir, split) -> dict:
    code, stdout, _ = run(capsys, "evaluate", "captions", "--cache", cache_dir, "--head", head_dir, "--split", split,
                          "--json")
    assert code == 0
    return json.loads(stdout)


def _margin(reports, system="generated") -> float:
    """A system's margin averaged over the scored splits (one ~90-poster split wanders by ±0.02)."""
    return sum(r["scores"]["systems"][system]["margin"] for r in reports) / len(reports)


def test_evaluation_shows_the_constant_tagline_high_on_cosine_and_zero_on_margin(capsys, caption_cache_dir, head_dir):
    """The paper's cosine rewards one generic tagline given to every poster. What `evaluate captions`
    prints and writes carries that constant and the chance baseline beside the head, and the margin
    that exposes the constant: zero by construction, while the trained head's clears chance."""
    reports = [_evaluate(capsys, caption_cache_dir, head_dir, split) for split in lm_fixtures.SCORED_SPLITS]
    for report in reports:
        systems = report["scores"]["systems"]
        constant, chance = systems["constant"], systems["chance"]
        assert constant["identical_share"] == 1.0
        # A high cosine (well above a random other tagline's) with no margin at all.
        assert constant["cosine"] > chance["cosine"] + 0.04, systems
        assert abs(constant["margin"]) < 1e-6
    assert _margin(reports) > _margin(reports, "chance") + lm_fixtures.MARGIN_GAP

    # The table the user reads says the same.
    code, stdout, _ = run(capsys, "evaluate", "captions", "--cache", caption_cache_dir, "--head", head_dir,
                          "--split", "test")
    assert code == 0
    rows = {line[:24].strip(): line[24:].split() for line in stdout.splitlines()
            if line.startswith(("generated", "chance (random train)", "constant (best train)"))}
    test = reports[-1]["scores"]
    assert set(rows) == {"generated", "chance (random train)", "constant (best train)"}
    assert float(rows["constant (best train)"][0]) == pytest.approx(test["systems"]["constant"]["cosine"], abs=5e-4)
    assert float(rows["constant (best train)"][1]) == 0.0
    assert f"constant text: {test['constant_text']!r}" in stdout and "margin of any constant output: 0" in stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_evaluation_tells_a_trained_head_from_one_blind_to_its_posters(capsys, caption_cache_dir, head_dir,
                                                                       tmp_path_factory, tiny_backbone):
    """The same head trained on other posters' embeddings (see test_captions for three seeds):
    the margin `evaluate captions` reports separates it from the trained head, and the constant
    tagline beats it on the paper's cosine. (~30 s alone, free after test_captions)"""
    blind_dir = lm_fixtures.seeded_head(tmp_path_factory, tiny_backbone, 0, shuffled=True)[0]
    trained = [_evaluate(capsys, caption_cache_dir, head_dir, split) for split in lm_fixtures.SCORED_SPLITS]
    blind = [_evaluate(capsys, caption_cache_dir, blind_dir, split) for split in lm_fixtures.SCORED_SPLITS]
    assert _margin(trained) > _margin(blind) + lm_fixtures.MARGIN_GAP
    for report in blind:
        systems = report["scores"]["systems"]
        assert systems["constant"]["cosine"] > systems["generated"]["cosine"]


def test_errors_are_one_line(capsys, caption_cache_dir, head_dir, tiny_lm_dir, tmp_path, monkeypatch):
    code, _, err = run(capsys, "caption", tmp_path / "missing.jpg", "--head", head_dir)
    assert code == 2 and "not an image file" in error_line(err)
    code, _, err = run(capsys, "caption", tmp_path / "x.jpg", "--head", tmp_path)
    assert code == 2 and "not a caption head" in error_line(err)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, _, err = run(capsys, "caption", broken, "--head", head_dir)
    assert code == 2 and "broken.jpg" in error_line(err)

    # A head whose recorded backbone differs from the cache's is refused, naming both.
    other = tmp_path / "other-head"
    shutil.copytree(head_dir, other, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((other / "config.json").read_text())
    config["backbone"]["weights"] = "sha256:0000"
    (other / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "evaluate", "captions", "--cache", caption_cache_dir, "--head", other, "--limit", 3)
    assert code == 2 and "was made with backbone" in error_line(err)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "train", "captions", "--cache", caption_cache_dir, "--out", tmp_path / "h", "--lm", "gpt2")
    line = error_line(err)
    assert code == 2 and line.startswith("error: --lm 'gpt2' cannot be loaded offline")
    code, _, err = run(capsys, "evaluate", "captions", "--cache", caption_cache_dir, "--head", head_dir,
                       "--sentence-model", tmp_path / "no-model")
    line = error_line(err)
    assert code == 2 and line.startswith("error: --sentence-model ") and "cannot be loaded" in line
    code, _, err = run(capsys, "caption", "x", "--head", head_dir, "--strategy", "greedy", "--num-return", 2)
    assert code == 2 and "greedy decoding gives one candidate" in error_line(err)
    code, _, err = run(capsys, "train", "captions", "--cache", caption_cache_dir, "--out", tmp_path / "h2", "--lm", tiny_lm_dir,
                       "--epochs", 0)
    assert code == 2 and "--epochs must be at least 1" in error_line(err)


def test_cli_strategy_list_matches_the_decoder():
    import clipposter.cli.common as common
    import clipposter.heads.caption.decoding as decoding

    assert common.STRATEGY_CHOICES == decoding.STRATEGIES
    assert common.DEFAULT_STRATEGY == decoding.DEFAULT_STRATEGY


def test_training_progress_goes_to_stderr_and_results_to_stdout(capsys, caption_cache_dir, tiny_lm_dir, tmp_path):
    out = tmp_path / "head"
    code, stdout, stderr = run(capsys, "train", "captions", "--cache", caption_cache_dir, "--out", out, "--lm",
                               tiny_lm_dir, "--prefix-length", 4, "--max-tokens", 12, "--lr", 3e-3, "--epochs", 2,
                               "--keep-checkpoints", 2)
    assert code == 0
    # stdout: the summary only, whose one loss line is the last epoch's.
    assert [line for line in stdout.splitlines() if "train loss" in line] == [
        line for line in stdout.splitlines() if line.startswith("epoch 2: train loss")]
    assert "epoch 1:" not in stdout and "/epoch" not in stdout and stdout.rstrip().endswith(f"head written to {out}")
    # stderr: each epoch's losses and, once, the time estimate.
    assert "epoch 1: train loss" in stderr and "epoch 2: train loss" in stderr
    assert stderr.count("/epoch, ≈ ") == 1
    assert sorted(p.name for p in (out / "checkpoints").glob("epoch-*")) == ["epoch-0001", "epoch-0002"]


def test_threads_flag_sets_torch_threads(capsys, caption_cache_dir, head_dir, tmp_path):
    import torch

    with EmbeddingCache.open(caption_cache_dir) as cache:
        poster = cache.records("test")[0].id
    code, stdout, _ = run(capsys, "caption", poster, "--head", head_dir, "--cache", caption_cache_dir, "--strategy",
                          "greedy", "--threads", 2)
    assert code == 0 and stdout.startswith(f"{poster}: ") and torch.get_num_threads() == 2
    for argv in (["caption", poster, "--head", head_dir],
                 ["evaluate", "captions", "--cache", caption_cache_dir, "--head", head_dir],
                 ["train", "captions", "--cache", caption_cache_dir, "--out", tmp_path / "h"]):
        code, _, err = run(capsys, *argv, "--threads", 0)
        assert code == 2 and error_line(err) == "error: --threads must be at least 1, got 0"
    assert not (tmp_path / "h").exists()


def test_train_captions_on_a_gguf_language_model(capsys, caption_cache_dir, tmp_path_factory, tmp_path):
    pytest.importorskip("gguf", reason="GGUF files need the gguf package: pip install -e '.[gguf]'")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate")
    gguf_file, _ = lm_fixtures.tiny_gguf(tmp_path_factory)
    out = tmp_path / "head"
    code, stdout, _ = run(capsys, "train", "captions", "--cache", caption_cache_dir, "--out", out, "--lm", gguf_file,
                          "--prefix-length", 4, "--max-tokens", 12, "--lr", 3e-3, "--epochs", 1, "--batch-size", 64,
                          "--keep-checkpoints", 0, "--json")
    assert code == 0 and json.loads(stdout)["epochs"] == 1
    assert json.loads((out / "lm" / "config.json").read_text())["model_type"] == "llama"
    assert not (out / "checkpoints").exists()
    code, _, err = run(capsys, "train", "captions", "--cache", caption_cache_dir, "--out", tmp_path / "h2", "--lm",
                       tmp_path / "missing.gguf")
    line = error_line(err)
    assert code == 2 and line.startswith("error: --lm ") and "no such file" in line and "offline" not in line
