"""A folder of posters with names and sub-folders that cannot be used: each is skipped, said and counted,
and the rest of the folder is read."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from clipposter.errors import ClipposterError
from clipposter.ingest.sources import SourceStats, from_folder, load_source

pytestmark = pytest.mark.skipif(sys.platform in ("win32", "darwin"),
                                reason="file names there are always Unicode: no name can be invalid UTF-8")


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format="PNG")
    return path


def raw_name(folder: Path, name: bytes) -> Path:
    """A file whose name is the given bytes, as Python spells it (undecodable bytes as surrogates)."""
    path = Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))
    image(path)
    return path


def test_a_name_that_is_not_utf8_is_skipped_with_a_warning_and_the_rest_is_read(tmp_path):
    raw_name(tmp_path, b"caf\xe9.png")
    image(tmp_path / "ok.png")
    image(tmp_path / "caf\u00e9 2.png")  # a proper UTF-8 name with an accent is kept
    stats = SourceStats()
    records = load_source(tmp_path, stats=stats)
    assert [r.id for r in records] == ["caf\u00e9 2", "ok"]
    assert stats.reasons == {"file name not valid UTF-8": 1}
    assert stats.warnings == [f"skipped {tmp_path}/caf\\xe9.png: its name is not valid UTF-8; "
                              "rename it (convmv converts names from Latin-1)"]
    for line in stats.warnings:
        line.encode("utf-8")  # printable as it is


def test_a_folder_whose_name_is_not_utf8_is_skipped_once(tmp_path):
    bad = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"d\xe9j\xe0")))
    image(bad / "a.png")
    image(bad / "b.png")
    image(tmp_path / "ok.png")
    stats = SourceStats()
    assert [r.id for r in from_folder(tmp_path, stats=stats)] == ["ok"]
    assert stats.reasons == {"folder name not valid UTF-8": 1}
    assert stats.warnings == [f"skipped folder {tmp_path}/d\\xe9j\\xe0: its name is not valid UTF-8; "
                              "rename it (convmv converts names from Latin-1)"]


def test_an_unreadable_sub_folder_is_warned_about_and_counted(tmp_path, monkeypatch):
    image(tmp_path / "ok.png")
    locked = tmp_path / "locked"
    image(locked / "x.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    stats = SourceStats()
    records = from_folder(tmp_path, stats=stats)
    assert [r.id for r in records] == ["ok"]
    assert stats.reasons == {"unreadable folder": 1}
    assert stats.warnings == [f"cannot read folder {locked}: Permission denied; its posters are left out"]
    assert "unreadable folder: 1" in stats.summary()


def test_an_unreadable_root_is_an_error(tmp_path, monkeypatch):
    image(tmp_path / "ok.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(tmp_path):
            raise PermissionError(13, "Permission denied", str(tmp_path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ClipposterError, match=f"cannot read folder {tmp_path}: Permission denied"):
        from_folder(tmp_path)


def test_warnings_are_kept_to_a_readable_number(tmp_path):
    for i in range(30):
        raw_name(tmp_path, b"x%d\xff.png" % i)
    image(tmp_path / "ok.png")
    stats = SourceStats()
    from_folder(tmp_path, stats=stats)
    assert stats.reasons == {"file name not valid UTF-8": 30}
    assert len(stats.warnings) == SourceStats.MAX_WARNINGS + 1
    assert stats.warnings[-1] == f"and {30 - SourceStats.MAX_WARNINGS} more"
