#!/usr/bin/env bash
# GPU figures in one short run (under 6 minutes on one H100): ViT-B-32 embedding from JPEG files with
# CPU decoding vs GPU decoding, genre-head training, caption training tokens/s, batched taglines.
#
#   scripts/bench/gpu.sh [--pretrained VIT_B_32_CHECKPOINT] [--lm GPT2_FOLDER] [other gpu_bench.py flags]
#
# Works offline: without --pretrained the backbone has random weights (speed does not depend on the
# weights; the table says so), without --lm the caption LM is a random GPT-2-shaped one. Posters are
# generated once under $WORK (default runs/bench-gpu) and reused; the table is printed and the same
# figures are written to $WORK/gpu_bench.json. PYTHON picks the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WORK=${WORK:-runs/bench-gpu}
mkdir -p "$WORK"

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: no CUDA GPU visible to torch; this benchmark is for a GPU machine (on a CPU: $PY scripts/bench/gpu_bench.py --quick --device cpu)" >&2
  exit 2
fi

echo "posters: generating (or reusing) the synthetic JPEG posters under $WORK/posters" >&2
timeout 120 "$PY" scripts/bench/gpu_bench.py --work "$WORK" --synth-only "$@" >&2
echo "benchmark: embedding, genre training, caption training, taglines" >&2
timeout 330 "$PY" scripts/bench/gpu_bench.py --work "$WORK" --json "$@" > "$WORK/gpu_bench.json"
"$PY" scripts/bench/gpu_bench.py --table "$WORK/gpu_bench.json"
