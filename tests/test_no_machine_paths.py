"""Nothing in the repository points at a folder of the machine it was written on: a user's machine has
neither the developer's home nor a sibling folder of the checkout. Every tracked file is scanned."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# An absolute path under a machine's own top folders (not part of a longer relative path such as
# `docs/work/`), or a folder beside the checkout reached with `..`.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|Users)/[\w.-]|(?<![\w.-])\.\./shared\b")


def machine_paths(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line naming such a path."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if MACHINE_PATH.search(line)]


def tracked_files() -> list[Path]:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run([git, "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_names_a_folder_of_the_development_machine():
    files = tracked_files()
    assert len(files) > 50 and any(p.name == "README.md" for p in files)
    hits = []
    for path in files:
        if not path.is_file():  # deleted in the working tree, not yet in a commit
            continue
        data = path.read_bytes()
        if b"\0" in data:  # images, checkpoints
            continue
        for n, line in machine_paths(data.decode("utf-8", errors="replace")):
            hits.append(f"{path.relative_to(ROOT)}:{n}: {line[:160]}")
    assert not hits, "paths that exist only on the development machine:\n" + "\n".join(hits)


@pytest.mark.parametrize("text, found", [
    ('DEFAULT = "/' 'work/shared/assets/gpt2-tokenizer"', True),
    ("see /" "home/alice/models", True),
    ("cp x /" "Users/bob/", True),
    ("tokenizer in .." "/shared/assets", True),
    ("docs/work/notes.md and runs/home/x", False),  # relative paths
    ("python -m pip install gguf; ~/" "work is the user's own", False),
    ("tests/shared_helpers.py, ./shared/x", False),
])
def test_the_scanner_tells_machine_paths_from_relative_ones(text, found):
    assert bool(machine_paths(text)) is found
