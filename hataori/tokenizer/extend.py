"""``hataori tokenizer extend BASE --add NEW``: vocabulary expansion, as Swallow did it; ``--pieces``: special pieces.

    hataori tokenizer extend BASE [--add NEW] [--pieces '<|im_start|>,<|im_end|>'] --output DIR
        [--ja-text FILES] [--other-text FILES] [CONFIG.yaml ...] [key=value ...]

BASE is the tokenizer of a model to continue (a SentencePiece unigram or BPE model with byte
fallback, such as Llama's); NEW a Japanese tokenizer trained with ``hataori tokenizer train``.
The merged tokenizer holds every BASE piece at its own id, then NEW's pieces that BASE lacks:

* skipped: pieces BASE already has (duplicates), NEW's special, byte and unknown pieces, and
  with ``only_japanese`` (the default) pieces without a Japanese character (kana, kanji,
  Japanese punctuation, full-width forms), so that no new piece can match text without one and
  BASE's tokenization of such text stays as it was; pieces BASE's normalization would change
  (they could never match normalized text) are skipped too;
* scores, chosen so the new pieces are used: for a unigram BASE each new piece keeps the score
  NEW gave it (its log probability on Japanese text, on the 1/64 grid), which beats spelling
  the same text with BASE's pieces, mostly single characters or bytes of low score; a score
  below BASE's lowest is raised to it, so the score of unknown characters (the lowest minus 10)
  stays BASE's and text without Japanese characters is segmented by the very same sums. For a BPE
  BASE the new pieces come after all of BASE's merges, scores falling by one from below BASE's
  lowest, in NEW's merge order when NEW is BPE too (every piece then has the two pieces it was
  merged from: train NEW with ``model_type: bpe`` to extend a BPE base), else shorter pieces
  first; a multi-character piece is added only once a split of it into two pieces of the merged
  vocabulary exists, or BPE could never form it;
* pieces the merged model can never produce are found by encoding each new piece's own text
  with the merged model (without dummy prefix): a piece that does not come out as itself is not
  produced in any context either (for unigram a better segmentation of its span always exists;
  for BPE its merge never fires), so it is dropped, counted and reported, and the check repeats
  until every added piece is produced.

``pieces`` (``--pieces``, comma-separated) come last, after NEW's, as user-defined pieces: SentencePiece
matches them in text as written, before segmenting the rest, and so does the exported fast tokenizer.
They are the special pieces a chat template writes (``<|im_start|>``, ``<|im_end|>``; see
:mod:`hataori.tokenizer.chat`). A piece BASE already holds as a user-defined piece is kept where it is;
one it holds as another kind is refused, as is a BASE with a dummy prefix, which no exported tokenizer
could combine with user-defined pieces (:func:`hataori.tokenizer.hf.check_convertible`).

BASE must have byte fallback: without it every character outside the vocabulary is ``<unk>``,
and new pieces made of such characters would start their embedding rows from the ``<unk>`` row
(the mean of their base pieces' rows; see :mod:`hataori.interop.load`).

The report (printed, and in ``summary.json``) compares BASE and the merged tokenizer before and
after on Japanese text (``--ja-text``) and other text (``--other-text``): characters per token,
byte-fallback rate, lossless round trips, and on the other text whether every id is unchanged.
The output folder is written whole or not at all: tokenizer.model, tokenizer.vocab,
config.yaml and summary.json. An existing non-empty one is refused unless ``--replace``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from hataori.config import load, override, require, split_items
from hataori.errors import InputError
from hataori.outputs import Output, claim
from hataori.tokenizer import proto as spm_proto
from hataori.tokenizer.charsets import is_japanese
from hataori.tokenizer.evaluate import load_texts, measure
from hataori.tokenizer.model import Tokenizer
from hataori.tokenizer.trainer import write_output

SPACE_PIECE = "\u2581"
MAX_ROUNDS = 8


@dataclass(kw_only=True, slots=True)
class ExtendConfig:
    """What ``hataori tokenizer extend`` merges and how it reports."""

    base: str = ""
    """The tokenizer to extend (folder or .model): its pieces keep their ids."""
    add: str = ""
    """The Japanese tokenizer whose pieces are added (``--add``); empty: add only ``pieces``."""
    pieces: list[str] = field(default_factory=list)
    """Special pieces added last as user-defined pieces, such as a chat template's ``<|im_start|>``."""
    output: str = ""
    """Folder to write (``--output``)."""
    only_japanese: bool = True
    """Add only pieces with a Japanese character, so text without one is tokenized as BASE does."""
    max_pieces: int = 0
    """Add at most this many pieces (NEW's first, in its order); 0: every eligible piece."""
    ja_text: list[str] = field(default_factory=list)
    """Japanese corpora (JSONL or text) to report characters per token on, before and after."""
    other_text: list[str] = field(default_factory=list)
    """Non-Japanese corpora to report on, and to check that their ids are unchanged."""
    text_key: str = "text"
    """JSONL field holding the text of the report's corpora."""
    max_eval_chars: int = 2_000_000
    """Characters of each report corpus to read (its first documents)."""

    def __post_init__(self) -> None:
        require(bool(self.base), "base", "no base tokenizer; pass BASE")
        require(bool(self.add) or bool(self.pieces), "add", "nothing to add; pass --add NEW, --pieces, or both")
        for piece in self.pieces:
            require(bool(piece) and not any(c.isspace() for c in piece), "pieces",
                    f"{piece!r}: a special piece must be non-empty and hold no whitespace")
        require(len(set(self.pieces)) == len(self.pieces), "pieces", f"lists a piece twice: {self.pieces}")
        require(bool(self.output), "output", "no output folder; pass --output DIR")
        require(self.max_pieces >= 0, "max_pieces", f"must be >= 0 (0: all), got {self.max_pieces}")
        require(self.max_eval_chars > 0, "max_eval_chars", f"must be positive, got {self.max_eval_chars}")


# ----------------------------------------------------------------------------- choosing pieces


def check_base(proto, path: Path) -> None:
    if spm_proto.model_type(proto) not in (spm_proto.UNIGRAM, spm_proto.BPE):
        raise InputError(path, f"a SentencePiece {spm_proto.model_type_name(proto)} model; only unigram and BPE "
                         "models can be extended")
    if not proto.trainer_spec.byte_fallback:
        raise InputError(path, "has no byte fallback: characters outside its vocabulary become <unk>, so a new "
                         "piece's embedding row would start from the <unk> row, and text the merged tokenizer "
                         "does not cover would lose its characters; extend a tokenizer with byte fallback "
                         "(Llama's has it)")


def candidates(cfg: ExtendConfig, base, new) -> tuple[list, dict[str, int]]:
    """NEW's pieces eligible for adding, in NEW's order, and the counts of what was skipped."""
    import sentencepiece as spm

    existing = {p.piece for p in base.pieces}
    normalizer = spm.SentencePieceProcessor(model_proto=base.SerializeToString()) \
        if base.normalizer_spec.precompiled_charsmap else None
    skipped = {"duplicates": 0, "special": 0, "not_japanese": 0, "changed_by_base_normalization": 0}
    chosen = []
    for piece in new.pieces:
        if piece.type not in (spm_proto.NORMAL, spm_proto.USER_DEFINED):
            skipped["special"] += 1
        elif piece.piece in existing:
            skipped["duplicates"] += 1
        elif cfg.only_japanese and not any(is_japanese(c) for c in piece.piece):
            skipped["not_japanese"] += 1
        elif normalizer is not None and _normalized(normalizer, piece.piece) != piece.piece:
            skipped["changed_by_base_normalization"] += 1
        else:
            chosen.append(piece)
    if cfg.max_pieces:
        chosen = chosen[:cfg.max_pieces]
    return chosen, skipped


def _normalized(sp, piece: str) -> str:
    text = sp.normalize(piece.replace(SPACE_PIECE, " "))
    return text[1:] if sp.normalize("a").startswith(SPACE_PIECE) and not piece.startswith(SPACE_PIECE) else text


def ordered_for_bpe(pieces: list, base, new_is_bpe: bool) -> list:
    """The pieces BPE can form, in the order it should merge them: NEW's own merge order when NEW
    is BPE, else shorter first. A multi-character piece needs a split into two pieces already in
    the vocabulary (BASE's or added before it)."""
    vocab = {p.piece for p in base.pieces if p.type == spm_proto.NORMAL}
    ordered = []
    # Single characters first (the alphabet, formed by no merge); sorted() keeps NEW's order within a key.
    for piece in sorted(pieces, key=lambda p: 0 if len(p.piece) == 1 else 1 if new_is_bpe else len(p.piece)):
        text = piece.piece
        if len(text) == 1 or any(text[:cut] in vocab and text[cut:] in vocab for cut in range(1, len(text))):
            ordered.append(piece)
            vocab.add(text)
    return ordered


def merged_model(base, pieces: list):
    """A copy of BASE with ``pieces`` appended as normal pieces, scored by the policy above."""
    merged = spm_proto.model_proto()()
    merged.CopyFrom(base)
    bpe = spm_proto.model_type(base) == spm_proto.BPE
    grid = spm_proto.SCORE_GRID
    lowest = min(spm_proto.normal_scores(base), default=0.0)
    floor = math.ceil(lowest * grid) / grid  # on the grid and not below BASE's lowest
    for i, piece in enumerate(pieces):
        added = merged.pieces.add()
        added.piece = piece.piece
        added.type = spm_proto.NORMAL
        added.score = math.floor(lowest) - 1.0 - i if bpe else max(round(piece.score * grid) / grid, floor)
    return merged


def add_user_pieces(merged, pieces: list[str], path: Path) -> list[str]:
    """Append ``pieces`` to ``merged`` as user-defined pieces (score 0; SentencePiece matches them before
    scoring anything); those it already holds as user-defined pieces stay where they are. The added ones."""
    have = {p.piece: p.type for p in merged.pieces}
    if pieces and merged.normalizer_spec.add_dummy_prefix:
        raise InputError(path, "adds a dummy prefix, which an exported tokenizer cannot combine with user-defined "
                         "pieces (see hataori.tokenizer.hf); special pieces need a base without it")
    added = []
    for piece in pieces:
        if piece in have:
            if have[piece] != spm_proto.USER_DEFINED:
                raise InputError(path, f"already holds {piece!r} as a piece of another kind (type {have[piece]}); "
                                 "choose another name for the special piece")
            continue
        new = merged.pieces.add()
        new.piece, new.type, new.score = piece, spm_proto.USER_DEFINED, 0.0
        added.append(piece)
    return added


def unproduced(merged, first_new: int) -> list[int]:
    """Ids from ``first_new`` on that encoding their own text (no dummy prefix) does not give back."""
    import sentencepiece as spm

    probe = spm_proto.model_proto()()
    probe.CopyFrom(merged)
    probe.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=probe.SerializeToString())
    ids = list(range(first_new, len(merged.pieces)))
    texts = [merged.pieces[i].piece.replace(SPACE_PIECE, " ") for i in ids]
    return [i for i, encoded in zip(ids, sp.encode(texts, out_type=int)) if encoded != [i]]


def merge(base, chosen: list, new_is_bpe: bool) -> tuple[object, list[str]]:
    """The merged model with only pieces it produces, and the pieces dropped as never produced."""
    bpe = spm_proto.model_type(base) == spm_proto.BPE
    pieces, dropped = list(chosen), []
    for _ in range(MAX_ROUNDS):
        if bpe:
            formable = ordered_for_bpe(pieces, base, new_is_bpe)
            kept = {p.piece for p in formable}
            dropped += [p.piece for p in pieces if p.piece not in kept]
            pieces = formable
        merged = merged_model(base, pieces)
        lost = {i - len(base.pieces) for i in unproduced(merged, len(base.pieces))}
        if not lost:
            return merged, dropped
        dropped += [p.piece for i, p in enumerate(pieces) if i in lost]
        pieces = [p for i, p in enumerate(pieces) if i not in lost]
    raise RuntimeError(f"pieces still unproduced after {MAX_ROUNDS} rounds of dropping")


# ----------------------------------------------------------------------------- report


def report_texts(cfg: ExtendConfig) -> list[tuple[str, str, object]]:
    """(kind, name, TextSet) of every report corpus, read before any work so a bad file fails first."""
    return [(kind, spec, load_texts(spec, cfg.text_key, cfg.max_eval_chars))
            for kind, specs in (("japanese", cfg.ja_text), ("other", cfg.other_text)) for spec in specs]


def report(base_tok: Tokenizer, merged_tok: Tokenizer, corpora: list[tuple[str, str, object]]) -> dict:
    """Before-and-after metrics on the Japanese and the other corpora."""
    result = {}
    for kind, spec, texts in corpora:
        base_ids, merged_ids = base_tok.encode(texts.docs), merged_tok.encode(texts.docs)
        before = measure(base_tok, texts, base_ids).as_dict()
        after = measure(merged_tok, texts, merged_ids).as_dict()
        entry = {"kind": kind, "documents": len(texts.docs), "chars": texts.chars, "before": before,
                 "after": after}
        new_tokens = sum(1 for ids in merged_ids for i in ids if i >= base_tok.vocab_size)
        entry["new_piece_share"] = new_tokens / max(after["tokens"], 1)
        if kind == "other":
            entry["ids_unchanged"] = sum(a == b for a, b in zip(base_ids, merged_ids))
        result[spec] = entry
    return result


def extend(cfg: ExtendConfig, replace: bool = False) -> dict:
    """Merge, check, measure and write; the summary (also summary.json). The output is held under
    :mod:`hataori.outputs`' contract: a non-empty one is refused unless ``replace`` and it holds an earlier
    tokenizer, which is replaced once the new one is complete; BASE, NEW and the report's texts never are."""
    inputs = [cfg.base, *([cfg.add] if cfg.add else []), *cfg.ja_text, *cfg.other_text]
    with claim(cfg.output, "tokenizer", inputs=inputs) as out:
        out.check_replace(replace)
        return _extend(cfg, out)


def _extend(cfg: ExtendConfig, out: Output) -> dict:
    started = time.perf_counter()
    corpora = report_texts(cfg)
    base_tok = Tokenizer(cfg.base)
    new_tok = Tokenizer(cfg.add) if cfg.add else None
    base = spm_proto.parse(base_tok.proto, base_tok.path)
    check_base(base, base_tok.path)
    if new_tok is not None:
        new = spm_proto.parse(new_tok.proto, new_tok.path)
        chosen, skipped = candidates(cfg, base, new)
        merged, dropped = merge(base, chosen, spm_proto.model_type(new) == spm_proto.BPE)
    else:
        merged, dropped, new = merged_model(base, []), [], None
        skipped = {"duplicates": 0, "special": 0, "not_japanese": 0, "changed_by_base_normalization": 0}
    merged_pieces = len(merged.pieces)
    user_pieces = add_user_pieces(merged, cfg.pieces, base_tok.path)
    if unproduced(merged, merged_pieces):
        raise InputError(base_tok.path, f"the special pieces {user_pieces} do not come out of the merged tokenizer as "
                         "themselves; report this with the base tokenizer")
    proto = merged.SerializeToString()
    merged_tok = Tokenizer(Path(cfg.output) / "tokenizer.model", proto=proto)
    summary = {
        "base": {"path": str(base_tok.path), "fingerprint": base_tok.fingerprint, "vocab_size": base_tok.vocab_size,
                 "model_type": spm_proto.model_type_name(base)},
        "added_from": None if new_tok is None else {"path": str(new_tok.path), "fingerprint": new_tok.fingerprint,
                                                    "vocab_size": new_tok.vocab_size},
        "special_pieces": {piece: merged_tok.sp.piece_to_id(piece) for piece in user_pieces},
        "fingerprint": merged_tok.fingerprint,
        "vocab_size": merged_tok.vocab_size,
        "added": merged_tok.vocab_size - base_tok.vocab_size,
        "skipped": skipped,
        "unproduced": len(dropped),
        "unproduced_examples": dropped[:20],
        "score_policy": "none: no NEW" if new is None else (
                         "NEW's own scores (log probabilities) on the 1/64 grid, raised to BASE's lowest"
                         if spm_proto.model_type(base) == spm_proto.UNIGRAM else
                         "after BASE's merges, falling by one from below BASE's lowest score: characters first, "
                         "then NEW's merge order" if spm_proto.model_type(new) == spm_proto.BPE else
                         "after BASE's merges, falling by one from below BASE's lowest score: shorter first"),
        "report": report(base_tok, merged_tok, corpora),
        "seconds": 0.0,
    }
    summary["seconds"] = round(time.perf_counter() - started, 2)
    write_output(out, cfg, proto, summary)
    return summary


def format_summary(summary: dict, output: str) -> str:
    skipped = summary["skipped"]
    lines = [f"extended tokenizer written to {output}",
             f"  base {summary['base']['path']}: {summary['base']['model_type']}, {summary['base']['vocab_size']:,} "
             f"pieces; merged {summary['vocab_size']:,} pieces, fingerprint {summary['fingerprint']}",
             f"  added {summary['added']:,} pieces"]
    if summary["added_from"] is not None:
        lines += [f"  from {summary['added_from']['path']}: skipped "
                  f"{skipped['duplicates']:,} already in the base, {skipped['not_japanese']:,} without a Japanese "
                  f"character, {skipped['special']:,} special or byte pieces, "
                  f"{skipped['changed_by_base_normalization']:,} the base's normalization changes",
                  f"  never produced by the merged model (dropped): {summary['unproduced']:,}"
                  + (f", e.g. {' '.join(summary['unproduced_examples'][:5])}" if summary["unproduced"] else ""),
                  f"  scores: {summary['score_policy']}"]
    if summary["special_pieces"]:
        lines.append("  special pieces (user-defined): " + ", ".join(f"{piece} {i}" for piece, i in
                                                                 summary["special_pieces"].items()))
    if summary["base"]["model_type"] == "bpe" and summary["unproduced"] > summary["added"] // 10:
        lines.append("  a BPE base forms a piece only by merging two others: train the added tokenizer with "
                     "model_type=bpe (configs/tokenizer/ja-bpe-32k.yaml) so every piece has the two it was merged from")
    for name, entry in summary["report"].items():
        before, after = entry["before"], entry["after"]
        line = (f"  {entry['kind']} {name} ({entry['documents']:,} docs, {entry['chars']:,} chars): chars/token "
                f"{before['chars_per_token']:.3f} -> {after['chars_per_token']:.3f}, byte fallback "
                f"{before['byte_fallback_rate']:.2%} -> {after['byte_fallback_rate']:.2%}, round trip "
                f"{before['round_trip']:.2%} -> {after['round_trip']:.2%}, new pieces {entry['new_piece_share']:.1%} "
                "of tokens")
        if "ids_unchanged" in entry:
            line += f", ids unchanged in {entry['ids_unchanged']:,}/{entry['documents']:,} docs"
        lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="the tokenizer to extend (folder or .model)")
    parser.add_argument("items", nargs="*", metavar="CONFIG.yaml|key=value", help="config files and overrides")
    parser.add_argument("--add", metavar="NEW", help="the Japanese tokenizer whose pieces are added")
    parser.add_argument("--pieces", metavar="P1,P2", help="special pieces to add last as user-defined pieces, "
                        "comma-separated (a chat template's <|im_start|>,<|im_end|>)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write")
    parser.add_argument("--replace", action="store_true",
                        help="replace an existing output folder (once the new tokenizer is complete)")
    parser.add_argument("--ja-text", nargs="+", default=[], metavar="FILES",
                        help="Japanese corpora to report on (JSONL or text)")
    parser.add_argument("--other-text", nargs="+", default=[], metavar="FILES",
                        help="non-Japanese corpora to report on and check for unchanged ids")


def main(args: argparse.Namespace) -> int:
    files, overrides = split_items(args.items)
    flags = [override("base", args.base), override("output", args.output)]
    if args.add:
        flags.append(override("add", args.add))
    if args.pieces:
        flags.append(override("pieces", args.pieces.split(",")))
    if args.ja_text:
        flags.append(override("ja_text", args.ja_text))
    if args.other_text:
        flags.append(override("other_text", args.other_text))
    cfg = load(ExtendConfig, files, flags + overrides)
    summary = extend(cfg, replace=args.replace)
    print(format_summary(summary, cfg.output))
    return 0
