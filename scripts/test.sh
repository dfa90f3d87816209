#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (CPU only; GPU tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
exec "${PYTHON:-python3}" -m pytest "$@"
