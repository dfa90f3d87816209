#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (CPU only; GPU tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
# Debian's Chromium for the report's browser test (skipped without it); never a browser download.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (timeout 300 apt-get update -qq && timeout 300 apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "chromium could not be installed: the report's browser test will skip"
fi
exec "${PYTHON:-python3}" -m pytest "$@"
