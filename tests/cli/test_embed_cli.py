"""`clipposter embed` on an existing cache: it reuses the cache's backbone, loads no model when every
poster and text is cached, shows progress for text encoding, and keeps failure messages whole."""
from __future__ import annotations

import csv
import json
import re

import pytest

import clipposter.embedding.backbone as backbone_module
from clipposter.embedding.cache import EmbeddingCache
from helpers import run_cli, tiny_args

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def subset_manifest(path, synthetic_set, start: int, stop: int):
    """A manifest of synthetic posters start..stop-1 (absolute image paths), with their texts."""
    src, _ = synthetic_set
    with open(src / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[start:stop]
    for row in rows:
        row["image"] = str(src / row["image"])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def forbid_loading(monkeypatch) -> list:
    """Make any model load fail loudly; returns the list of attempted loads."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"load_backbone{args} called although nothing needed encoding")

    monkeypatch.setattr(backbone_module, "load_backbone", refuse)
    return calls


def count_loads(monkeypatch) -> list:
    calls = []
    real = backbone_module.load_backbone

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(backbone_module, "load_backbone", counting)
    return calls


@pytest.fixture
def embedded(tmp_path, capsys, tiny_checkpoint, synthetic_set):
    """A cache of the first 20 synthetic posters and their texts, made with the tiny checkpoint."""
    manifest = subset_manifest(tmp_path / "first.csv", synthetic_set, 0, 20)
    code, _, err = run_cli(capsys, "embed", manifest, "--cache", tmp_path / "cache", *tiny_args(tiny_checkpoint))
    assert code == 0, err
    return tmp_path / "cache"


def test_embed_without_backbone_flags_reuses_the_caches_backbone(embedded, tmp_path, capsys, synthetic_set,
                                                                 tiny_checkpoint, monkeypatch):
    manifest = subset_manifest(tmp_path / "more.csv", synthetic_set, 0, 30)
    loads = count_loads(monkeypatch)
    code, out, err = run_cli(capsys, "embed", manifest, "--cache", embedded, "--json")
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert (summary["encoded"], summary["cached"]) == (10, 20)
    # the backbone recorded in cache.json: the tiny architecture from its checkpoint, loaded once
    assert loads == [("clipposter-tiny", str(tiny_checkpoint.resolve()))]
    with EmbeddingCache.open(embedded) as cache:
        assert cache.num_posters == 30 and cache.identity.model == "clipposter-tiny"


def test_a_different_backbone_for_an_existing_cache_is_one_line(embedded, capsys, synthetic_set, monkeypatch):
    src, _ = synthetic_set
    loads = forbid_loading(monkeypatch)
    # another architecture: refused from the cache's record, before any model is loaded or downloaded
    code, _, err = run_cli(capsys, "embed", src / "manifest.csv", "--cache", embedded, "--backbone", "ViT-B-32")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "was made with backbone clipposter-tiny" in lines[0] and "--backbone" in lines[0]
    assert loads == []
    # the same architecture with other weights
    code, _, err = run_cli(capsys, "embed", src / "manifest.csv", "--cache", embedded, "--pretrained", "random")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "was made with backbone" in err
    assert loads == []


def test_another_dtype_for_an_existing_cache_is_one_line_and_the_stored_one_is_kept(embedded, tmp_path, capsys,
                                                                                   synthetic_set, monkeypatch):
    manifest = subset_manifest(tmp_path / "more.csv", synthetic_set, 0, 25)
    loads = forbid_loading(monkeypatch)
    code, _, err = run_cli(capsys, "embed", manifest, "--cache", embedded, "--dtype", "float32")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--dtype" in lines[0] and "float16" in lines[0], err
    assert loads == []
    with EmbeddingCache.open(embedded, mode="r") as cache:
        assert (cache.dtype, cache.num_posters) == ("float16", 20)  # nothing was added in another type
    # naming the stored type, or none, adds to the cache as before
    monkeypatch.undo()
    code, out, err = run_cli(capsys, "embed", manifest, "--cache", embedded, "--dtype", "float16", "--json")
    assert code == 0, err
    assert json.loads(out)["cache"]["posters"] == 25


@pytest.mark.parametrize("flags", ["none", "tiny"])
def test_fully_cached_rerun_loads_no_model(embedded, tmp_path, capsys, synthetic_set, tiny_checkpoint,
                                           monkeypatch, flags):
    manifest = subset_manifest(tmp_path / "again.csv", synthetic_set, 0, 20)
    loads = forbid_loading(monkeypatch)
    argv = ["embed", manifest, "--cache", embedded] + (tiny_args(tiny_checkpoint) if flags == "tiny" else [])
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert loads == []
    assert "20 posters: all already cached" in out
    assert "posters/s" not in out
    code, out, err = run_cli(capsys, *argv, "--json")
    summary = json.loads(out)["summary"]
    assert code == 0 and summary["encoded"] == 0 and summary["cached"] == 20
    assert summary["posters_per_second"] is None


def test_text_encoding_shows_progress_on_stderr(tmp_path, capsys, synthetic_set, tiny_checkpoint):
    manifest = subset_manifest(tmp_path / "m.csv", synthetic_set, 0, 10)
    code, out, err = run_cli(capsys, "embed", manifest, "--cache", tmp_path / "c", *tiny_args(tiny_checkpoint))
    assert code == 0
    assert re.search(r"encoding texts.*\d+/\d+", err), err[-2000:]
    assert "encoding texts" not in out
    code, out, err = run_cli(capsys, "embed", subset_manifest(tmp_path / "n.csv", synthetic_set, 10, 20),
                             "--cache", tmp_path / "c", "--json")
    assert code == 0 and "encoding texts" not in err and json.loads(out)["texts"] > 0


LONG_HUB_ERROR = ("Failed to download file (open_clip_pytorch_model.bin) for timm/vit_base_patch32_clip_224.openai. "
                  "Last error: An error happened while trying to locate the file on the Hub and we cannot find the "
                  "requested files in the local cache. Please check your connection and try again or make sure "
                  "your Internet connection is on. If you are behind a proxy, set HTTPS_PROXY to its address; if the "
                  "files are in another cache folder, point HF_HUB_CACHE at it and set HF_HUB_OFFLINE=1 so that no "
                  "request is made.\nTraceback details on the next line")


def test_a_failed_weight_download_is_one_line_and_not_cut_mid_word(tmp_path, capsys, synthetic_set, monkeypatch):
    import open_clip

    def fail(*args, **kwargs):
        raise RuntimeError(LONG_HUB_ERROR)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fail)
    manifest = subset_manifest(tmp_path / "m.csv", synthetic_set, 0, 3)
    code, _, err = run_cli(capsys, "embed", manifest, "--cache", tmp_path / "c")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "cannot fetch pretrained weights ViT-B-32/openai" in lines[0]
    cause = re.search(r"\((.*)\); download", lines[0]).group(1)
    first_line = LONG_HUB_ERROR.splitlines()[0]
    # too long for one line: cut after a whole word, with an ellipsis
    assert cause.endswith("…"), cause
    kept = cause[:-1].rstrip()
    assert first_line.startswith(kept) and first_line[len(kept)] == " ", cause
    assert len(kept) > 200
    assert "Traceback" not in err


def test_random_weights_are_recorded_and_shown_by_cache_info(tmp_path, capsys, synthetic_set, tiny_checkpoint):
    manifest = subset_manifest(tmp_path / "m.csv", synthetic_set, 0, 4)
    assert run_cli(capsys, "embed", manifest, "--cache", tmp_path / "r", "--backbone", "clipposter-tiny",
                   "--pretrained", "random", "--no-texts")[0] == 0
    assert run_cli(capsys, "embed", manifest, "--cache", tmp_path / "t", *tiny_args(tiny_checkpoint),
                   "--no-texts")[0] == 0
    with EmbeddingCache.open(tmp_path / "r") as random_cache, EmbeddingCache.open(tmp_path / "t") as trained:
        assert random_cache.identity.is_random and not trained.identity.is_random
    code, out, _ = run_cli(capsys, "cache", "info", "--cache", tmp_path / "r")
    assert code == 0 and "random weights" in out
    code, out, _ = run_cli(capsys, "cache", "info", "--cache", tmp_path / "t")
    assert code == 0 and "random weights" not in out
    code, out, _ = run_cli(capsys, "cache", "info", "--cache", tmp_path / "r", "--json")
    assert json.loads(out)["random_weights"] is True


def test_fully_cached_rerun_does_not_even_import_torch(embedded, tmp_path, synthetic_set, tiny_checkpoint):
    """What a cached rerun costs is the hashing: torch alone is ~0.5 GB of memory and seconds to import."""
    import subprocess
    import sys

    manifest = subset_manifest(tmp_path / "again.csv", synthetic_set, 0, 20)
    script = ("import json, sys\n"
              "from clipposter.cli.main import main\n"
              f"code = main(['embed', {str(manifest)!r}, '--cache', {str(embedded)!r}, '--backbone', "
              f"'clipposter-tiny', '--pretrained', {str(tiny_checkpoint)!r}, '--json'])\n"
              "print(json.dumps({'code': code, 'heavy': sorted(m for m in ('torch', 'open_clip') "
              "if m in sys.modules)}), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["summary"]["cached"] == 20


@pytest.mark.parametrize("message, expected", [
    ("", "RuntimeError"),
    ("\n  \nthe cause\nmore detail", "the cause"),
    ("short enough", "short enough"),
    ("word " * 30, "word " * 7 + "…"),  # 40 characters at most, cut after a word
    ("x" * 100, "x" * 39 + "…"),  # one word longer than the limit is cut inside it
])
def test_cause_line_keeps_whole_words(message, expected):
    from clipposter.errors import cause_line
    from clipposter.heads.caption.lm import first_line

    assert cause_line(RuntimeError(message), limit=40) == expected
    assert first_line(RuntimeError("a " * 300)).endswith(" …")  # the caption head's messages too
