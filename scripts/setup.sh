#!/usr/bin/env bash
# Create .venv (if absent) and install hataori with its test tools into it; as root, fetch Debian's
# package lists when missing (the corpus builder downloads packages with apt-get).
# Safe to rerun: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch (and the Triton release it is built against) are pinned for reproducible CPU runs; on a
# GPU machine install the CUDA build of your choice first and drop the pins.
.venv/bin/python -m pip install -q "torch==2.13.0" "triton==3.7.1" -e ".[dev]"
if [ "$(id -u)" = 0 ] && ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
  apt-get update -qq
fi
