#!/usr/bin/env bash
# Set up the environment and run the whole test suite (CPU only; no GPU needed).
# Builds the Debian Japanese corpus on first use into ~/.cache/hataori-tests and reuses it after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
