#!/usr/bin/env bash
# The GPU check in one call (bench/gpu_check.py): correctness on CUDA against the CPU, the CCSI BloodMNIST
# protocol at the paper's settings with the fastest switches, bench/speed.py; report in bench/results/.
#   bash bench/gpu_check.sh                 # on a CUDA machine, under 8 minutes
#   bash bench/gpu_check.sh --cpu_short     # every stage shortened, on the CPU (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if ! "$PY" -c "import torch" 2>/dev/null; then
    PY=python3  # a machine with torch installed system-wide
fi
exec "$PY" bench/gpu_check.py "$@"
