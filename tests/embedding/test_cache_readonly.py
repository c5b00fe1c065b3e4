"""Reading a cache writes nothing: `EmbeddingCache.open(dir, mode="r")` on a v1 cache and every command that only reads
(cache info, search, duplicates, train/evaluate genres, predict from the cache) leave each file of the
cache byte-identical, with its modification time, and create none (no lock, no -wal/-shm), on a healthy
cache and on one a killed writer left; a damaged one is refused in one line, still untouched."""
from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import threading
import time

import numpy as np
import pytest

from clipposter.embedding.backbone import BackboneIdentity
from clipposter.embedding.cache import EmbeddingCache
from clipposter.errors import ClipposterError
from clipposter.records import PosterRecord
from v1_cache import v1_copy
from clipposter.cli.common import EXIT_ERROR
from helpers import run_cli, tiny_args

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def ident(weights="sha256:aa", dim=4):
    return BackboneIdentity(model="m", weights=weights, image_size=32, mean=(0.5, 0.5, 0.5),
                            std=(0.2, 0.2, 0.2), interpolation="bicubic", resize_mode="shortest", embed_dim=dim)


def unit(n, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Encoder:
    def __init__(self, seed=0):
        self.identity = ident()
        self.seed = seed

    def encode_texts(self, texts, batch_size=256):
        return unit(len(texts), seed=self.seed + len(texts))


def snapshot(root):
    """Every file under `root`: its bytes and modification time (which tells a rewrite apart even as
    root, where chmod does not stop writes). Of SQLite's shared-memory file, which exists only while a
    writer runs or after one was killed, and which every reader of such an index writes its read marks
    into, only its presence counts."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if not p.name.endswith("-shm")
            else "present" for p in sorted(root.rglob("*")) if p.is_file()}


def build(root):
    with EmbeddingCache.open_v1(root, ident()) as c:
        c.add_posters(["a", "b", "c"], unit(3), [(PosterRecord(id=f"p{h}", genres=["Drama"]), h) for h in "abc"])
        c.text_embeddings(["one", "two"], backbone=Encoder())
    return root


def committed_rows(root):
    with EmbeddingCache.open_v1(root, mode="r") as c:
        return np.array(c.image_matrix())


def _torn_tail(root):
    with open(root / "images.npy", "ab") as f:  # a killed writer's rows that no commit claims
        f.write(b"\x07" * 11)


def _stale_header(root):
    with EmbeddingCache.open_v1(root, ident()) as c:
        c.add_posters(["d"], unit(1, seed=4))
        c._images.set_header(3)  # killed between the commit and the header rewrite


def _legacy_wal_index(root):
    """An index as the previous version left it: in WAL mode at rest (no -wal file after a clean close)."""
    db = sqlite3.connect(root / "index.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    assert not (root / "index.sqlite-wal").exists()


def _killed_writer(root, write="row = np.ones((1, c.dim), np.float32) / np.sqrt(c.dim)\n"
                                "c.add_posters(['k'], row, [(PosterRecord(id='pk'), 'k')])\n"):
    """The files of a writer killed after a commit: the index's -wal (and -shm) files hold the commit."""
    import subprocess
    import sys

    code = ("import os, sys, numpy as np\n"
            "from clipposter.embedding.cache import EmbeddingCache\n"
            "from clipposter.ingest.images import content_hash, read_bytes\n"
            "from clipposter.records import PosterRecord\n"
            f"c = EmbeddingCache.open_v1(sys.argv[1])\n{write}os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, timeout=120)
    assert (root / "index.sqlite-wal").stat().st_size > 0


def _killed_record_writer(root):
    """A writer killed after committing a record's new title (its poster's row unchanged)."""
    _killed_writer(root, "r = c.records()[0]\nr.title = 'Renamed'\n"
                         "c.upsert_records([(r, content_hash(read_bytes(r.image)))])\n")


STATES = {"healthy": lambda root: None, "torn tail": _torn_tail, "stale header": _stale_header,
          "legacy WAL index": _legacy_wal_index, "killed writer": _killed_writer}


@pytest.mark.parametrize("state", list(STATES))
def test_reading_writes_nothing(tmp_path, state):
    root = build(tmp_path / "c")
    STATES[state](root)
    with open(root / "index.sqlite", "rb") as f:
        wal_mode = f.read(20)[18:20] == b"\x02\x02"
    # A writer leaves a rollback journal at rest.
    assert wal_mode == (state in ("legacy WAL index", "killed writer"))
    before = snapshot(root)
    with EmbeddingCache.open_v1(root, mode="r") as c:
        n = 4 if state in ("stale header", "killed writer") else 3
        assert c.num_posters == n and c.image_matrix().shape == (n, 4)
        np.testing.assert_array_equal(c.image_matrix()[:3], unit(3).astype(np.float16))
        assert [r.id for r in c.records()][:3] == ["pa", "pb", "pc"]
        assert c.text_embeddings(["two", "one"]).shape == (2, 4)
        assert c.info().posters == n
    assert snapshot(root) == before


def test_a_read_only_cache_refuses_writes_and_encodes_texts_without_storing_them(tmp_path):
    root = build(tmp_path / "c")
    before = snapshot(root)
    with EmbeddingCache.open_v1(root, mode="r") as c:
        with pytest.raises(ClipposterError, match=r"is open read-only; open it with `mode` \"a\" to add posters"):
            c.add_posters(["z"], unit(1))
        with pytest.raises(ClipposterError, match="is open read-only"):
            c.upsert_records([(PosterRecord(id="pa", genres=["Comedy"]), "a")])
        got = c.text_embeddings(["one", "three", "two"], backbone=Encoder(seed=7))
        assert c.num_texts == 2 and c.missing_texts(["three"]) == ["three"]
    assert snapshot(root) == before
    # The same values a writer stores and reads back (rounded to the stored dtype).
    with EmbeddingCache.open_v1(root, ident()) as c:
        stored = c.text_embeddings(["one", "three", "two"], backbone=Encoder(seed=7))
    np.testing.assert_array_equal(got, stored)


def test_opening_read_only_an_empty_folder_with_only_cache_json_reads_nothing(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    EmbeddingCache.open_v1(root, ident()).close()
    for name in ("index.sqlite", "images.npy", "texts.npy"):
        (root / name).unlink()
    before = snapshot(root)
    with EmbeddingCache.open_v1(root, mode="r") as c:
        assert c.num_posters == 0 and c.image_matrix().shape == (0, 4) and c.records() == []
    assert snapshot(root) == before


def test_a_reader_sees_what_a_live_writer_commits(tmp_path):
    root = build(tmp_path / "c")
    with EmbeddingCache.open_v1(root, ident()) as writer:
        writer.add_posters(["d"], unit(1, seed=5))
        with EmbeddingCache.open_v1(root, mode="r") as reader:
            assert reader.num_posters == 4
            writer.add_posters(["e", "f"], unit(2, seed=6))
            assert reader.num_posters == 6
            np.testing.assert_array_equal(reader.image_matrix()[4:], unit(2, seed=6).astype(np.float16))
            # The writer closing while a reader is open neither waits for it nor fails.
            started = time.perf_counter()
            writer.close()
            assert time.perf_counter() - started < 2
            assert reader.num_posters == 6


def test_a_writer_waits_for_no_reader_and_readers_never_see_a_torn_row(tmp_path):
    root = build(tmp_path / "c")
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def read():
        try:
            while not stop.is_set():
                with EmbeddingCache.open_v1(root, mode="r") as c:
                    m = np.array(c.image_matrix())
                    seen.append(len(m))
                    assert np.all(np.isfinite(m)) and np.allclose(np.linalg.norm(m.astype(np.float32), axis=1),
                                                                   1, atol=1e-2)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for i in range(15):
            with EmbeddingCache.open_v1(root, ident()) as c:
                c.add_posters([f"n{i}"], unit(1, seed=10 + i))
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[0]
    assert seen and seen == sorted(seen)
    assert committed_rows(root).shape == (18, 4)


@pytest.mark.skipif(ROOT_USER, reason="chmod does not stop root from writing; the tests above check bytes and "
                                      "modification times instead")
def test_a_cache_on_a_read_only_folder_can_be_read(tmp_path):
    root = build(tmp_path / "c")
    _torn_tail(root)
    for p in [root, *root.iterdir()]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        with EmbeddingCache.open_v1(root, mode="r") as c:
            assert c.num_posters == 3 and c.text_embeddings(["one"]).shape == (1, 4)
    finally:
        for p in [root, *root.iterdir()]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_cache_info_of_a_cache_without_its_index_is_one_line_and_cuts_nothing(tmp_path, capsys):
    root = build(tmp_path / "c")
    (root / "index.sqlite").unlink()
    before = snapshot(root)
    code, out, err = run_cli(capsys, "cache", "info", "--cache", root)
    assert (code, out) == (EXIT_ERROR, "")
    assert err == (f"error: index.sqlite is missing or older than images.npy: in {root}, images.npy holds 3 rows, "
                   f"the index 0; restore index.sqlite together with its index.sqlite-wal file from where the cache "
                   f"came from, or re-embed into a new cache (nothing was changed)\n")
    assert snapshot(root) == before


# ------------------------------------------------------------------------------------------------
# the commands that only read
# ------------------------------------------------------------------------------------------------
SMALL_HEAD = ["--width", "16", "--mlp-hidden", "16", "--heads", "2", "--epochs", "1", "--batch-size", "32"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_checkpoint, synthetic_set):
    """A cache of the 120 synthetic posters with their texts, a genre head trained on it, and the saved
    search index that the first search writes into the cache folder."""
    import csv
    import gc

    from clipposter.cli.main import main

    src, _ = synthetic_set
    work = tmp_path_factory.mktemp("readonly")
    with open(src / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["image"] = str(src / row["image"])
    with open(work / "m.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["embed", str(work / "m.csv"), "--cache", str(work / "v2"), "--json", *tiny_args(tiny_checkpoint)]) == 0
    cache = v1_copy(work / "v2", work / "cache")
    assert main(["train", "genres", "--cache", str(cache), "--out", str(work / "head"), "--json", *SMALL_HEAD]) == 0
    assert main(["search", "--cache", str(cache), "--id", rows[0]["id"], "--json"]) == 0
    gc.collect()  # the embed command's connection, if anything still held it
    with open(cache / "index.sqlite", "rb") as f:
        assert f.read(20)[18:20] == b"\x01\x01"  # closed by its writer: a rollback journal at rest
    return cache, work / "head", rows


def read_only_commands(cache, head, rows, out):
    first = rows[0]
    return [
        ["cache", "info", "--cache", cache],
        ["cache", "info", "--cache", cache, "--json"],
        ["search", "--cache", cache, "--id", first["id"], "-k", "3", "--json"],
        ["search", "--cache", cache, "--image", first["image"], "-k", "3"],
        ["duplicates", "--cache", cache, "--threshold", "0.5", "--json"],
        ["train", "genres", "--cache", cache, "--out", out / "head", "--json", *SMALL_HEAD],
        ["evaluate", "genres", "--head", head, "--cache", cache, "--out", out / "eval.json", "--baselines", "none"],
        ["predict", "--head", head, "--cache", cache, first["image"], rows[1]["image"], "--json"],
    ]


@pytest.mark.slow
@pytest.mark.parametrize("state", ["healthy", "torn tail", "killed record writer"])
def test_read_only_commands_leave_the_cache_untouched(embedded, tmp_path, capsys, state):
    cache, head, rows = embedded
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    {**STATES, "killed record writer": _killed_record_writer}[state](copy)
    before = snapshot(copy)
    for argv in read_only_commands(copy, head, rows, tmp_path / "out"):
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, (argv, err)
        assert snapshot(copy) == before, argv


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted index", "older index"])
def test_read_only_commands_refuse_a_damaged_cache_in_one_line(embedded, tmp_path, capsys, damage):
    cache, head, rows = embedded
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    if damage == "deleted index":
        (copy / "index.sqlite").unlink()
    else:
        db = sqlite3.connect(copy / "index.sqlite")
        db.execute("DELETE FROM posters WHERE row >= 30")
        db.commit()
        db.close()
    before = snapshot(copy)
    expected = "30" if damage == "older index" else "0"
    for argv in read_only_commands(copy, head, rows, tmp_path / "out")[::2]:
        code, out, err = run_cli(capsys, *argv)
        assert code == EXIT_ERROR and out == "", argv
        assert err.startswith("error: index.sqlite is missing or older than images.npy: ") and err.count("\n") == 1
        assert f"images.npy holds 120 rows, the index {expected};" in err
        assert snapshot(copy) == before, argv


@pytest.mark.parametrize("mode", ["r", "a"])
def test_an_index_a_writer_never_gave_tables_opens_as_empty(tmp_path, mode):
    """A writer killed between creating index.sqlite and its tables: nothing was committed."""
    root = tmp_path / "c"
    EmbeddingCache.open_v1(root, ident()).close()
    (root / "index.sqlite").unlink()
    sqlite3.connect(root / "index.sqlite").close()  # an empty database file
    with EmbeddingCache.open_v1(root, mode=mode) as c:
        assert c.num_posters == 0 and c.records() == [] and c.text_embeddings([]).shape == (0, 4)
        if mode == "a":
            assert c.add_posters(["a"], unit(1)) == 1


def test_adding_to_a_cache_in_a_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    import errno

    import clipposter.embedding.cache_v1 as cache_module

    root = build(tmp_path / "c")

    def refused(folder):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder / ".lock"))

    monkeypatch.setattr(cache_module, "directory_lock", refused)
    with pytest.raises(ClipposterError, match=rf"^cannot write into {root} \(Permission denied\): adding to a cache "
                                              r"needs a writable folder; commands that only read work on it as it is$"):
        EmbeddingCache.open_v1(root, ident())
    with EmbeddingCache.open_v1(root, mode="r") as c:
        assert c.num_posters == 3
