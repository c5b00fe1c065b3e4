"""Small helpers shared by test modules in several folders."""
from __future__ import annotations

import builtins
import os
import sys
from pathlib import Path

from clipposter.cli.main import main


def installed_script() -> Path:
    """The `clipposter` console script that installing the package wrote next to this interpreter."""
    script = Path(sys.executable).parent / ("clipposter.exe" if os.name == "nt" else "clipposter")
    assert script.is_file(), f"{script} is missing: install the package (pip install -e .) to get the console script"
    return script


def run_cli(capsys, *argv):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_args(ckpt):
    """The backbone flags of the tests' tiny CLIP checkpoint."""
    return ["--backbone", "clipposter-tiny", "--pretrained", str(ckpt)]


def count_opens(monkeypatch, paths) -> dict[str, int]:
    """How often each of `paths` is opened, by any code (PIL opens files through builtins.open too)."""
    counts = {os.path.abspath(p): 0 for p in paths}
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) in counts:
            counts[os.path.abspath(file)] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    return counts
