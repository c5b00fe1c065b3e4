"""The command line's shape: a light parser, the same flags in every command group, library errors
named by their flag, and quiet exits into a closed pipe."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipposter.cli.common import flag_for
from clipposter.cli.main import build_parser, leaf_parsers, main
from clipposter.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "transformers", "open_clip", "faiss", "gradio", "sentence_transformers", "sklearn",
         "pandas", "pyarrow", "matplotlib", "numpy", "PIL")


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          **kwargs)


def leaves() -> dict[str, argparse.ArgumentParser]:
    return {leaf.prog.removeprefix("clipposter "): leaf for leaf in leaf_parsers(build_parser())}


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings}


def test_building_every_parser_imports_no_heavy_library():
    code = ("import sys, json\n"
            "from clipposter.cli.main import build_parser, leaf_parsers\n"
            "helps = [leaf.format_help() for leaf in leaf_parsers(build_parser())]\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_help_is_quick_and_lists_every_command():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "clipposter.cli.main", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    for command in ("embed", "cache", "synth", "download", "train", "evaluate", "predict", "caption", "search",
                    "duplicates", "report", "app", "demo"):
        assert f"    {command}" in proc.stdout
    # Importing torch alone takes seconds; the parser takes a fraction of one.
    assert seconds < 3, f"clipposter --help took {seconds:.1f} s"


def test_every_command_has_json_and_the_shared_flags_mean_one_thing():
    found = leaves()
    assert set(found) == {"embed", "cache info", "synth", "download", "train genres", "train captions",
                          "train backbone", "evaluate genres", "evaluate captions", "predict", "caption", "search", "duplicates",
                          "report", "app", "demo", "export wds",
                          "cache migrate", "cache merge", "cache compact"}
    for name, leaf in found.items():
        opts = options(leaf)
        assert "--json" in opts, f"{name} lacks --json"
        if "--cache" in opts:
            assert opts["--cache"].dest == "cache" and opts["--cache"].nargs is None, name
        if "--head" in opts:
            assert opts["--head"].dest == "head" and opts["--head"].required, name
        # a command writes what it writes with --out, never a positional or another flag
        positionals = [a.dest for a in leaf._actions if not a.option_strings]
        assert "out" not in positionals and "dir" not in positionals, name
        assert "--report" not in opts, name
    # the commands on a cache take it as --cache (no positional)
    for name in ("embed", "cache info", "train genres", "train captions", "evaluate genres", "evaluate captions",
                 "search", "duplicates", "cache migrate", "cache compact"):
        assert options(found[name])["--cache"].required, name
    for name in ("train genres", "train captions", "train backbone", "synth", "download", "demo"):
        assert "--out" in options(found[name]), name


def test_the_writing_flag_of_evaluations_is_out():
    args = build_parser().parse_args(["evaluate", "captions", "--cache", "c", "--head", "h", "--out", "r.json"])
    assert args.out == "r.json"
    args = build_parser().parse_args(["evaluate", "genres", "--cache", "c", "--head", "h", "--out", "r.json"])
    assert args.out == "r.json"
    assert build_parser().parse_args(["cache", "info", "--cache", "c"]).cache == "c"
    assert build_parser().parse_args(["synth", "--out", "d", "-n", "3"]).out == "d"


def test_search_choices_agree_with_the_library():
    from clipposter.cli import search as cli_search

    try:
        import clipposter.search.config as lib
    except ImportError:
        import clipposter.search.index as lib
    assert cli_search.INDEX_KINDS == tuple(lib.KINDS)
    assert cli_search.DEFAULT_THRESHOLD == lib.DEFAULT_THRESHOLD
    assert cli_search.DEFAULT_TARGET_RECALL == lib.DEFAULT_TARGET_RECALL


# ---------------------------------------------------------------------------- ConfigError → flag

def test_flag_for_names_the_option_of_a_parameter():
    found = leaves()
    assert flag_for(found["train genres"], "num_heads") == "--heads"
    assert flag_for(found["train genres"], "num_groups") == "--groups"
    assert flag_for(found["train genres"], "kind") == "--model"
    assert flag_for(found["train genres"], "batch_size") == "--batch-size"
    assert flag_for(found["caption"], "no_repeat_ngram_size") == "--no-repeat-ngram"
    assert flag_for(found["synth"], "n") == "-n"
    assert flag_for(found["embed"], "source") == "SOURCE"
    assert flag_for(found["search"], "poster_id") == "--id"
    assert flag_for(found["search"], "no_such_parameter") == "--no-such-parameter"


@pytest.mark.parametrize("argv, field, flag", [
    (["train", "genres", "--cache", "c", "--out", "o"], "num_heads", "--heads"),
    (["train", "captions", "--cache", "c", "--out", "o"], "prefix_length", "--prefix-length"),
    (["evaluate", "captions", "--cache", "c", "--head", "h"], "top_k", "--top-k"),
    (["search", "--cache", "c", "--text", "x"], "kind", "--kind"),
    (["duplicates", "--cache", "c"], "threshold", "--threshold"),
    (["synth", "--out", "o"], "mystery_setting", "--mystery-setting"),
])
def test_a_library_config_error_prints_one_line_naming_the_flag(capsys, monkeypatch, argv, field, flag):
    def refuse(args):
        raise ConfigError(field, "must divide width (64), got 5")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", _with_func(argparse.ArgumentParser.parse_args, refuse))
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == f"error: {flag} must divide width (64), got 5\n"


def _with_func(parse_args, func):
    """parse_args, with the command's function replaced (the parsing, and so the flag lookup, stay real)."""
    def patched(self, *args, **kwargs):
        namespace = parse_args(self, *args, **kwargs)
        if self.prog == "clipposter":
            namespace.func = func
        return namespace
    return patched


# ------------------------------------------------------------------------------- closed pipes

def _closed_pipe(argv: list[str]) -> tuple[int, str]:
    """Run the CLI with its stdout read by nobody (what `| head` does once head has its lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "clipposter.cli.main", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err.decode()


def test_help_into_a_closed_pipe_ends_quietly():
    code, err = _closed_pipe(["--help"])
    assert err == "" and code in (0, 141)


def test_json_into_a_closed_pipe_ends_quietly(tmp_path):
    out = tmp_path / "posters"
    code, err = _closed_pipe(["synth", "--out", str(out), "-n", "2", "--json"])
    assert "Traceback" not in err and "BrokenPipe" not in err and err == "", err
    assert code == 141


def test_json_piped_to_head_prints_its_first_lines(tmp_path):
    out = tmp_path / "posters"
    shell = (f"{sys.executable} -m clipposter.cli.main synth --out {out} -n 2 --json | head -n 1; "
             f"{sys.executable} -m clipposter.cli.main --help | head -n 1")
    proc = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.stdout.splitlines() == ["{", "usage: clipposter [-h] [-v]"]
    assert proc.stderr == ""
