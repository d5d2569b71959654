"""``hataori tokenizer eval``: compare tokenizers side by side on the same Japanese text.

For each model and each text source: characters and UTF-8 bytes per token (higher is a shorter
sequence for the model), the share of tokens that are byte-fallback pieces ``<0xNN>`` and
``<unk>`` (both mean the vocabulary does not cover the text), and the share of documents that
survive ``decode(encode(text))`` unchanged. A model that normalizes (NFKC) cannot return the text
as written, so the round trip is also checked against the model's own normalization of the text.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from hataori.corpus.sources import SourceConfig, expand, iter_documents
from hataori.errors import InputError
from hataori.fsutil import atomic_write_text
from hataori.tokenizer.model import Tokenizer

SPACE_PIECE = "\u2581"
# Half-width kana, full-width Latin and digit, a run of spaces: NFKC or whitespace cleanup changes it.
NORMALIZATION_PROBE = "ｶﾀｶﾅ Ａ１  x"


@dataclass
class TextSet:
    """Documents read from one ``--text`` argument."""

    name: str
    docs: list[str]

    @property
    def chars(self) -> int:
        return sum(len(d) for d in self.docs)


@dataclass
class Metrics:
    """One model on one text set."""

    documents: int
    chars: int
    bytes: int
    tokens: int
    byte_tokens: int
    unk_tokens: int
    lossless_docs: int
    lossless_normalized_docs: int

    @property
    def chars_per_token(self) -> float:
        return self.chars / max(self.tokens, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)

    @property
    def byte_fallback_rate(self) -> float:
        return self.byte_tokens / max(self.tokens, 1)

    @property
    def unk_rate(self) -> float:
        return self.unk_tokens / max(self.tokens, 1)

    @property
    def round_trip(self) -> float:
        return self.lossless_docs / max(self.documents, 1)

    @property
    def round_trip_normalized(self) -> float:
        return self.lossless_normalized_docs / max(self.documents, 1)

    def as_dict(self) -> dict:
        rates = {name: getattr(self, name) for name in ("chars_per_token", "bytes_per_token", "byte_fallback_rate",
                                                        "unk_rate", "round_trip", "round_trip_normalized")}
        return {**asdict(self), **rates}


def load_texts(spec: str, text_key: str, max_chars: int | None) -> TextSet:
    """The documents of a file, glob or folder, in order, up to ``max_chars`` characters."""
    source = SourceConfig(path=spec, text_key=text_key)
    docs, total = [], 0
    for path in expand(source):
        for doc in iter_documents(path, source):
            if max_chars is not None and total + len(doc) > max_chars and docs:
                return TextSet(spec, docs)
            docs.append(doc)
            total += len(doc)
    if not docs:
        raise InputError(spec, "holds no text to evaluate on")
    return TextSet(spec, docs)


def _normalized(tok: Tokenizer, text: str) -> str:
    """``text`` as the model's normalizer leaves it, in decoded form (spaces, no dummy prefix)."""
    normalized = tok.sp.normalize(text).replace(SPACE_PIECE, " ")
    if tok.sp.normalize("a").startswith(SPACE_PIECE) and normalized.startswith(" "):
        normalized = normalized[1:]
    return normalized


def measure(tok: Tokenizer, texts: TextSet, encoded: list[list[int]] | None = None) -> Metrics:
    """Encode every document of ``texts`` (or take their ids, ``encoded``) and count."""
    sp = tok.sp
    byte_ids = {i for i in range(sp.get_piece_size()) if sp.is_byte(i)}
    unk = sp.unk_id()
    m = Metrics(documents=len(texts.docs), chars=0, bytes=0, tokens=0, byte_tokens=0, unk_tokens=0,
                lossless_docs=0, lossless_normalized_docs=0)
    batch = 256
    for start in range(0, len(texts.docs), batch):
        docs = texts.docs[start:start + batch]
        ids_of_docs = tok.encode(docs) if encoded is None else encoded[start:start + batch]
        for doc, ids in zip(docs, ids_of_docs):
            m.chars += len(doc)
            m.bytes += len(doc.encode("utf-8"))
            m.tokens += len(ids)
            m.byte_tokens += sum(1 for i in ids if i in byte_ids)
            m.unk_tokens += sum(1 for i in ids if i == unk)
            decoded = tok.decode(ids)
            m.lossless_docs += decoded == doc
            m.lossless_normalized_docs += decoded == doc or decoded == _normalized(tok, doc)
    return m


def evaluate(models: list[str], texts: list[TextSet]) -> dict:
    """Metrics of every model on every text set, as a JSON-ready dict."""
    result = {"models": [], "texts": [{"name": t.name, "documents": len(t.docs), "chars": t.chars} for t in texts]}
    for spec in models:
        tok = Tokenizer(spec)
        result["models"].append({
            "name": spec,
            "path": str(tok.path),
            "vocab_size": tok.vocab_size,
            "fingerprint": tok.fingerprint,
            "normalizes": _normalized(tok, NORMALIZATION_PROBE) != NORMALIZATION_PROBE,
            "metrics": {t.name: measure(tok, t).as_dict() for t in texts},
        })
    return result


ROWS = [
    ("chars/token", "chars_per_token", "{:.3f}"),
    ("bytes/token", "bytes_per_token", "{:.3f}"),
    ("tokens", "tokens", "{:,}"),
    ("byte fallback", "byte_fallback_rate", "{:.3%}"),
    ("unk", "unk_rate", "{:.3%}"),
    ("round trip", "round_trip", "{:.2%}"),
    ("round trip (normalized)", "round_trip_normalized", "{:.2%}"),
]


def format_table(result: dict) -> str:
    """The side-by-side table: one column per model, one block of rows per text set."""
    names = [Path(m["name"]).name or m["name"] for m in result["models"]]
    width = max(16, *(len(n) for n in names))  # a fingerprint is 16 characters
    label = 26

    def row(title: str, cells: list[str]) -> str:
        return f"{title:<{label}}" + "".join(f"{c:>{width + 2}}" for c in cells)

    lines = [row("model", names),
             row("vocab size", [f"{m['vocab_size']:,}" for m in result["models"]]),
             row("fingerprint", [m["fingerprint"] for m in result["models"]]),
             row("normalizes text", ["yes" if m["normalizes"] else "no" for m in result["models"]])]
    for text in result["texts"]:
        lines.append("")
        lines.append(f"text {text['name']}: {text['documents']:,} documents, {text['chars']:,} chars")
        for title, key, fmt in ROWS:
            lines.append(row("  " + title, [fmt.format(m["metrics"][text["name"]][key]) for m in result["models"]]))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL", help="tokenizer folders or .model files")
    parser.add_argument("--text", nargs="+", required=True, metavar="FILES",
                        help="corpus files, globs or folders (JSONL or plain text, .gz/.zst), one text set each")
    parser.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--max-chars", type=int, default=None,
                        help="read at most this many characters of each text set (its first documents)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")


def main(args: argparse.Namespace) -> int:
    texts = [load_texts(spec, args.text_key, args.max_chars) for spec in args.text]
    result = evaluate(args.models, texts)
    print(format_table(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, ensure_ascii=False, indent=2) + "\n")
        print(f"\nresults written to {args.json}", file=sys.stderr)
    return 0
