#!/usr/bin/env bash
# Create .venv (if absent) and install into it exactly the versions requirements.lock pins (the ones the
# whole test suite passed with), then hataori itself with its test tools; as root, fetch Debian's package
# lists when missing (the corpus builder downloads packages with apt-get). Safe to rerun: pip skips what
# is already installed, and the check at the end says what differs from the lock.
#
#   PYTHON=python3.11 bash scripts/setup.sh    # the Python to make .venv with (the lock's: see its header)
#   HATAORI_VENV=DIR                           # another folder than .venv
#   HATAORI_UNLOCKED=1                         # the newest versions setup.py's ranges allow (torch kept at
#                                              # the lock's), as scripts/lock.sh installs them
#
# torch is the CPU build on this kind of machine; on a GPU machine install the CUDA build of the locked
# release first (pip leaves a build of the same version in place).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${HATAORI_VENV:-.venv}
LOCK=requirements.lock
UNLOCKED=${HATAORI_UNLOCKED:-0}
if [ "$UNLOCKED" != 1 ]; then
  "$PYTHON" scripts/requirements_lock.py python "$LOCK"
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if [ "$UNLOCKED" = 1 ]; then
  "$PY" -m pip install -q --upgrade pip setuptools
  "$PY" -m pip install -q "torch==$("$PY" scripts/requirements_lock.py version torch "$LOCK")" -e ".[dev]"
else
  "$PY" scripts/requirements_lock.py python "$LOCK"  # an existing venv of another Python
  "$PY" -m pip install -q "pip==$("$PY" scripts/requirements_lock.py version pip "$LOCK")"
  # Packages built from source here (DeepSpeed) get their build tools at the locked versions too.
  "$PY" -m pip install -q --build-constraint "$LOCK" -r "$LOCK"
  # hataori itself, built with the locked setuptools in the venv; its dependencies are all in already.
  "$PY" -m pip install -q --no-deps --no-build-isolation -e ".[dev]"
  "$PY" scripts/requirements_lock.py check "$LOCK"
fi
if ! broken=$("$PY" -m pip check); then
  echo "$broken" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ] && ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
  apt-get update -qq
fi
