"""`clipposter embed` SIGKILLed at each point of a cache write, then run again: the cache ends up
bit-identical to the one an uninterrupted run makes (embedding bytes, content hashes, row order,
records, texts), and no shard of the killed run is left behind.

The killed run is a child process that writes a shard per batch (its flush threshold set to the batch
size) and patches the shard writer to kill itself at one point of the second poster shard: before its
files are written, with its matrix written and its tables not, written and renamed but not listed in
the index, and listed but still marked as being written; and the same during the text shard. The
rerun and the reference run go through the same CLI in this process, with the default threshold."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from clipposter.embedding import shard_files as sf
from clipposter.embedding.cache import EmbeddingCache
from helpers import run_cli, tiny_args

# Each case starts a Python process that imports torch and loads the tiny backbone.
pytestmark = [pytest.mark.usefixtures("single_torch_thread"), pytest.mark.slow]

POSTERS = 12
BATCH = 4  # three shards of posters, then one of texts

# argv: point, then the embed command's arguments.
CHILD = r"""
import os, signal, sys
from clipposter.embedding import embed, shard_files as sf
from clipposter.cli.main import main

point, argv = sys.argv[1], sys.argv[2:]
kind, nth, where = {
    "before the shard": ("posters", 2, "start"),
    "matrix written, tables not": ("posters", 2, "tables"),
    "renamed, not listed": ("posters", 2, "commit"),
    "listed, still marked": ("posters", 2, "finish"),
    "text shard half written": ("texts", 1, "tables"),
    "after the text commit": ("texts", 1, "finish"),
}[point]
embed.FLUSH_ROWS = int(os.environ["FLUSH_ROWS"])
calls = {"posters": 0, "texts": 0}
current = {"armed": False}

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

real_write, real_table = sf.write_shard, sf._save_table
real_commit, real_finish = sf.commit, sf.finish_shard

def write_shard(root, tmp, dim, dtype, **content):
    which = "posters" if content.get("poster_hashes") else "texts"
    calls[which] += 1
    current["armed"] = which == kind and calls[which] == nth
    if current["armed"] and where == "start":
        die()
    return real_write(root, tmp, dim, dtype, **content)

def save_table(path, columns, schema):
    if current["armed"] and where == "tables":
        die()
    return real_table(path, columns, schema)

def commit(root, added, replaced=()):
    if current["armed"] and where == "commit":
        die()
    return real_commit(root, added, replaced)

def finish_shard(root, name):
    if current["armed"] and where == "finish":
        die()
    return real_finish(root, name)

sf.write_shard, sf._save_table, sf.commit, sf.finish_shard = write_shard, save_table, commit, finish_shard
sys.exit(main(argv))
"""

POINTS = ["before the shard", "matrix written, tables not", "renamed, not listed", "listed, still marked",
          "text shard half written", "after the text commit"]


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
    with EmbeddingCache.open(cache, mode="r") as c:
        return {"images": np.asarray(c.image_matrix()).tobytes(), "posters": c.poster_hashes(),
                "records": c.records_with_hashes(), "texts": c.text_items(),
                "text_matrix": np.asarray(c.text_matrix()).tobytes()}


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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLUSH_ROWS": str(BATCH)}
    proc = subprocess.run([sys.executable, "-c", CHILD, point, *embed_argv(manifest, cache, tiny_checkpoint)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    with EmbeddingCache.open(cache, mode="r") as c:  # what the killed run left committed
        committed = c.num_posters
        texts = c.num_texts
    poster_rows = {"before the shard": BATCH, "matrix written, tables not": BATCH, "renamed, not listed": BATCH,
                   "listed, still marked": 2 * BATCH}.get(point, POSTERS)
    assert committed == poster_rows
    assert texts == (len(reference["texts"]) if point == "after the text commit" else 0)
    code, out, err = run_cli(capsys, *embed_argv(manifest, cache, tiny_checkpoint))
    assert code == 0, err
    assert f'"encoded": {POSTERS - committed},' in out
    assert contents(cache) == reference
    listed = {e.name for e in sf.read_index(cache)}
    assert {p.name for p in (cache / sf.SHARDS).iterdir()} == listed  # the killed run's shard is gone
