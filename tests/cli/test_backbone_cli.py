"""`clipposter train backbone` end to end: train on a manifest's train split, embed with the result
through `--pretrained FILE`, and the refusals that name their flag."""
from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest

from helpers import run_cli

from clipposter.embedding.backbone import file_sha256
from clipposter.embedding.cache import EmbeddingCache

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FAST = ["--epochs", 2, "--batch-size", 16]


@pytest.fixture(scope="module")
def trained(synthetic_set, tmp_path_factory):
    """`train backbone --json` on the shared 120-poster manifest: (exit code, JSON payload, stderr, folder)."""
    from clipposter.cli.main import main

    folder, _ = synthetic_set
    out = tmp_path_factory.mktemp("backbone-cli") / "bb"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["train", "backbone", str(folder / "manifest.csv"), "--out", str(out), *map(str, FAST), "--json"])
    return code, json.loads(stdout.getvalue()) if code == 0 else None, stderr.getvalue(), out


def test_json_names_the_checkpoint_and_what_it_trained_on(trained, synthetic_set):
    code, payload, err, out = trained
    _, records = synthetic_set
    assert code == 0, err
    weights = out / "backbone.safetensors"
    assert payload["path"] == str(weights) and payload["sha256"] == file_sha256(weights)
    assert payload["posters"] == sum(r.split == "train" for r in records)
    assert payload["held_out"] == sum(r.split != "train" for r in records)
    assert len(payload["history"]) == 2 and payload["settings"]["texts"] == ["title", "tagline", "genres"]
    assert payload["usage"] == f"--backbone clipposter-tiny --pretrained {out / 'backbone.safetensors'}"
    assert err == ""  # --json: no progress bar


def test_the_trained_backbone_embeds_through_pretrained_file(trained, synthetic_set, tmp_path, capsys):
    _, payload, _, out = trained
    folder, records = synthetic_set
    code, stdout, err = run_cli(capsys, "embed", folder / "manifest.csv", "--cache", tmp_path / "cache",
                                *payload["usage"].split(), "--workers", 0, "--json")
    assert code == 0, err
    with EmbeddingCache.open(tmp_path / "cache") as cache:
        assert cache.identity.weights == "sha256:" + payload["sha256"]
        assert len(cache.records()) == len(records)


def test_progress_goes_to_stderr_and_the_summary_to_stdout(synthetic_set, tmp_path, capsys):
    folder, records = synthetic_set
    code, out, err = run_cli(capsys, "train", "backbone", folder / "manifest.csv", "--out", tmp_path / "bb",
                             "--epochs", 1, "--batch-size", 16)
    assert code == 0, err
    assert "training clipposter-tiny" in err and "loss=" in err
    lines = out.strip().splitlines()
    train = sum(r.split == "train" for r in records)
    assert lines[0].startswith(f"trained clipposter-tiny (3.4M parameters) on the {train} posters of the train split")
    assert "held out, not trained on" in lines[0]
    assert lines[-1] == f"use it: clipposter embed SOURCE --cache DIR --backbone clipposter-tiny --pretrained " \
                        f"{tmp_path / 'bb' / 'backbone.safetensors'}"


def test_a_large_architecture_on_cpu_is_refused_naming_force(synthetic_set, tmp_path, capsys):
    folder, _ = synthetic_set
    code, out, err = run_cli(capsys, "train", "backbone", folder / "manifest.csv", "--out", tmp_path / "bb",
                             "--arch", "ViT-B-32", "--device", "cpu")
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1
    assert lines[0].startswith("error: ViT-B-32 has 151M parameters") and "pass --force to train it anyway" in lines[0]
    assert "--device" in lines[0]


@pytest.mark.parametrize("flags, start", [
    (["--texts", "title,plot"], "error: --texts must name some of title, tagline, overview, genres"),
    (["--batch-size", 1], "error: --batch-size must be at least 2"),
    (["--epochs", 0], "error: --epochs must be at least 1"),
    (["--arch", "ViT-Q-99"], "error: --arch unknown open_clip architecture 'ViT-Q-99'"),
])
def test_bad_settings_are_one_line_naming_the_flag(synthetic_set, tmp_path, capsys, flags, start):
    folder, _ = synthetic_set
    code, out, err = run_cli(capsys, "train", "backbone", folder / "manifest.csv", "--out", tmp_path / "bb", *flags)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(start), err


def test_an_out_that_is_a_file_is_refused_before_training(synthetic_set, tmp_path, capsys):
    folder, _ = synthetic_set
    (tmp_path / "taken").write_text("x")
    code, out, err = run_cli(capsys, "train", "backbone", folder / "manifest.csv", "--out", tmp_path / "taken", *FAST)
    assert code == 2 and err == f"error: --out {tmp_path / 'taken'} is a file, not a folder\n"


def test_a_source_without_a_train_split_is_one_error(synthetic_set, tmp_path, capsys):
    folder, records = synthetic_set
    manifest = tmp_path / "held-out.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", "genres", "title", "split"])
        writer.writerows([r.id, r.image, "|".join(r.genres), r.title, "test"] for r in records[:10])
    code, out, err = run_cli(capsys, "train", "backbone", manifest, "--out", tmp_path / "bb", *FAST)
    assert code == 2 and err.startswith("error: none of the 10 posters is in the train split")
    assert not (tmp_path / "bb").exists()
