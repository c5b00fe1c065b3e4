"""The run folder's run.json: what the pipeline writes is what the report and the app read back."""
from __future__ import annotations

import json
import shutil

import pytest

from clipposter.errors import ClipposterError
from clipposter.run import RUN_FILE, RUN_FORMAT, read_run, write_run

PARTS = {"cache": "cache-abc", "genre_head": "genres", "caption_head": "taglines", "report": "report.html",
         "evaluation": {"genres": "genres/evaluation.json", "captions": None}, "notice": "tiny backbone"}


def test_written_run_reads_back_with_absolute_paths(tmp_path):
    path = write_run(tmp_path / "run", PARTS)
    assert path == tmp_path / "run" / RUN_FILE
    stored = json.loads(path.read_text())
    assert stored["format"] == RUN_FORMAT and stored["cache"] == "cache-abc"  # relative on disk
    info = read_run(tmp_path / "run")
    root = (tmp_path / "run").resolve()
    assert info["run_dir"] == str(root)
    assert info["cache"] == str(root / "cache-abc") and info["genre_head"] == str(root / "genres")
    assert info["caption_head"] == str(root / "taglines") and info["report"] == str(root / "report.html")
    assert info["evaluation"] == {"genres": str(root / "genres" / "evaluation.json"), "captions": None}
    assert info["notice"] == "tiny backbone"
    assert not list((tmp_path / "run").glob(".*.tmp"))  # written through a temporary file, renamed


def test_a_moved_run_folder_still_reads(tmp_path):
    write_run(tmp_path / "a", PARTS)
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert read_run(tmp_path / "b")["cache"] == str((tmp_path / "b" / "cache-abc").resolve())


def test_values_that_are_not_json_are_written_as_text(tmp_path):
    write_run(tmp_path, {**PARTS, "source": tmp_path / "manifest.csv"})
    assert read_run(tmp_path)["source"] == str(tmp_path / "manifest.csv")


def test_a_run_without_its_parts_is_refused(tmp_path):
    with pytest.raises(ClipposterError, match="missing genre_head"):
        write_run(tmp_path, {"cache": "c", "caption_head": "t"})
    assert not (tmp_path / RUN_FILE).exists()


@pytest.mark.parametrize("content, message", [
    (None, "run.json: not found"),
    ("{not json", "run.json: unreadable run description"),
    (json.dumps({"cache": "c", "genre_head": "g"}), "lacks cache, genre_head or caption_head"),
    (json.dumps(["cache", "genre_head", "caption_head"]), "lacks cache, genre_head or caption_head"),
])
def test_bad_run_files_are_one_line_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / RUN_FILE).write_text(content)
    with pytest.raises(ClipposterError, match=message) as info:
        read_run(tmp_path)
    assert "\n" not in str(info.value)
