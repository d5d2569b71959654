#!/usr/bin/env bash
# The continued-pretraining recipe on 2 CPU processes: a Llama-family model comes in, gets a Japanese
# vocabulary, continues on Japanese shards, goes out to transformers and generates.
#   base tokenizer (English, Llama's settings) -> small random Llama written by transformers
#   -> Japanese BPE tokenizer -> extended tokenizer -> shards -> hataori pretrain init.from_hf
#   -> hataori export hf -> transformers generate
# Every step reuses what an earlier run left complete; outputs go under data/, models/ and runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

BASE_TOKENIZER=runs/tokenizer/en-bpe-8k
JA_TOKENIZER=runs/tokenizer/ja-bpe-8k
EXTENDED=runs/tokenizer/en-bpe-8k-ja
BASE_MODEL=models/small-llama
SHARDS=data/shards/debian-ja-extended
RUN=runs/continue/toy

hataori corpus debian-ja data/debian-ja
hataori corpus python-docs data/python-docs
[ -f "$BASE_TOKENIZER/tokenizer.model" ] || hataori tokenizer train configs/tokenizer/en-bpe-llama-style.yaml \
  --input data/python-docs/corpus.jsonl --output "$BASE_TOKENIZER"
[ -f "$BASE_MODEL/config.json" ] || python scripts/small_llama.py --tokenizer "$BASE_TOKENIZER" --output "$BASE_MODEL"
[ -f "$JA_TOKENIZER/tokenizer.model" ] || hataori tokenizer train configs/tokenizer/ja-bpe-32k.yaml \
  --input data/debian-ja/corpus.jsonl --output "$JA_TOKENIZER" vocab_size=8000 required_chars=kana
[ -f "$EXTENDED/tokenizer.model" ] || hataori tokenizer extend "$BASE_TOKENIZER" --add "$JA_TOKENIZER" \
  --output "$EXTENDED" --ja-text data/debian-ja/corpus.jsonl --other-text data/python-docs/corpus.jsonl
hataori data prepare --input data/debian-ja/corpus.jsonl --tokenizer "$EXTENDED" --output "$SHARDS" --workers 2
time hataori pretrain configs/train/continue-toy.yaml init.from_hf="$BASE_MODEL" --data "$SHARDS" \
  --run-dir "$RUN" --nproc 2
hataori export hf "$RUN" --output "$RUN-hf" --replace  # a rerun replaces the earlier export
python scripts/hf_generate.py "$RUN-hf" "Debian のパッケージは" --max-new-tokens 40
