#!/usr/bin/env bash
# Wheels for a GPU machine without a package index: what hataori needs beyond a CUDA PyTorch image
# (torch, triton, numpy, sentencepiece, tensorboard, transformers, safetensors, tokenizers, protobuf,
# tqdm, pytest and setuptools are assumed there), at the versions requirements.lock pins, which the
# tests passed with. scripts/gpu_check.sh --wheels DIR installs them there.
#
#   bash scripts/gpu_wheels.sh [DIR] [--python-version 3.12]
#
# DIR defaults to .whl (git ignores it). DeepSpeed is published as a source archive only: it is built
# here into a pure-Python wheel (no compiled ops; hataori needs none). The others are binary wheels for
# the given CPython on x86-64 Linux. A flash-attn wheel, if you have one for the machine's torch and
# CUDA, can be copied into DIR too.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=.whl
PYVER=3.12
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) [ $# -ge 2 ] || { echo "gpu_wheels.sh: --python-version needs a value, e.g. 3.12" >&2; exit 2; }
                      PYVER=$2; shift 2 ;;
    -*) echo "gpu_wheels.sh: unknown option $1" >&2; exit 2 ;;
    *) DIR=$1; shift ;;
  esac
done
PIP=(.venv/bin/python -m pip)
[ -x .venv/bin/python ] || { echo "gpu_wheels.sh: no .venv here; run scripts/setup.sh first" >&2; exit 2; }

version() { .venv/bin/python scripts/requirements_lock.py version "$1"; }
pins=()
for name in hjson omegaconf pydantic pydantic-core annotated-types typing-inspection zstandard; do
  v=$(version "$name")
  pins+=("$name==$v")
done
deepspeed=$(version deepspeed)
mkdir -p "$DIR"
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" "${pins[@]}"
"${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$DIR" "deepspeed==$deepspeed"
ls -1 "$DIR"
du -sh "$DIR"
