"""Character sets a Japanese tokenizer must cover, enumerated from Python's own codecs.

JIS X 0208 is the character set of everyday Japanese: kana, punctuation, full-width digits and
Latin letters, Greek, Cyrillic, box drawing (rows 1-8), 2,965 level-1 kanji (rows 16-47) and
3,390 level-2 kanji (rows 48-84). The ``euc_jp`` codec maps every JIS X 0208 code point
(row ``r``, cell ``c``) from the two bytes ``0xA0 + r, 0xA0 + c``, so no data file is needed.
Printable ASCII and half-width katakana (JIS X 0201) are added to every set: Japanese text is
full of Latin letters, digits and ASCII punctuation, and half-width kana are common in web text.
"""

from __future__ import annotations

import functools
import unicodedata
from typing import Literal

CharsetName = Literal["jis0208", "jis_level1", "kana", "none"]

NON_KANJI_ROWS = range(1, 9)
LEVEL1_ROWS = range(16, 48)
LEVEL2_ROWS = range(48, 85)
HALFWIDTH_KATAKANA = "".join(chr(c) for c in range(0xFF61, 0xFFA0))
PRINTABLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


def jis_rows(rows: range) -> list[str]:
    """The characters of the given JIS X 0208 rows, in code order."""
    chars = []
    for row in rows:
        for cell in range(1, 95):
            try:
                ch = bytes([0xA0 + row, 0xA0 + cell]).decode("euc_jp")
            except UnicodeDecodeError:
                continue  # an unassigned cell
            if len(ch) == 1:
                chars.append(ch)
    return chars


@functools.lru_cache(maxsize=None)
def charset(name: CharsetName) -> str:
    """The characters of a named set, sorted by code point, without duplicates."""
    if name == "none":
        return ""
    rows = list(NON_KANJI_ROWS)
    if name in ("jis_level1", "jis0208"):
        rows += list(LEVEL1_ROWS)
    if name == "jis0208":
        rows += list(LEVEL2_ROWS)
    chars = set(HALFWIDTH_KATAKANA) | set(PRINTABLE_ASCII)
    for row in rows:
        chars.update(jis_rows(range(row, row + 1)))
    return "".join(sorted(chars))


def required_chars(name: CharsetName, extra: str, normalization: str) -> str:
    """The characters a tokenizer must hold as pieces, as its normalizer leaves them.

    Under NFKC a full-width ``Ａ`` becomes ``A``, so characters that normalization changes would
    never be seen and are left out.
    """
    chars = set(charset(name)) | set(extra)
    chars.discard(" ")
    chars.discard("\n")
    if normalization != "identity":
        chars = {c for c in chars if unicodedata.normalize("NFKC", c) == c}
    return "".join(sorted(chars))


JAPANESE_RANGES = (
    (0x3000, 0x303F),    # CJK symbols and punctuation: 、。「」〜 and the iteration marks
    (0x3040, 0x30FF),    # hiragana and katakana (with the prolonged sound mark)
    (0x31F0, 0x31FF),    # katakana phonetic extensions
    (0x3400, 0x4DBF),    # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),    # CJK unified ideographs
    (0xF900, 0xFAFF),    # CJK compatibility ideographs
    (0xFF01, 0xFF9F),    # full-width forms and half-width katakana
    (0xFFE0, 0xFFEE),    # full-width signs
    (0x20000, 0x3134F),  # CJK unified ideographs extensions B-G
)


def is_japanese(char: str) -> bool:
    """Whether ``char`` is a character of Japanese writing: kana, kanji, Japanese punctuation or a
    full-width form (Chinese text shares the kanji; English text holds none of them)."""
    code = ord(char)
    return any(low <= code <= high for low, high in JAPANESE_RANGES)
