import csv
import json
import subprocess
import sys

import pytest
from PIL import Image

from clipposter.cli.main import build_parser
from helpers import installed_script, run_cli, tiny_args


def test_embed_then_cache_info_json(tmp_path, capsys, tiny_checkpoint, synthetic_set):
    src, records = synthetic_set
    code, out, _ = run_cli(capsys, "embed", src / "manifest.csv", "--cache", tmp_path / "c",
                           *tiny_args(tiny_checkpoint), "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["summary"]["encoded"] == len(records) and payload["summary"]["skipped"] == 0
    assert payload["texts"] > 0
    # Reference texts and genre prompts are cached: reading them needs no backbone.
    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.embedding.prompts import genre_query_embeddings

    with EmbeddingCache.open(tmp_path / "c") as cache:
        genres = sorted({g for r in records for g in r.genres})
        assert genre_query_embeddings(cache, genres).shape == (len(genres), 64)
        assert cache.text_embeddings([records[0].tagline, records[0].overview]).shape == (2, 64)
    code, out, _ = run_cli(capsys, "cache", "info", "--cache", tmp_path / "c", "--json")
    info = json.loads(out)
    assert code == 0 and info["posters"] == len(records) and info["dtype"] == "float16"
    assert info["backbone"]["model"] == "clipposter-tiny" and info["dim"] == 64
    assert sum(info["splits"].values()) == len(records) and info["bytes_on_disk"] > 0
    code, out, _ = run_cli(capsys, "cache", "info", "--cache", tmp_path / "c")
    assert "clipposter-tiny" in out and f"{len(records)} distinct images" in out


def test_folder_source_and_float32(tmp_path, capsys, tiny_checkpoint, synthetic_set):
    src, records = synthetic_set
    code, out, _ = run_cli(capsys, "embed", src / "posters", "--cache", tmp_path / "c", "--dtype", "float32",
                           *tiny_args(tiny_checkpoint), "--json")
    assert code == 0 and json.loads(out)["cache"]["dtype"] == "float32"


@pytest.mark.parametrize("argv, needle", [
    (["embed", "/no/such/folder", "--cache", "X"], "/no/such/folder"),
    (["cache", "info", "--cache", "/no/such/cache"], "no clipposter cache here"),
])
def test_expected_failures_are_one_line_and_nonzero(tmp_path, capsys, argv, needle):
    argv = [a.replace("X", str(tmp_path / "c")) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert "Traceback" not in err


def test_wrong_backbone_for_existing_cache(tmp_path, capsys, tiny_checkpoint, synthetic_set):
    src, _ = synthetic_set
    assert run_cli(capsys, "embed", src / "manifest.csv", "--cache", tmp_path / "c",
                   *tiny_args(tiny_checkpoint))[0] == 0
    code, _, err = run_cli(capsys, "embed", src / "manifest.csv", "--cache", tmp_path / "c",
                           "--backbone", "clipposter-tiny", "--pretrained", "random")
    assert code == 2 and "was made with backbone" in err


def test_strict_flag_fails_on_a_bad_poster(tmp_path, capsys, tiny_checkpoint, synthetic_set):
    _, records = synthetic_set
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(open(records[0].image, "rb").read())
    (folder / "bad.jpg").write_bytes(b"")
    code, out, err = run_cli(capsys, "embed", folder, "--cache", tmp_path / "c", *tiny_args(tiny_checkpoint),
                             "--json")
    assert code == 0 and json.loads(out)["summary"]["skipped"] == 1
    code, _, err = run_cli(capsys, "embed", folder, "--cache", tmp_path / "c2", *tiny_args(tiny_checkpoint),
                           "--strict")
    assert code == 2 and "bad.jpg" in err and "--strict" in err


def test_every_command_has_help_and_json():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        leaves = list(nested[0].choices.values()) if nested else [p]
        for leaf in leaves:
            assert leaf.format_help()
            assert any("--json" in a.option_strings for a in leaf._actions), f"{leaf.prog} lacks --json"


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "clipposter.cli.main", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "embed" in proc.stdout


@pytest.mark.slow  # three interpreter starts, each importing torch (several seconds on a busy machine)
def test_installed_console_script_runs_commands(tmp_path):
    """What a user types after `pip install`: the installed `clipposter` script, run from another folder."""
    script = installed_script()

    def run(*argv):
        return subprocess.run([str(script), *map(str, argv)], capture_output=True, text=True, cwd=tmp_path,
                              timeout=300)

    proc = run("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: clipposter"), proc.stderr[-2000:]
    for command in ("embed", "synth", "download", "search", "train", "demo"):
        assert command in proc.stdout

    out = tmp_path / "posters"
    proc = run("synth", "--out", out, "-n", 4, "--seed", 2, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"posters": 4, "manifest": str(out / "manifest.csv")}
    with (out / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    assert all(Image.open(out / r["image"]).size == (200, 300) and r["genres"] for r in rows)

    # an expected failure: one error line and the CLI's exit status
    proc = run("cache", "info", "--cache", tmp_path / "no-cache")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_library_errors_name_the_flags_of_the_invoked_command(tmp_path, capsys, tiny_checkpoint):
    """The library names parameters in backticks (`image_col`); the CLI prints the flags that set them."""
    path = tmp_path / "bad.csv"
    path.write_text("movie,poster_file\na,a.jpg\n")
    code, out, err = run_cli(capsys, "embed", path, "--cache", tmp_path / "c", *tiny_args(tiny_checkpoint))
    assert code == 2 and err.count("\n") == 1
    assert "--image-col" in err and "--url-col" in err and "--id-col" in err and "`" not in err


def test_logged_warnings_use_the_cli_casing(tmp_path, tiny_checkpoint, synthetic_set):
    """A warning logged by the library reads like the CLI's own: `warning: ...`, never `WARNING:`."""
    _, records = synthetic_set
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(open(records[0].image, "rb").read())
    (folder / "bad.jpg").write_bytes(b"")  # skipped, and embed logs a warning saying so
    proc = subprocess.run([sys.executable, "-m", "clipposter.cli.main", "embed", str(folder), "--cache",
                           str(tmp_path / "c"), *tiny_args(tiny_checkpoint)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: skipped" in proc.stderr and "bad.jpg" in proc.stderr
    assert "WARNING" not in proc.stderr
