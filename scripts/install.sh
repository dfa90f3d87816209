#!/usr/bin/env bash
# Install posttrain and what it needs. Keeps a torch that is already installed (a
# user's CUDA build stays); otherwise pins the CPU build so pip never pulls the
# multi-gigabyte CUDA wheels onto a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
"$PY" -m pip install -q -e ".${extras:+[$extras]}"
