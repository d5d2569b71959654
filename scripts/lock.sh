#!/usr/bin/env bash
# Refresh requirements.lock: install the newest versions setup.py's ranges allow into a fresh .venv-lock
# (torch kept at the lock's version: a torch upgrade is a change of its own; edit the lock's torch line
# first), run the whole test suite with them, and only when it passes write them as the new lock,
# printing what changed. On a failure the lock is left as it was.
#
#   bash scripts/lock.sh [pytest options]
#
# The suite's lock tests (tests/test_requirements_lock.py) check the candidate: this environment written as a
# lock into a temporary file, named by HATAORI_LOCK (a new dependency is in it, not yet in requirements.lock).
# Then `bash scripts/setup.sh` installs the new lock into .venv; commit requirements.lock on its own.
set -euo pipefail
cd "$(dirname "$0")/.."

export HATAORI_VENV=.venv-lock HATAORI_UNLOCKED=1
rm -rf "$HATAORI_VENV"
bash scripts/setup.sh
candidate=$(mktemp --suffix=.lock)
trap 'rm -f "$candidate"' EXIT
"$HATAORI_VENV/bin/python" scripts/requirements_lock.py freeze "$candidate" >/dev/null
if ! HATAORI_LOCK="$candidate" bash scripts/test.sh "$@"; then
  echo "lock.sh: the suite failed on the newest versions ($HATAORI_VENV holds them); requirements.lock is unchanged" >&2
  exit 1
fi
"$HATAORI_VENV/bin/python" scripts/requirements_lock.py freeze requirements.lock
