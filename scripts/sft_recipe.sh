#!/usr/bin/env bash
# Post-training on 2 CPU processes: a base model through supervised fine-tuning on the JGLUE instruction set,
# then DPO on JCommonsenseQA preference pairs, out to transformers as a chat model.
#   the base (BASE: the main job's run by default) -> its tokenizer + the chat template's pieces -> the JGLUE
#   instruction set and preference pairs (decontaminated) -> conversation and pair shards -> JCommonsenseQA
#   before -> hataori sft -> JCommonsenseQA -> hataori dpo -> JCommonsenseQA -> hataori export hf (with the
#   template) -> a reply in hataori and in transformers
# Every step reuses what an earlier run left complete; outputs go under data/, models/ and runs/.
#   BASE=DIR   a hataori run (scripts/main.sh's runs/pretrain/toy, the default; or the continued-pretraining
#              recipe's runs/continue/toy) or a transformers model folder with its tokenizer.model (an import)
#   NAME=NAME  names the runs and exports: runs/sft/NAME, runs/dpo/NAME, models/sft-NAME, models/dpo-NAME
#              (default toy)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

BASE=${BASE:-runs/pretrain/toy}
NAME=${NAME:-toy}
if [ -d "$BASE/checkpoints" ]; then  # a run: its weights, and the tokenizer it trained with
  INIT="init.from_run=$BASE"
  TOKENIZER=$(python -c 'import json, os, sys; print(os.path.dirname(json.load(open(sys.argv[1]))["tokenizer"]["path"]))' \
    "$BASE/provenance.json")
elif [ -f "$BASE/config.json" ] && [ -f "$BASE/tokenizer.model" ]; then  # a transformers model folder
  INIT="init.from_hf=$BASE"
  TOKENIZER=$BASE
else
  echo "BASE=$BASE: neither a hataori run (checkpoints/) nor a transformers model folder (config.json and" \
    "tokenizer.model); run scripts/main.sh first for the default" >&2
  exit 2
fi
CHAT_TOKENIZER=runs/tokenizer/$(basename "$TOKENIZER")-chat
SFT_SHARDS=data/shards/jglue-sft-$(basename "$TOKENIZER")
DPO_SHARDS=data/shards/jglue-dpo-$(basename "$TOKENIZER")
SFT_RUN=runs/sft/$NAME
DPO_RUN=runs/dpo/$NAME
QUESTION="日本で一番高い山はどこですか？"

[ -f "$CHAT_TOKENIZER/tokenizer.model" ] || hataori tokenizer extend "$TOKENIZER" \
  --pieces '<|im_start|>,<|im_end|>' --output "$CHAT_TOKENIZER"
hataori corpus jglue-sft data/jglue-sft
hataori data prepare --input data/jglue-sft/sft.jsonl --tokenizer "$CHAT_TOKENIZER" \
  --chat-template configs/chat/ja-chatml.jinja --output "$SFT_SHARDS" max_tokens=257 val_docs=200
# A pair must fit a row of 256 positions: both conversations of up to 129 tokens; longer pairs are dropped.
hataori data prepare --input data/jglue-sft/preference.jsonl --tokenizer "$CHAT_TOKENIZER" \
  --chat-template configs/chat/ja-chatml.jinja --output "$DPO_SHARDS" preference=true max_tokens=129 \
  overlong=drop val_docs=200
hataori eval "$BASE" --task jcommonsenseqa --output "runs/$NAME-base-jcommonsenseqa.json" --replace
time hataori sft configs/train/sft-toy.yaml --data "$SFT_SHARDS" --run-dir "$SFT_RUN" --nproc 2 \
  "$INIT" init.base_tokenizer="$TOKENIZER"
hataori eval "$SFT_RUN" --task jcommonsenseqa --output "$SFT_RUN-jcommonsenseqa.json" --replace
time hataori dpo configs/train/dpo-toy.yaml --data "$DPO_SHARDS" --run-dir "$DPO_RUN" --nproc 2 \
  init.from_run="$SFT_RUN"
hataori eval "$DPO_RUN" --task jcommonsenseqa --output "$DPO_RUN-jcommonsenseqa.json" --replace
hataori export hf "$SFT_RUN" --output "models/sft-$NAME" --replace  # a rerun replaces the earlier exports
hataori export hf "$DPO_RUN" --output "models/dpo-$NAME" --replace
hataori generate "$DPO_RUN" "$QUESTION" --chat --greedy --max-new-tokens 20
python scripts/hf_chat.py "models/dpo-$NAME" "$QUESTION" --greedy --max-new-tokens 20
