#!/usr/bin/env bash
# Supervised fine-tuning of the main job's model on 2 CPU processes: the JGLUE instruction set in, a chat
# model out to transformers.
#   the main job's run (scripts/main.sh) -> its tokenizer + the chat template's pieces -> the JGLUE
#   instruction set (decontaminated) -> conversation shards -> JCommonsenseQA before -> hataori sft
#   init.from_run -> JCommonsenseQA after -> hataori export hf (with the template) -> chat in transformers
# Every step reuses what an earlier run left complete; outputs go under data/, models/ and runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

BASE_RUN=${BASE_RUN:-runs/pretrain/toy}
TOKENIZER=runs/tokenizer/ja-unigram-32k
CHAT_TOKENIZER=runs/tokenizer/ja-unigram-32k-chat
SHARDS=data/shards/jglue-sft
RUN=runs/sft/toy
[ -d "$BASE_RUN/checkpoints" ] || { echo "no $BASE_RUN: run scripts/main.sh first (or set BASE_RUN)" >&2; exit 2; }

[ -f "$CHAT_TOKENIZER/tokenizer.model" ] || hataori tokenizer extend "$TOKENIZER" \
  --pieces '<|im_start|>,<|im_end|>' --output "$CHAT_TOKENIZER"
hataori corpus jglue-sft data/jglue-sft
hataori data prepare --input data/jglue-sft/sft.jsonl --tokenizer "$CHAT_TOKENIZER" \
  --chat-template configs/chat/ja-chatml.jinja --output "$SHARDS" max_tokens=257 val_docs=200
hataori eval "$BASE_RUN" --task jcommonsenseqa --output "$BASE_RUN-jcommonsenseqa.json" --replace
time hataori sft configs/train/sft-toy.yaml --data "$SHARDS" --run-dir "$RUN" --nproc 2 \
  init.from_run="$BASE_RUN" init.base_tokenizer="$TOKENIZER"
hataori eval "$RUN" --task jcommonsenseqa --output "$RUN-jcommonsenseqa.json" --replace
hataori export hf "$RUN" --output models/sft-toy --replace  # a rerun replaces the earlier export
hataori generate "$RUN" "日本で一番高い山はどこですか？" --chat --greedy --max-new-tokens 20
python scripts/hf_chat.py models/sft-toy "日本で一番高い山はどこですか？" --greedy --max-new-tokens 20
