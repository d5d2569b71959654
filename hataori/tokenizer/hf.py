"""A SentencePiece model as a Hugging Face fast tokenizer: ``tokenizer.json`` and its config.

:func:`fast_tokenizer` rebuilds SentencePiece's encoder from the model's own pieces and settings
with the ``tokenizers`` library, so that ``AutoTokenizer.from_pretrained`` gives the ids
SentencePiece gives (and that the model was trained on), and decodes them to the same text:

* normalization: none for ``identity``; otherwise SentencePiece's own compiled character map
  (``Precompiled``) followed by NFC, so NFKC and the other rules give SentencePiece's text (every
  code point below U+30000 and every kana with a voiced mark is checked in the tests);
* spaces become ``▁``, and a model with a dummy prefix gets one ``▁`` before the whole text, as
  SentencePiece adds it (also before a text that starts with a space); such a model must have no
  user-defined pieces, which the fast tokenizer would split off before the prefix;
* unigram: the pieces and scores, the Viterbi search of ``tokenizers.models.Unigram``; pieces
  SentencePiece never produces from text (control, byte, unknown, unused) get a score so low
  that no segmentation takes them. Ids equal SentencePiece's on every text when the scores lie
  on the 1/64 grid (every tokenizer hataori trains; see :mod:`hataori.tokenizer.proto`);
* BPE: SentencePiece merges the adjacent pair whose joined piece scores highest, leftmost
  first. The merge list holds, for every piece in order of its score, each way of cutting it
  into two pieces, so ``tokenizers.models.BPE`` takes the same merges in the same order;
* byte fallback kept (the known failure of converted tokenizers that turn unseen characters into
  ``<unk>``, transformers issue 22114): characters without a piece become their UTF-8 byte pieces;
* user-defined pieces (the newline) are split off before the model, as SentencePiece matches them
  first; control pieces (``<s>``, ``</s>``, ``<pad>``, reserved) are special tokens that written
  text does not produce (``split_special_tokens``): ``"<s>"`` in a text is spelled, as
  SentencePiece spells it;
* decoding: ``▁`` back to spaces, byte pieces joined into characters, the dummy prefix dropped.

With ``add_special_tokens`` (transformers' default) the tokenizer puts the document-start token
before the text: hataori's documents are packed each after the previous one's EOS, so a model
trained here starts a document after ``</s>``. Unsupported settings (whitespace squeezing,
whitespace as suffix, a model type other than unigram and BPE) are an InputError.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hataori.errors import InputError
from hataori.fsutil import atomic_write_text
from hataori.tokenizer import proto as spm_proto
from hataori.tokenizer.model import Tokenizer

SPACE_PIECE = "\u2581"
NEVER = -1.0e9
"""Unigram score of pieces SentencePiece never produces from text."""
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def check_convertible(proto, path: str | Path) -> None:
    """An InputError naming ``path`` for the settings :func:`fast_tokenizer` cannot reproduce."""
    spec = proto.normalizer_spec
    if spm_proto.model_type(proto) not in (spm_proto.UNIGRAM, spm_proto.BPE):
        raise InputError(path, f"a SentencePiece {spm_proto.model_type_name(proto)} model; only unigram and BPE "
                         "models convert to a Hugging Face tokenizer")
    if spec.remove_extra_whitespaces:
        raise InputError(path, "squeezes runs of spaces (normalizer remove_extra_whitespaces), which the fast "
                         "tokenizer cannot do as SentencePiece does; hataori's trainer keeps it off")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise InputError(path, "writes whitespace as a suffix (treat_whitespace_as_suffix), which the fast "
                         "tokenizer cannot reproduce")
    if not spec.escape_whitespaces and spec.add_dummy_prefix:
        raise InputError(path, "adds a dummy prefix without escaping whitespace, which the fast tokenizer cannot "
                         "reproduce")
    user_defined = [p.piece for p in proto.pieces if p.type == spm_proto.USER_DEFINED]
    if spec.add_dummy_prefix and user_defined:
        raise InputError(path, f"adds a dummy prefix and has user-defined pieces ({user_defined[:3]!r}): the fast "
                         "tokenizer splits those off before it can prepend the prefix once to the whole text, as "
                         "SentencePiece does; train with newline_piece=false (configs/tokenizer/"
                         "en-bpe-llama-style.yaml does) or without the dummy prefix")


def fast_tokenizer(tokenizer: Tokenizer):
    """The ``tokenizers.Tokenizer`` that encodes and decodes as ``tokenizer`` (see the module docstring)."""
    from tokenizers import AddedToken, decoders, normalizers
    from tokenizers import Tokenizer as FastTokenizer

    proto = spm_proto.parse(tokenizer.proto, tokenizer.path)
    check_convertible(proto, tokenizer.path)
    spec = proto.normalizer_spec
    fast = FastTokenizer(_unigram(proto) if spm_proto.model_type(proto) == spm_proto.UNIGRAM else _bpe(proto))
    steps = []
    if spec.precompiled_charsmap:
        # tokenizers applies the map one grapheme at a time, where SentencePiece takes the longest
        # match: half-width kana with a (semi-)voiced mark (ﾃﾞ) stay two characters (テ and a
        # combining mark). NFC composes them; on SentencePiece's output (already NFC) it is a no-op.
        steps += [normalizers.Precompiled(spec.precompiled_charsmap), normalizers.NFC()]
    if spec.add_dummy_prefix:  # once, before the whole text (no user-defined piece splits it off)
        steps.append(normalizers.Prepend(SPACE_PIECE))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE_PIECE))
    if steps:
        fast.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace(SPACE_PIECE, " ")] if spec.escape_whitespaces else []
    if proto.trainer_spec.byte_fallback:
        decode.append(decoders.ByteFallback())
    decode.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1, right=0))
    fast.decoder = decoders.Sequence(decode)
    special = [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces
               if p.type in (spm_proto.CONTROL, spm_proto.UNKNOWN)]
    # SentencePiece matches user-defined pieces in the text as written: split off before normalizing.
    user = [AddedToken(p.piece, special=False, normalized=False) for p in proto.pieces
            if p.type == spm_proto.USER_DEFINED]
    fast.add_special_tokens(special)
    fast.add_tokens(user)
    return fast


def _unigram(proto):
    from tokenizers import models

    vocab = [(p.piece, p.score if p.type in (spm_proto.NORMAL, spm_proto.USER_DEFINED) else NEVER)
             for p in proto.pieces]
    unk = next(i for i, p in enumerate(proto.pieces) if p.type == spm_proto.UNKNOWN)
    return models.Unigram(vocab, unk_id=unk, byte_fallback=proto.trainer_spec.byte_fallback)


def _bpe(proto):
    from tokenizers import models

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = next(p.piece for p in proto.pieces if p.type == spm_proto.UNKNOWN)
    return models.BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=unk, fuse_unk=True,
                      byte_fallback=proto.trainer_spec.byte_fallback)


def bpe_merges(proto) -> list[tuple[str, str]]:
    """The merge list that reproduces SentencePiece's BPE: for each normal piece of two or more
    characters, highest score first (ties by id), every cut of it into two normal pieces."""
    mergeable = {p.piece for p in proto.pieces if p.type == spm_proto.NORMAL}
    ranked = sorted((-p.score, i) for i, p in enumerate(proto.pieces)
                    if p.type == spm_proto.NORMAL and len(p.piece) > 1)
    merges = []
    for _, i in ranked:
        piece = proto.pieces[i].piece
        merges.extend((piece[:cut], piece[cut:]) for cut in range(1, len(piece))
                      if piece[:cut] in mergeable and piece[cut:] in mergeable)
    return merges


def document_start(fast, token: str, token_id: int) -> None:
    """Put ``token`` before every text encoded with special tokens (``add_special_tokens=True``)."""
    from tokenizers import processors

    fast.post_processor = processors.TemplateProcessing(
        single=f"{token} $A", pair=f"{token} $A {token} $B:1", special_tokens=[(token, token_id)])


def tokenizer_config(tokenizer: Tokenizer, *, model_max_length: int,
                     chat_template: str | None = None) -> dict[str, Any]:
    """``tokenizer_config.json``: the class to load, the special tokens, no splitting of written special
    tokens (see the module docstring), and the chat template where there is one
    (:mod:`hataori.tokenizer.chat`). A template that writes the control tokens (``{{ eos_token }}`` and the
    like) means their ids, so its tokenizer parses them where written (``split_special_tokens: false``)."""
    sp = tokenizer.sp
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                              "split_special_tokens": True, "clean_up_tokenization_spaces": False}
    for name, token_id in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                           ("pad_token", sp.pad_id())):
        if token_id >= 0:
            config[name] = sp.id_to_piece(token_id)
    if chat_template is not None:
        config["chat_template"] = chat_template
        if re.search(r"\b(bos|eos|unk|pad)_token\b", chat_template):
            config["split_special_tokens"] = False
    return config


def write_hf_tokenizer(tokenizer: Tokenizer, folder: str | Path, *, model_max_length: int,
                       chat_template: str | None = None) -> list[str]:
    """Write ``tokenizer.model``, ``tokenizer.json`` and ``tokenizer_config.json`` (with ``chat_template``
    where given) into ``folder``; their names."""
    folder = Path(folder)
    fast = fast_tokenizer(tokenizer)
    eos = tokenizer.sp.id_to_piece(tokenizer.eos_id)
    document_start(fast, eos, tokenizer.eos_id)
    (folder / "tokenizer.model").write_bytes(tokenizer.proto)
    atomic_write_text(folder / TOKENIZER_JSON, fast.to_str(pretty=True) + "\n")
    config = tokenizer_config(tokenizer, model_max_length=model_max_length, chat_template=chat_template)
    atomic_write_text(folder / TOKENIZER_CONFIG, json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    return ["tokenizer.model", TOKENIZER_JSON, TOKENIZER_CONFIG]


def exact(tokenizer: Tokenizer) -> bool:
    """Whether the fast tokenizer gives SentencePiece's ids on every text: a BPE model, or a unigram
    model with scores on the 1/64 grid (every tokenizer hataori trains; see hataori.tokenizer.proto).
    Otherwise ids may differ where two segmentations tie (about 1 Debian document in 500 measured)."""
    proto = spm_proto.parse(tokenizer.proto, tokenizer.path)
    return spm_proto.model_type(proto) == spm_proto.BPE or spm_proto.scores_on_grid(proto)
