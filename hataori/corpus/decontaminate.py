"""``hataori corpus decontaminate``: which training records share a stretch of text with evaluation data.

    hataori corpus decontaminate TRAIN.jsonl [...] --against EVAL [EVAL ...] [--n 13] [--examples 5]

Text. Every string of a record, at any depth (the contents of ``messages``, ``prompt``, ``completion``,
``chosen``, ``rejected``, ``text``; an evaluation file's questions, choices, sentences, passages and
answers), is normalised (NFKC, lower case, whitespace, punctuation and symbols removed) and cut into its
character n-grams, ``n`` = 13 by default: a Japanese question or sentence of a benchmark is some 15-40
such characters, so a copied question shares many n-grams while two questions on the same topic, or a
shared answer word, share none. Strings shorter than ``n`` after normalising (choice words, numbers) are
not compared.

Files. A training file is JSONL (``.gz``/``.zst`` too), one record a line. An evaluation file is JSONL, or
one JSON document (JSQuAD's SQuAD layout), whose every string counts.

The report names, for each evaluation file, how many training records share an n-gram with it and shows
a few, with the shared stretch. The command exits with status 0 when no record overlaps and 1 when some
do, so a script can stop on contamination; :func:`find_overlaps` is what the instruction-set builder
(:mod:`hataori.corpus.jglue_sft`) drops records by.
"""

from __future__ import annotations

import argparse
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from hataori.corpus.sources import iter_lines
from hataori.errors import ConfigError, InputError

DEFAULT_N = 13


def strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value, depth first (keys are not text)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def normalize(text: str) -> str:
    """NFKC, lower case, and only letters, marks and digits kept (whitespace, punctuation, symbols dropped)."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).lower() if unicodedata.category(c)[0] in "LMN")


def ngrams(value: Any, n: int) -> dict[int, str]:
    """The character n-grams of every string of ``value`` long enough, by hash (within this process)."""
    found = {}
    for text in strings(value):
        clean = normalize(text)
        for i in range(len(clean) - n + 1):
            gram = clean[i:i + n]
            found[hash(gram)] = gram
    return found


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, record) of a JSONL file; a malformed line is an error naming it."""
    for number, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(path, f"malformed JSON ({err.msg} at column {err.colno})", line=number) from None


def read_eval(path: Path) -> Iterator[Any]:
    """The records of an evaluation file: one JSON document (whole), or JSONL."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "no such evaluation file") from None
    except UnicodeDecodeError as err:
        raise InputError(path, f"not UTF-8 text: {err}") from None
    try:
        yield json.loads(text)
        return
    except json.JSONDecodeError:
        pass
    for _, record in read_records(path):
        yield record


@dataclass
class EvalIndex:
    """The n-grams of some evaluation files, each mapped to the first file it came from."""

    n: int
    files: list[str]
    grams: dict[int, int] = field(default_factory=dict)

    @classmethod
    def build(cls, paths: Iterable[str | Path], n: int = DEFAULT_N) -> "EvalIndex":
        if n < 1:
            raise ConfigError("--n", f"must be at least 1, got {n}")
        index = cls(n, [str(p) for p in paths])
        for i, path in enumerate(index.files):
            for record in read_eval(Path(path)):
                for gram in ngrams(record, n):
                    index.grams.setdefault(gram, i)
        return index

    def overlap(self, record: Any) -> tuple[int, str] | None:
        """(evaluation file index, the shared n-gram) of the first n-gram ``record`` shares, or None."""
        for key, gram in ngrams(record, self.n).items():
            if key in self.grams:
                return self.grams[key], gram
        return None


def find_overlaps(records: Iterable[tuple[str, Any]], index: EvalIndex) -> dict[str, tuple[int, str]]:
    """For each (where, record) that shares an n-gram with the index: where -> (file index, n-gram)."""
    return {where: hit for where, record in records if (hit := index.overlap(record)) is not None}


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("train", nargs="+", type=Path, metavar="TRAIN.jsonl", help="training data (JSONL)")
    parser.add_argument("--against", nargs="+", type=Path, required=True, metavar="EVAL",
                        help="evaluation files (JSONL, or one JSON document such as JSQuAD's)")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"n-gram length in characters (default {DEFAULT_N})")
    parser.add_argument("--examples", type=int, default=5, help="overlapping records to show per evaluation file")


def main(args: argparse.Namespace) -> int:
    index = EvalIndex.build(args.against, args.n)
    records = [(f"{path}:{line}", record) for path in args.train for line, record in read_records(path)]
    hits = find_overlaps(records, index)
    print(f"{len(records):,} training records in {len(args.train)} file(s) against {len(index.files)} evaluation "
          f"file(s) ({len(index.grams):,} distinct {args.n}-character n-grams): {len(hits):,} overlap")
    for i, name in enumerate(index.files):
        mine = [(where, gram) for where, (file, gram) in hits.items() if file == i]
        print(f"  {name}: {len(mine):,} training records share text with it")
        for where, gram in mine[:args.examples]:
            print(f"    {where}: {gram!r}")
    return 1 if hits else 0
