"""Multi-process training: `train genres` and `train captions` launched in two CPU processes with
`accelerate launch` (gloo) give the heads and losses of one process at the same global batch; the
environment parsing and batch sharding underneath, without a launcher."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipposter.embedding.cache import EmbeddingCache
from clipposter.errors import ClipposterError
from clipposter.heads import distributed
from clipposter.heads.distributed import Ranks
from clipposter.heads.genre.data import genre_text_embeddings
from clipposter.ingest.synthetic import SYNTHETIC_GENRES
from clipposter.records import PosterRecord
from helpers import installed_script, run_cli

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------- without a launcher

def test_launched_reads_the_launcher_environment(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched() == Ranks(0, 1, 0)
    assert distributed.is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched() == Ranks(3, 4, 1)
    assert not distributed.is_main_process()
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ClipposterError, match="rank 4 of 4"):
        distributed.launched()
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ClipposterError, match="RANK is 'two'"):
        distributed.launched()


def test_shard_splits_a_global_batch_into_contiguous_shares():
    rows = torch.arange(10, 25)  # 15 rows over 2 and 4 ranks
    for world in (2, 4):
        shares = [distributed.shard(rows, Ranks(r, world, r)) for r in range(world)]
        assert torch.equal(torch.cat([s for s, _ in shares]), rows)
        assert [own for _, own in shares] == [len(s) for s, _ in shares]
        assert max(own for _, own in shares) - min(own for _, own in shares) <= 1
    # A last batch smaller than the world: the rank without rows runs one with weight 0.
    rows = torch.tensor([7])
    assert [(s.tolist(), own) for s, own in (distributed.shard(rows, Ranks(r, 2, r)) for r in range(2))] == \
        [([7], 1), ([7], 0)]
    single, own = distributed.shard(rows, Ranks())
    assert single is rows and own == 1


# ----------------------------------------------------------------------------- two launched processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*argv) -> subprocess.CompletedProcess:
    """The CLI in two CPU processes: `accelerate launch --multi_gpu` starts them torchrun's way (its
    `--cpu` alone starts one unless MPI is set up); no GPU is visible to them."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(installed_script()), *map(str, argv)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _assert_same_tensors(a: dict, b: dict, tol: float) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < tol, f"weights differ by up to {worst:g}"
    return worst


def _genre_cache(path: Path, backbone, n_train: int, n_val: int):
    rng = np.random.default_rng(5)
    genres = list(SYNTHETIC_GENRES)[:4]
    directions = {g: rng.standard_normal(backbone.embed_dim) for g in genres}
    cache = EmbeddingCache.open(path, backbone.identity, backbone_spec=backbone.spec)
    emb, hashes, recs = [], [], []
    for i in range(n_train + n_val):
        labels = [g for g in genres if rng.random() < 0.35] or [genres[i % len(genres)]]
        v = rng.standard_normal(backbone.embed_dim) * 0.5 + sum(directions[g] for g in labels)
        emb.append(v / np.linalg.norm(v))
        hashes.append(f"{i:064x}")
        split = "train" if i < n_train else "validation"
        recs.append((PosterRecord(id=f"p{i:03d}", genres=labels, split=split), hashes[-1]))
    cache.add_posters(hashes, np.stack(emb), recs)
    genre_text_embeddings(cache, sorted(genres), backbone=backbone)  # the prompts, cached for the launched runs
    cache.close()
    return path


@pytest.mark.slow
def test_train_genres_in_two_processes_equals_one(capsys, tmp_path, tiny_backbone):
    # 91 training posters in global batches of 15: ranks take 8 and 7 rows, and the last batch of one
    # row leaves rank 1 without rows of its own; 40 validation posters, 20 scored by each rank.
    cache = _genre_cache(tmp_path / "cache", tiny_backbone, n_train=91, n_val=40)
    args = ["train", "genres", "--cache", cache, "--batch-size", 15, "--epochs", 4, "--patience", 10, "--lr", 3e-3,
            "--dropout", 0, "--width", 32, "--mlp-hidden", 32, "--threads", 1, "--json"]
    code, out, err = run_cli(capsys, *args, "--out", tmp_path / "one")
    assert code == 0, err
    one = json.loads(out)
    done = _launch(*args, "--out", tmp_path / "two")
    two = json.loads(done.stdout)  # one JSON document: only rank 0 prints
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=0)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5, abs=0)
        assert a["val_f1"] == b["val_f1"]
    # Adam at lr 3e-3 for 28 steps moves the weights by ~1e-2; one process and two agree to float error.
    _assert_same_tensors(load_file(tmp_path / "one" / "model.safetensors"),
                         load_file(tmp_path / "two" / "model.safetensors"), tol=2e-5)
    assert one["thresholds"]["per_genre"] == pytest.approx(two["thresholds"]["per_genre"], abs=1e-4)


@pytest.mark.slow
def test_train_captions_in_two_processes_equals_one(capsys, tmp_path, caption_cache_dir, tiny_lm_dir):
    # Joint training of the LM, so DDP averages GPT-2's gradients too; dropout off to compare exactly.
    lm = shutil.copytree(tiny_lm_dir, tmp_path / "lm")
    config = json.loads((lm / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (lm / "config.json").write_text(json.dumps(config))
    # Global batches of 11 (6 + 5 rows) accumulated in pairs: one optimizer step per 22 posters.
    args = ["train", "captions", "--cache", caption_cache_dir, "--lm", lm, "--mode", "joint", "--prefix-length", 4,
            "--max-tokens", 16, "--epochs", 2, "--batch-size", 11, "--accumulate", 2, "--lr", 2e-3,
            "--warmup-steps", 2, "--device", "cpu", "--threads", 1, "--json"]
    code, out, err = run_cli(capsys, *args, "--out", tmp_path / "one")
    assert code == 0, err
    one = json.loads(out)
    done = _launch(*args, "--out", tmp_path / "two")
    two = json.loads(done.stdout)
    assert (one["steps"], one["train_examples"]) == (two["steps"], two["train_examples"])
    for a, b in zip(one["history"], two["history"], strict=True):
        # Rounded to 5 decimals; a rank training on every row of the global batch moves them by ~2e-4.
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=0)
        assert a["validation_loss"] == pytest.approx(b["validation_loss"], rel=1e-5, abs=0)
    for name in ("mapper.safetensors", "lm/model.safetensors"):
        _assert_same_tensors(load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name), tol=1e-4)
    assert not any(p.name.startswith("epoch-") for p in (tmp_path / "two" / "checkpoints").iterdir()
                   if p.name != "epoch-0002")
