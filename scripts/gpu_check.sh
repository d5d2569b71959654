#!/usr/bin/env bash
# The GPU check in one command: install what is missing, then run hataori's GPU tests and benchmarks
# and write every figure to one results file (scripts/gpu_check.py says what runs and what it writes).
#
#   bash scripts/gpu_check.sh [--python PY] [--wheels DIR | --no-install] [gpu_check.py options]
#
# The Python used (--python, else $PYTHON, else python3) must already hold a CUDA build of torch (with the
# Triton it pins); nothing replaces it. Then:
#   --wheels DIR   offline: install DIR's wheels (scripts/gpu_wheels.sh makes the set: DeepSpeed and
#                  what the CUDA image lacks; a flash-attn wheel if you have one) and hataori itself into a
#                  private folder ($HATAORI_SITE, default /tmp/hataori-site), without an index. The default
#                  when a folder .whl is at the repository root.
#   --no-install   use the environment as it is (hataori and its dependencies installed already).
#   otherwise      pip install -e . from the package index.
# gpu_check.py options: --out DIR, --only STAGES, --workers N, --time-budget SECONDS, --rehearse (every
# stage on the CPU at toy sizes: checks this script before GPU time is spent on it).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=""
INSTALL=1
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python) [ $# -ge 2 ] || { echo "gpu_check.sh: --python needs a value" >&2; exit 2; }; PY=$2; shift 2 ;;
    --wheels) [ $# -ge 2 ] || { echo "gpu_check.sh: --wheels needs a folder" >&2; exit 2; }; WHEELS=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    *) PASS+=("$1"); shift ;;
  esac
done
if [ "$INSTALL" = 1 ] && [ -z "$WHEELS" ] && [ -d .whl ]; then
  WHEELS=.whl
fi
if [ -n "$WHEELS" ] && ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "gpu_check.sh: --wheels $WHEELS: no .whl files there (make them with scripts/gpu_wheels.sh)" >&2
  exit 2
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check.sh: $PY has no torch; install PyTorch's CUDA build first (https://pytorch.org), or pass --python" >&2
  exit 2
fi

# Keep the current folder off sys.path (Python >= 3.11), so that the copy installed above is the one imported
# and its check below sees what is missing from the install, not the repository's hataori/.
export PYTHONSAFEPATH=1
start=$(date +%s)
if [ "$INSTALL" = 1 ]; then
  if [ -n "$WHEELS" ]; then
    SITE=${HATAORI_SITE:-/tmp/hataori-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
    # hataori itself, built from this copy with the setuptools at hand (nothing fetched).
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" .
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    "$PY" -m pip install -q -e .
  fi
  echo "installed in $(( $(date +%s) - start )) s"
fi
"$PY" - <<'PY'
import importlib.util, sys
needed = ["hataori", "deepspeed", "omegaconf", "sentencepiece", "tensorboard", "safetensors", "tokenizers",
          "transformers", "zstandard", "tqdm", "google.protobuf", "triton", "pytest"]
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"gpu_check.sh: missing Python packages: {', '.join(missing)}; install them, or carry their "
             "wheels (scripts/gpu_wheels.sh) and pass --wheels DIR")
PY
exec "$PY" scripts/gpu_check.py ${PASS[@]+"${PASS[@]}"}
