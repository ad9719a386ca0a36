#!/usr/bin/env bash
# The GPU check in one call (bench/gpu_check.py): correctness on CUDA against the CPU, the CCSI BloodMNIST
# protocol at the paper's settings with the fastest switches, bench/speed.py; the report (verdicts first) and the
# log go into --out DIR (default bench/results). Runs on a bare CUDA machine's python3: no venv, medmnist, wandb,
# tensorboard or network needed.
#   bash bench/gpu_check.sh --out /tmp/gpu_check     # on a CUDA machine, under 8 minutes
#   bash bench/gpu_check.sh --cpu_short --out DIR    # every stage shortened, on the CPU (what CI runs)
# Interpreter: $PYTHON when set, else the project's .venv when it has torch, else python3. Relative paths in the
# arguments are taken from the repository's root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
    PY=.venv/bin/python
else
    PY=python3  # a machine with torch installed system-wide
fi
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    echo "error: $PY cannot import torch and torchvision, which the GPU check needs (pip install torch torchvision)" >&2
    exit 2
fi
exec "$PY" bench/gpu_check.py "$@"
