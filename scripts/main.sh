#!/usr/bin/env bash
# The main job on a fresh machine: set up, build the Debian Japanese corpus, train a 32k Japanese
# tokenizer, compare it on out-of-domain text, encode token shards, measure the loader, and pretrain
# the toy model with two DeepSpeed processes (validation bits per character before and after).
# Every step reuses what an earlier run left complete; outputs go under data/ and runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

TOKENIZER=runs/tokenizer/ja-unigram-32k
SHARDS=data/shards/debian-ja

hataori corpus debian-ja data/debian-ja
hataori corpus ja-news data/ja-news
if [ ! -f "$TOKENIZER/tokenizer.model" ]; then
  hataori tokenizer train configs/tokenizer/ja-unigram-32k.yaml --input data/debian-ja/corpus.jsonl --output "$TOKENIZER"
fi
hataori tokenizer eval "$TOKENIZER" --text data/ja-news/corpus.jsonl
hataori data prepare --input data/debian-ja/corpus.jsonl --tokenizer "$TOKENIZER" --output "$SHARDS" --workers 2
hataori data bench "$SHARDS" --seq-len 2048 --batch 8 --seconds 3

# Pretrain the toy preset: 2 CPU processes in fp32, or up to 2 GPUs in bf16 where there are GPUs.
# A finished run is resumed at its last step and only summarised.
GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
if [ "$GPUS" -gt 0 ]; then
  NPROC=$(( GPUS < 2 ? GPUS : 2 )); PRECISION=bf16
else
  NPROC=2; PRECISION=fp32
fi
time hataori pretrain configs/train/toy.yaml --data "$SHARDS" --run-dir runs/pretrain/toy --nproc "$NPROC" \
  zero.precision="$PRECISION"
# What the model learned: a sampled continuation of a prompt (greedy decoding of a model this small
# soon repeats the newline, the commonest token).
hataori generate runs/pretrain/toy "Debian のパッケージは" --max-new-tokens 60 --temperature 0.8 --top-k 40 --seed 1
