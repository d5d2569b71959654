"""Tokenizer benchmark on the Debian Japanese corpus: ours against plain SentencePiece and kyoto.

Trains, on the same documents (the corpus less a held-out tenth, chosen by the split hash that
``hataori data prepare`` uses):

- ``ours``: ``configs/tokenizer/ja-unigram-32k.yaml`` through ``hataori tokenizer train``;
- ``plain``: SentencePiece at its usual settings for Japanese, character_coverage 0.9995, with the
  same identity normalization, byte fallback, digit splitting and newline piece, but no required
  characters;

then compares both with ``kyoto_ja_unigram_8000.model`` (from the sentencepiece sdist, Apache-2.0)
on the held-out tenth and on out-of-domain text, and prints training times and the eval table.

    python benchmarks/tokenizer_coverage.py --corpus data/debian-ja/corpus.jsonl \\
        --other data/ja-news/corpus.jsonl --kyoto PATH/kyoto_ja_unigram_8000.model --out runs/bench-tokenizer

The kyoto model: ``pip download --no-binary :all: --no-deps sentencepiece==0.2.3`` and take
``test/kyoto_ja_unigram_8000.model`` from the archive.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import sentencepiece as spm

from hataori.cli import main as hataori_main
from hataori.corpus.sources import in_validation
from hataori.tokenizer.evaluate import evaluate, format_table, load_texts

VAL_FRACTION, SPLIT_SEED = 0.1, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="the Debian corpus.jsonl")
    parser.add_argument("--other", required=True, help="out-of-domain text (JSONL with a text field)")
    parser.add_argument("--kyoto", help="kyoto_ja_unigram_8000.model, for comparison")
    parser.add_argument("--out", required=True, help="folder for the models and the held-out split")
    parser.add_argument("--vocab-size", type=int, default=32000)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    docs = [json.loads(line)["text"] for line in open(args.corpus, encoding="utf-8")]
    held = [d for d in docs if in_validation(d, VAL_FRACTION, SPLIT_SEED)]
    train = [d for d in docs if not in_validation(d, VAL_FRACTION, SPLIT_SEED)]
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in held)
    print(f"{len(train):,} training documents ({sum(map(len, train)):,} chars), "
          f"{len(held):,} held out ({sum(map(len, held)):,} chars)")

    started = time.perf_counter()
    assert hataori_main(["tokenizer", "train", "configs/tokenizer/ja-unigram-32k.yaml", "--input", args.corpus,
                         "--output", str(out / "ours"), f"vocab_size={args.vocab_size}",
                         f"val_fraction={VAL_FRACTION}", f"split_seed={SPLIT_SEED}", "progress=false"]) == 0
    ours_seconds = time.perf_counter() - started

    started = time.perf_counter()
    lines = [line for doc in train for line in doc.split("\n") if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=args.vocab_size, character_coverage=0.9995,
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        normalization_rule_name="identity", user_defined_symbols=["\n"], max_sentence_length=16384,
        num_threads=2, minloglevel=2)
    (out / "plain.model").write_bytes(model.getvalue())
    plain_seconds = time.perf_counter() - started
    print(f"training at {args.vocab_size:,}: ours {ours_seconds:.1f} s, plain SentencePiece {plain_seconds:.1f} s")

    models = [str(out / "ours"), str(out / "plain.model")] + ([args.kyoto] if args.kyoto else [])
    texts = [load_texts(str(out / "heldout.jsonl"), "text", None), load_texts(args.other, "text", None)]
    result = evaluate(models, texts)
    (out / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(format_table(result))


if __name__ == "__main__":
    main()
