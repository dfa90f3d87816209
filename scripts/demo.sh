#!/usr/bin/env bash
# Install, then run `posttrain demo`: every stage on a tiny local model and a verifiable task, on CPU, and the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUT=${1:-runs/demo}
"${PYTHON:-python3}" -m posttrain.demo "$OUT"
