"""A trained tokenizer as the rest of hataori sees it: a SentencePiece model and its fingerprint.

The fingerprint is a hash of the serialized model; token shards and checkpoints record it, so a
shard encoded with one tokenizer is never read with another.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import sentencepiece as spm

from hataori.errors import InputError

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
                raise InputError(self.path, "no such tokenizer model; train one with `hataori tokenizer train`") from None
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except RuntimeError as err:
            raise InputError(self.path, f"not a SentencePiece model: {err}") from None
        self.fingerprint = fingerprint_bytes(proto)

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

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS added)."""
        return self.sp.Encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.Decode(ids)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"
