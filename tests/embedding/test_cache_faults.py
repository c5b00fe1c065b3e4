"""`clipposter embed` SIGKILLed at each point of a cache write, then run again: the cache ends up
bit-identical to the one an uninterrupted run makes (embedding bytes, content hashes, row order,
records, texts).

The killed run is a child process that patches the cache's write steps to kill itself at one point:
before a batch's rows are written, with a row and a half of them on disk, inside the index
transaction, after the commit but before the .npy header is rewritten, and the same during the text
append. The rerun and the reference run go through the same CLI in this process."""
from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from clipposter.embedding.cache import EmbeddingCache
from helpers import run_cli, tiny_args

# Each case starts a Python process that imports torch and loads the tiny backbone.
pytestmark = [pytest.mark.usefixtures("single_torch_thread"), pytest.mark.slow]

POSTERS = 12
BATCH = 4  # three batches of posters, then one append of texts

# argv: point, then the embed command's arguments. Each point names the matrix whose write is cut,
# which of its writes, and where in it.
CHILD = r"""
import os, signal, sys
import numpy as np
from clipposter.embedding import cache_matrix
from clipposter.embedding.cache import EmbeddingCache
from clipposter.cli.main import main

point, argv = sys.argv[1], sys.argv[2:]
target, nth, where = {
    "before the rows": ("images.npy", 2, "append"),
    "a row and a half written": ("images.npy", 2, "torn"),
    "inside the transaction": ("images.npy", 2, "transaction"),
    "after the commit": ("images.npy", 2, "header"),
    "text rows half written": ("texts.npy", 1, "torn"),
    "after the text commit": ("texts.npy", 1, "header"),
}[point]
calls = {"append": 0, "header": 0}
current = {}

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

real_append, real_header = cache_matrix.Matrix.append, cache_matrix.Matrix.set_header
real_upsert = EmbeddingCache._upsert_records

def append(self, start_row, rows):
    if self.name == target:
        calls["append"] += 1
        current["writing"] = calls["append"] == nth
        if current["writing"] and where == "append":
            die()
        if current["writing"] and where == "torn":
            data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
            with open(self.path, "r+b") as f:
                f.seek(cache_matrix.HEADER_BYTES + start_row * self.row_bytes)
                f.write(data[:self.row_bytes + self.row_bytes // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
    return real_append(self, start_row, rows)

def upsert(self, records):
    real_upsert(self, records)
    if current.get("writing") and where == "transaction":
        die()  # the rows are on disk and inserted, the transaction is not committed

def set_header(self, rows):
    if self.name == target:
        calls["header"] += 1
        if calls["header"] == nth and where == "header":
            die()
    return real_header(self, rows)

cache_matrix.Matrix.append, cache_matrix.Matrix.set_header = append, set_header
EmbeddingCache._upsert_records = upsert
sys.exit(main(argv))
"""

POINTS = ["before the rows", "a row and a half written", "inside the transaction", "after the commit",
          "text rows half written", "after the text commit"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, synthetic_set):
    src, _ = synthetic_set
    with open(src / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:POSTERS]
    for row in rows:
        row["image"] = str(src / row["image"])
    path = tmp_path_factory.mktemp("faults") / "m.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def embed_argv(manifest, cache, checkpoint):
    return ["embed", str(manifest), "--cache", str(cache), "--batch-size", str(BATCH), "--workers", "0", "--json",
            *[str(a) for a in tiny_args(checkpoint)]]


def contents(cache):
    """Everything a cache holds, as bytes and rows in order."""
    db = sqlite3.connect(f"{(cache / 'index.sqlite').resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = {
            "posters": db.execute("SELECT hash, row FROM posters ORDER BY row").fetchall(),
            "records": db.execute("SELECT * FROM records ORDER BY id").fetchall(),
            "texts": db.execute("SELECT hash, row, text FROM texts ORDER BY row").fetchall(),
        }
    finally:
        db.close()
    return {"images.npy": (cache / "images.npy").read_bytes(), "texts.npy": (cache / "texts.npy").read_bytes(),
            **tables}


@pytest.fixture(scope="module")
def reference(manifest, tiny_checkpoint, tmp_path_factory, single_torch_thread):
    from clipposter.cli.main import main

    cache = tmp_path_factory.mktemp("faults-reference") / "cache"
    assert main(embed_argv(manifest, cache, tiny_checkpoint)) == 0
    got = contents(cache)
    assert len(got["posters"]) == POSTERS and len(got["texts"]) > 2 * BATCH
    return got


@pytest.mark.parametrize("point", POINTS)
def test_a_killed_embed_resumes_to_the_same_cache(point, manifest, reference, tiny_checkpoint, tmp_path, capsys):
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, point, *embed_argv(manifest, cache, tiny_checkpoint)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    with EmbeddingCache.open(cache, mode="r") as c:  # what the killed run left committed
        committed = c.num_posters
        texts = c.num_texts
    poster_rows = {"before the rows": BATCH, "a row and a half written": BATCH, "inside the transaction": BATCH,
                   "after the commit": 2 * BATCH}.get(point, POSTERS)
    assert committed == poster_rows
    assert texts == (len(reference["texts"]) if point == "after the text commit" else 0)
    code, out, err = run_cli(capsys, *embed_argv(manifest, cache, tiny_checkpoint))
    assert code == 0, err
    assert f'"encoded": {POSTERS - committed},' in out
    assert contents(cache) == reference
