"""SentencePiece models as data: the ``ModelProto`` read, inspected and edited.

A ``tokenizer.model`` file is a serialized ``ModelProto``: the pieces in id order, each with a
score and a type, plus the trainer's and the normalizer's settings. Export to Hugging Face
(:mod:`hataori.tokenizer.hf`), vocabulary expansion (:mod:`hataori.tokenizer.extend`) and the
trainer's score rounding read and write it through this module.

Scores on a grid. SentencePiece's unigram encoder finds the best segmentation with a dynamic
program whose running sums are 32-bit floats; ``tokenizers`` (the Hugging Face fast tokenizer)
runs the same program in 64-bit floats. With arbitrary scores the two round differently, and
where two segmentations score within a rounding error of each other (repeated characters such as
``MMM`` tie exactly in real arithmetic) they pick differently: about 1 document in 500 of the
Debian corpus got other ids. When every score is a multiple of 1/64 (:data:`SCORE_GRID`), every
sum is exact in both as long as it stays below 2**18 in magnitude (24 bits of float32 mantissa
less the grid's 6), and then both pick the same segmentation, ties included (both keep the path
whose last piece starts first). hataori's trainer rounds unigram scores to the grid (a change of
at most 1/128 in a log probability), and :meth:`hataori.tokenizer.model.Tokenizer.encode` encodes
a text line by line, so every sum starts afresh at each line: the same ids as encoding it whole in
exact arithmetic, because the newline is a piece of its own that no other piece spans. A single
line long enough for its sums to pass 2**18 (some 8,000 characters at the lowest scores) could
still round; the tests found none in the Debian corpus.
"""

from __future__ import annotations

from pathlib import Path

from hataori.errors import InputError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
"""SentencePiece's piece types (``ModelProto.SentencePiece.Type``)."""

UNIGRAM, BPE = 1, 2
"""SentencePiece's model types (``TrainerSpec.ModelType``) that hataori reads."""

SCORE_GRID = 64
"""Unigram scores written by hataori are multiples of ``1 / SCORE_GRID`` (see the module docstring)."""


def model_proto():
    """The ``ModelProto`` class (sentencepiece's generated protobuf module)."""
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto


def parse(data: bytes, path: str | Path = "<bytes>"):
    """The ``ModelProto`` of a serialized SentencePiece model; an InputError naming ``path`` if it is not one."""
    from google.protobuf.message import DecodeError

    proto = model_proto()()
    try:
        proto.ParseFromString(data)
    except DecodeError as err:
        raise InputError(path, f"not a SentencePiece model: {err}") from None
    if not proto.pieces:
        raise InputError(path, "not a SentencePiece model: it holds no pieces")
    return proto


def read(path: str | Path):
    """The ``ModelProto`` of a ``tokenizer.model`` file (or of a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "no such SentencePiece model") from None
    return parse(data, path)


def model_type(proto) -> int:
    return proto.trainer_spec.model_type


def model_type_name(proto) -> str:
    return {UNIGRAM: "unigram", BPE: "bpe"}.get(model_type(proto), f"type {model_type(proto)}")


def normal_scores(proto) -> list[float]:
    return [p.score for p in proto.pieces if p.type == NORMAL]


def round_scores(proto) -> None:
    """Round every normal piece's score to the nearest multiple of ``1 / SCORE_GRID``, in place."""
    for piece in proto.pieces:
        if piece.type == NORMAL:
            piece.score = round(piece.score * SCORE_GRID) / SCORE_GRID


def scores_on_grid(proto) -> bool:
    """Whether every normal piece's score is a multiple of ``1 / SCORE_GRID``."""
    return all(float(s * SCORE_GRID).is_integer() for s in normal_scores(proto))


def newline_splits(proto) -> bool:
    """Whether encoding a text line by line gives the ids of encoding it whole: ``"\\n"`` is a
    user-defined piece, no other piece holds one, and nothing is added at the start of a text (a
    dummy prefix) or done across lines (squeezing spaces). hataori's tokenizers are made so."""
    spec = proto.normalizer_spec
    if spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        return False
    user_defined = any(p.piece == "\n" and p.type == USER_DEFINED for p in proto.pieces)
    return user_defined and not any("\n" in p.piece for p in proto.pieces if p.type != USER_DEFINED)
