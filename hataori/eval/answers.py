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
"""

from __future__ import annotations

import unicodedata
from collections import Counter


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
