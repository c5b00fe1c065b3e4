"""The GPU benchmark (scripts/bench/gpu.sh → gpu_bench.py) runs end to end on a CPU with --quick.

Its figures on a CPU are no GPU figures; what is checked is that every stage ran through the library
and reported a positive rate, so that the script works the first time it meets a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench"


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_quick_run_on_cpu_reports_every_figure(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_bench.py"), "--quick", "--device", "cpu", "--json",
                           "--cpu-workers", "2", "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=280, env=env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["device"] == "cpu" and result["gpu"].startswith("no GPU") and result["quick"] is True
    emb = result["embedding"]
    assert emb["posters"] == 24 and emb["gpu_decode_fallbacks"] == 0 and emb["weights"].startswith("random")
    for key in ("model_alone_posters_per_second", "cpu_decode_posters_per_second", "cpu_decode_end_to_end",
                "gpu_decode_posters_per_second", "gpu_decode_end_to_end", "gpu_over_cpu_decode",
                "gpu_decode_tokens_posters_per_second", "tokens_over_pooled"):
        assert emb[key] > 0, key
    genre = result["genre_training"]
    assert genre["epochs"] == 1 and genre["seconds_per_epoch"] > 0 and genre["dim"] == 64
    cap = result["caption_training"]
    assert cap["tokens_per_second"] > 0 and cap["train_examples"] > 0 and "GPT-2-shaped" in cap["lm"]
    tag = result["tagline_generation"]
    assert tag["taglines_per_second"] > 0 and tag["posters"] == 4
    # The posters stay in --work for the next run; the table is printed from the JSON.
    assert len(list((tmp_path / "work" / "posters").rglob("*.jpg"))) == 24
    saved = tmp_path / "result.json"
    saved.write_text(proc.stdout)
    shown = subprocess.run([sys.executable, str(BENCH / "gpu_bench.py"), "--table", str(saved)],
                           capture_output=True, text=True, timeout=60, env=env())
    lines = shown.stdout.splitlines()
    assert shown.returncode == 0 and len(lines) == 8 and lines[0].startswith("no GPU (cpu) · 24 posters")
    assert [line.split("  ")[0] for line in lines[1:]] == [
        "embedding: model alone", "embedding: CPU decode (2 threads)", "embedding: GPU decode (cpu)",
        "embedding: GPU decode + tokens", "genre head training", "caption training", "tagline generation"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_sh_without_a_gpu_says_so_in_one_line(tmp_path):
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh")], capture_output=True, text=True, timeout=120,
                          env={**env(), "PYTHON": sys.executable, "WORK": str(tmp_path / "work")})
    assert proc.returncode == 2 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no CUDA GPU" in errors[0]
    assert not (tmp_path / "work" / "posters").exists()
