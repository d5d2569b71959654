#!/usr/bin/env bash
# Set up the environment and run the whole test suite (CPU only; no GPU needed).
# Builds the corpora the tests read on first use into ~/.cache/hataori-tests (scripts/test_data.sh) and
# reuses them after.
# HATAORI_VENV and HATAORI_UNLOCKED are setup.sh's (scripts/lock.sh runs the suite on the newest versions so).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The Slurm tests start a real cluster (munged, slurmctld, two slurmd) from Debian's packages
# (setup.sh fetched the package lists).
if [ "$(id -u)" = 0 ] && ! { command -v sbatch && command -v munged; } >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
bash scripts/test_data.sh
# pytest's header gives the versions and the CPU flags that decide which tests skip (tests/conftest.py).
exec "${HATAORI_VENV:-.venv}/bin/python" -m pytest "$@"
