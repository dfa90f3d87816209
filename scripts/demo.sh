#!/usr/bin/env bash
# Install, build the tiny model and a synthetic instruction task locally, and run a short SFT on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUT=${1:-runs/demo}
"${PYTHON:-python3}" -m posttrain.demo "$OUT"
