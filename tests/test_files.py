"""files.py: atomic writes leave the old file or the new one, never half; the lock excludes other processes."""
from __future__ import annotations

import json
import math
import multiprocessing
import time

import pytest

from clipposter.files import atomic_path, atomic_write_text, directory_lock, read_json, replace_dir, write_json


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed half way")
    assert read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"f1": math.nan})
    assert not (tmp_path / "x.json").exists()
    write_json(tmp_path / "y.json", {"p": tmp_path}, default=str)
    assert json.loads((tmp_path / "y.json").read_text()) == {"p": str(tmp_path)}


def test_replace_dir_swaps_a_finished_folder_in(tmp_path):
    folder = tmp_path / "head"

    def build(version):
        def _build(d):
            d.mkdir()
            (d / "v.txt").write_text(version)
        return _build

    replace_dir(build("1"), folder)
    with pytest.raises(OSError):
        replace_dir(lambda d: (d.mkdir(), (d / "v.txt").write_text("half"), _raise()), folder)
    assert (folder / "v.txt").read_text() == "1"
    replace_dir(build("2"), folder)
    assert (folder / "v.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]


def _raise():
    raise OSError("disk full")


def _hold(folder, started, seconds):
    with directory_lock(folder):
        started.set()
        time.sleep(seconds)


def test_directory_lock_excludes_another_process(tmp_path):
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    p = ctx.Process(target=_hold, args=(tmp_path, started, 1.0))
    p.start()
    assert started.wait(10)
    t0 = time.monotonic()
    with directory_lock(tmp_path):
        waited = time.monotonic() - t0
    p.join()
    assert waited > 0.5
