"""A trained tokenizer as the rest of hataori sees it: a SentencePiece model and its fingerprint.

The fingerprint is a hash of the serialized model; token shards and checkpoints record it, so a
shard encoded with one tokenizer is never read with another.

Encoding. A tokenizer whose newline is a piece of its own that no other piece spans (every
tokenizer hataori trains) encodes a text line by line and joins the lines with the newline id:
the same ids as encoding it whole in exact arithmetic, and the same ids the Hugging Face fast
tokenizer of :mod:`hataori.tokenizer.hf` gives, since SentencePiece's float32 sums then start
afresh at every line (see :mod:`hataori.tokenizer.proto`).
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import sentencepiece as spm

from hataori.errors import InputError
from hataori.tokenizer import proto as spm_proto

FINGERPRINT_CHARS = 16


def fingerprint_bytes(model_proto: bytes) -> str:
    """The fingerprint of a serialized SentencePiece model: the first hex digits of its SHA-256."""
    return hashlib.sha256(model_proto).hexdigest()[:FINGERPRINT_CHARS]


class Tokenizer:
    """A loaded SentencePiece model with its fingerprint and special token ids."""

    def __init__(self, path: str | Path, proto: bytes | None = None):
        """Load the model at ``path`` (a folder holding tokenizer.model, or the file), or, given
        ``proto``, the serialized model itself (``path`` then only names it)."""
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "tokenizer.model"
        if proto is None:
            try:
                proto = self.path.read_bytes()
            except FileNotFoundError:
                raise InputError(self.path,
                                 "no such tokenizer model; train one with `hataori tokenizer train`") from None
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except RuntimeError as err:
            raise InputError(self.path, f"not a SentencePiece model: {err}") from None
        self.fingerprint = fingerprint_bytes(proto)
        self.proto = proto
        self.newline_id = (self.sp.piece_to_id("\n") if spm_proto.newline_splits(spm_proto.parse(proto, self.path))
                           else None)

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def encode(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS added); line by line where the newline allows it
        (see the module docstring). ``num_threads``: SentencePiece's threads (-1: its default)."""
        if self.newline_id is None:
            return self.sp.Encode(texts, out_type=int, num_threads=num_threads)
        lines = [text.split("\n") for text in texts]
        encoded = iter(self.sp.Encode(list(itertools.chain.from_iterable(lines)), out_type=int,
                                      num_threads=num_threads))
        out = []
        for parts in lines:
            ids = next(encoded)
            for _ in range(len(parts) - 1):
                ids.append(self.newline_id)
                ids.extend(next(encoded))
            out.append(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        return self.sp.Decode(ids)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"
