"""Scores of generated answers: normalisation, exact match and character F1, against one gold answer or several.

Normalisation (:func:`normalize`), applied to the answer and to every gold one before comparing:

1. Unicode NFKC: full-width Latin letters, digits and spaces become half-width (ＡＢＣ１２３ -> ABC123),
   half-width katakana full-width (ｶﾀｶﾅ -> カタカナ);
2. whitespace removed, wherever it is (Japanese answers carry no meaning in spaces);
3. punctuation and symbols removed (Unicode categories P* and S*: 。、「」・!? and the like), so that
   「東京」です。 and 東京です compare equal.

``exact_match`` is 1 where the normalised answer equals a normalised gold answer; ``char_f1`` is SQuAD's F1
taken over characters instead of words: the characters the two normalised strings share (as multisets)
against the answer's length (precision) and the gold's (recall), the best over the gold answers. Both are
0 for an empty answer unless a gold answer is empty too.

A numeric answer (JSTS's similarity) is the first number in the answer after NFKC (:func:`parse_number`:
``3.5``, ``３．５`` and ``類似度は4です`` all read); the predictions are scored against the gold values by
Pearson's and Spearman's correlation (:func:`pearson`, :func:`spearman`, ties ranked by their mean rank).
A correlation with a constant list is undefined and reported as None.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def normalize(text: str) -> str:
    """``text`` as answers are compared (module docstring)."""
    text = unicodedata.normalize("NFKC", text)
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c)[0] not in "PS")


def exact_match(answer: str, golds: list[str] | tuple[str, ...]) -> float:
    """1.0 where the normalised answer equals one of the normalised gold answers, else 0.0."""
    found = normalize(answer)
    return float(any(found == normalize(gold) for gold in golds))


def _f1(answer: str, gold: str) -> float:
    if not answer or not gold:
        return float(answer == gold)
    shared = sum((Counter(answer) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(answer), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


def char_f1(answer: str, golds: list[str] | tuple[str, ...]) -> float:
    """The best character F1 of the normalised answer against the normalised gold answers."""
    found = normalize(answer)
    return max(_f1(found, normalize(gold)) for gold in golds)


def first_line(text: str, stops: list[str] | tuple[str, ...]) -> str:
    """``text`` up to the first of the ``stops`` strings (all of it where none occurs), stripped."""
    cut = min((i for i in (text.find(stop) for stop in stops if stop) if i >= 0), default=len(text))
    return text[:cut].strip()


def parse_number(text: str) -> float | None:
    """The first number in ``text`` (after NFKC), or None where it holds none."""
    found = NUMBER.search(unicodedata.normalize("NFKC", text))
    return float(found.group()) if found else None


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's correlation of two equally long lists; None where either is constant."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def ranks(values: list[float]) -> list[float]:
    """Each value's rank from 1, tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=values.__getitem__)
    found = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            found[i] = (start + end) / 2 + 1
        start = end + 1
    return found


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's correlation: Pearson's of the ranks; None where either list is constant."""
    return pearson(ranks(xs), ranks(ys))
