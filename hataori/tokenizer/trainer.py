"""``hataori tokenizer train``: a SentencePiece tokenizer made for Japanese.

Reading. Each source (a file, glob or folder of JSONL or plain text, optionally .gz/.zst) is read
twice through :mod:`hataori.corpus.sources`: once to count its characters (so a malformed line
fails before any training starts), once to sample it. The sample holds ``S = min(max_input_chars,
all characters)`` characters, of which source ``i`` contributes ``S * w_i / sum(w)``: its lines are
drawn with that probability (deterministically from ``seed``), and a source smaller than its share
is repeated. The lines are SentencePiece's training sentences (a line longer than
``max_sentence_length`` bytes is cut); since ``"\\n"`` is a piece of its own, which no other piece
spans, training on lines loses nothing.

Defaults, made for Japanese text fed to a decoder-only model:

* unigram (``model_type=bpe`` as an option), byte fallback, digits split one per piece;
* identity normalization, so that decode(encode(text)) == text; ``nfkc``/``nmt_nfkc`` optional;
* no dummy prefix, whitespace kept as written, runs of spaces allowed as pieces;
* ``"\\n"`` as a piece of its own (a user-defined symbol, matched before normalization);
* ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, then ``reserved_tokens`` control pieces
  ``<|reserved_N|>`` for later chat or fill-in-the-middle formats;
* every JIS X 0208 character a piece of its own (``required_chars``), so that a tokenizer
  trained on a narrow corpus still reads other Japanese without falling back to bytes;
* unigram scores rounded to multiples of 1/64, so that the exported Hugging Face fast tokenizer
  gives SentencePiece's ids on every text (see :mod:`hataori.tokenizer.proto`).

The alphabet is decided here, not by SentencePiece: it is the required set plus the most frequent
characters of the sample up to ``character_coverage``. Characters outside it are cut out of the
training sentences (the model meets them as bytes). SentencePiece's own coverage pass visits
required characters first, most frequent first, and stops once the coverage is reached: when the
required characters alone cover that much of the text (no dummy-prefix spaces, text written within
JIS X 0208), every rarer required character is dropped, including all those the sample lacks.
Training therefore runs at coverage 1.0 on the filtered sentences, and every alphabet character is
made frequent enough, with one-character sentences, to be counted before that pass stops. The
trained model is checked to hold every required character.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from hataori import __version__
from hataori.config import command_items, load, require, to_yaml
from hataori.corpus.sources import ReadStats, SourceConfig, expand, in_validation, iter_documents
from hataori.errors import HataoriError, InputError
from hataori.outputs import Output, claim
from hataori.sourcespec import parse_source
from hataori.tokenizer import charsets
from hataori.tokenizer import proto as spm_proto
from hataori.tokenizer.evaluate import TextSet, measure
from hataori.tokenizer.model import Tokenizer, fingerprint_bytes

NEWLINE = "\n"
SPACE_PIECE = "\u2581"  # SentencePiece writes a space as this
SPECIAL_PIECES = 4  # <unk>, <s>, </s>, <pad>


@dataclass(kw_only=True, slots=True)
class TokenizerTrainConfig:
    """Everything ``hataori tokenizer train`` does, as one typed config."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Corpora to learn from, each with a sampling weight (``--input PATH[:WEIGHT]``)."""
    output: str = ""
    """Folder to write (``--output DIR``): tokenizer.model, tokenizer.vocab, config.yaml, summary.json."""
    model_type: Literal["unigram", "bpe"] = "unigram"
    """SentencePiece algorithm."""
    vocab_size: int = 32000
    """Number of pieces, specials, bytes and required characters included."""
    normalization: Literal["identity", "nfkc", "nmt_nfkc"] = "identity"
    """SentencePiece normalization rule; ``identity`` keeps the text byte for byte."""
    required_chars: charsets.CharsetName = "jis0208"
    """Characters that each get a piece: ``jis0208`` (kana, symbols, level-1 and level-2 kanji),
    ``jis_level1`` (without level-2 kanji), ``kana`` (JIS rows 1-8 only) or ``none``."""
    extra_required_chars: str = ""
    """Further characters that must get a piece of their own."""
    character_coverage: float = 0.9995
    """Share of the sample's characters the alphabet must cover besides the required set."""
    byte_fallback: bool = True
    """Spell characters without a piece as UTF-8 byte pieces <0xNN> instead of <unk>."""
    split_digits: bool = True
    """Every digit a piece of its own."""
    add_dummy_prefix: bool = False
    """Prepend a space to every text before encoding (SentencePiece's default; off keeps round trips exact)."""
    newline_piece: bool = True
    """Make ``"\\n"`` a piece of its own (user-defined: matched before anything else). Off: a newline is
    spelled with its byte piece ``<0x0A>``, as in Llama's tokenizer (and the fast tokenizer cannot
    reproduce a user-defined piece together with a dummy prefix)."""
    remove_extra_whitespaces: bool = False
    """Strip and squeeze spaces while normalizing."""
    allow_whitespace_only_pieces: bool = True
    """Allow pieces made of runs of spaces (indentation in code and tables)."""
    max_piece_length: int = 16
    """Longest piece, in characters."""
    reserved_tokens: int = 16
    """Number of control pieces ``<|reserved_N|>`` kept for later formats (chat, fill-in-the-middle)."""
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"
    max_input_chars: int = 50_000_000
    """Cap on the characters of the training sample; sources are sampled by weight to fit it."""
    max_sentence_length: int = 16384
    """Longest training sentence (a line) in UTF-8 bytes; longer lines are cut."""
    seed: int = 0
    """Seed of the document sampler (the same seed and inputs give the same sample)."""
    val_fraction: float = 0.005
    """Share of documents held out (by hash of their text) and evaluated on after training. The
    split is the one ``hataori data prepare`` makes with the same ``val_fraction`` and ``split_seed``,
    so the tokenizer never sees the documents the shards validate on."""
    split_seed: int = 0
    """Key of the split hash, as in ``hataori data prepare``."""
    max_eval_chars: int = 2_000_000
    """Characters of held-out documents to evaluate on after training."""
    skip_bad_lines: bool = False
    """Count and skip malformed lines (bad JSON, invalid UTF-8) instead of stopping at the first."""
    num_threads: int = 2
    """SentencePiece trainer threads."""
    progress: bool = True
    """Show a progress bar on stderr while reading."""

    def __post_init__(self):
        require(len(self.sources) > 0, "sources",
                "no input; pass --input PATH[:WEIGHT] or list sources in the config")
        require(self.vocab_size >= 100, "vocab_size", f"must be at least 100, got {self.vocab_size}")
        require(0 < self.character_coverage <= 1, "character_coverage",
                f"must be in (0, 1], got {self.character_coverage}")
        require(self.max_input_chars > 0, "max_input_chars", f"must be positive, got {self.max_input_chars}")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        require(self.max_sentence_length >= 64, "max_sentence_length",
                f"must be at least 64 bytes, got {self.max_sentence_length}")
        require(1 <= self.max_piece_length <= 64, "max_piece_length",
                f"must be in 1..64, got {self.max_piece_length}")
        require(self.reserved_tokens >= 0, "reserved_tokens", f"must be >= 0, got {self.reserved_tokens}")
        require(self.num_threads >= 1, "num_threads", f"must be >= 1, got {self.num_threads}")
        names = [self.unk_piece, self.bos_piece, self.eos_piece, self.pad_piece]
        require(all(names) and len(set(names)) == 4, "unk_piece",
                f"the four special pieces must be distinct and non-empty, got {names}")
        required = len(self.required_char_set())
        fixed = self.fixed_pieces()
        require(self.vocab_size >= required + fixed + 100, "vocab_size",
                f"{self.vocab_size} leaves no room to learn pieces: required_chars={self.required_chars!r} "
                f"takes {required} character pieces and {fixed} pieces are fixed (specials, bytes, reserved); "
                f"raise vocab_size above {required + fixed + 100} or choose a smaller required_chars "
                "(jis_level1, kana or none)")

    def required_char_set(self) -> str:
        return charsets.required_chars(self.required_chars, self.extra_required_chars, self.normalization)

    def fixed_pieces(self) -> int:
        """Pieces that do not depend on the corpus: specials, newline, reserved, bytes."""
        return SPECIAL_PIECES + int(self.newline_piece) + self.reserved_tokens + (256 if self.byte_fallback else 0)

    def reserved_piece_names(self) -> list[str]:
        return [f"<|reserved_{i}|>" for i in range(self.reserved_tokens)]


# ----------------------------------------------------------------------------- sampling


@dataclass
class SourceSample:
    """What was read from one source and what went into the sample."""

    name: str
    weight: float
    files: int = 0
    read: ReadStats = field(default_factory=ReadStats)
    line_chars: int = 0
    """Characters of the source's lines, newlines not counted: what sampling draws from."""
    rate: float = 0.0
    parts_used: int = 0
    chars_used: int = 0


class Progress:
    """A tqdm bar over characters on stderr, or nothing."""

    def __init__(self, enabled: bool, desc: str, total: int | None = None):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="char", unit_scale=True, file=sys.stderr,
                            mininterval=0.5, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _source_documents(cfg: TokenizerTrainConfig, source: SourceConfig, files: list[Path], stats: ReadStats,
                      held_out: bool = False) -> Iterator[str]:
    """The training documents of a source, or with ``held_out`` its validation documents."""
    for path in files:
        for doc in iter_documents(path, source, skip_bad=cfg.skip_bad_lines, stats=stats):
            if in_validation(doc, cfg.val_fraction, cfg.split_seed) == held_out:
                yield doc


def held_out_documents(cfg: TokenizerTrainConfig, files: dict[str, list[Path]]) -> list[str]:
    """Validation documents of all sources, up to ``max_eval_chars`` characters."""
    docs, chars = [], 0
    for source in cfg.sources:
        for doc in _source_documents(cfg, source, files[source.name], ReadStats(), held_out=True):
            if chars >= cfg.max_eval_chars:
                return docs
            docs.append(doc)
            chars += len(doc)
    return docs


def count_sources(cfg: TokenizerTrainConfig) -> tuple[list[SourceSample], dict[str, list[Path]]]:
    """First pass: the files and characters of every source (this also validates every line)."""
    samples, files = [], {}
    progress = Progress(cfg.progress, "counting")
    for source in cfg.sources:
        paths = expand(source)
        sample = SourceSample(name=source.name, weight=source.weight, files=len(paths))
        for doc in _source_documents(cfg, source, paths, sample.read):
            sample.line_chars += len(doc) - doc.count(NEWLINE)
            progress.update(len(doc))
        if sample.line_chars == 0:
            progress.close()
            where = paths[0] if len(paths) == 1 else source.path
            raise InputError(where, "holds no text; check the path, the format and the text_key "
                             f"({source.text_key!r})")
        samples.append(sample)
        files[source.name] = paths
    progress.close()
    return samples, files


def sample_documents(cfg: TokenizerTrainConfig, samples: list[SourceSample],
                     files: dict[str, list[Path]]) -> Iterator[str]:
    """Second pass: yield text drawn by weight to fill ``max_input_chars`` (see module doc).

    The unit drawn is a training sentence (a line), so a few very long documents cannot swing a
    source's share.
    """
    total = sum(s.line_chars for s in samples)
    budget = min(cfg.max_input_chars, total)
    weights = sum(s.weight for s in samples)
    progress = Progress(cfg.progress, "sampling", total=budget)
    for index, (source, sample) in enumerate(zip(cfg.sources, samples)):
        sample.rate = budget * sample.weight / weights / sample.line_chars
        whole, fraction = int(sample.rate), sample.rate - int(sample.rate)
        rng = random.Random(f"{cfg.seed}:{index}:{source.name}")
        for doc in _source_documents(cfg, source, files[source.name], ReadStats()):
            for part in split_sentences(doc, cfg.max_sentence_length):
                copies = whole + (1 if rng.random() < fraction else 0)
                for _ in range(copies):
                    sample.parts_used += 1
                    sample.chars_used += len(part)
                    progress.update(len(part))
                    yield part
    progress.close()


def split_sentences(doc: str, max_bytes: int) -> Iterator[str]:
    """The non-empty lines of a document, a line longer than ``max_bytes`` UTF-8 bytes cut up.

    Lines are the training sentences: ``"\\n"`` is a piece of its own, so no piece spans a line
    break and nothing is lost by cutting there.
    """
    for line in doc.split(NEWLINE):
        if not line:
            continue
        if len(line) * 4 <= max_bytes or len(line.encode("utf-8")) <= max_bytes:
            yield line
            continue
        step = max_bytes // 4  # a character is at most 4 bytes
        for start in range(0, len(line), step):
            yield line[start:start + step]


# ----------------------------------------------------------------------------- alphabet


class Normalizer:
    """The model's normalization, applied line by line so newlines survive it."""

    def __init__(self, cfg: TokenizerTrainConfig):
        self.normalizer = None
        if cfg.normalization != "identity":
            import sentencepiece as spm

            self.normalizer = spm.SentencePieceNormalizer(
                rule_name=cfg.normalization, add_dummy_prefix=False, escape_whitespaces=False,
                remove_extra_whitespaces=cfg.remove_extra_whitespaces)

    def __call__(self, text: str) -> str:
        if self.normalizer is None:
            return text
        return NEWLINE.join(self.normalizer.normalize(line) for line in text.split(NEWLINE))


def choose_alphabet(counts: collections.Counter, required: str, coverage: float,
                    room: int) -> tuple[set[str], float]:
    """The required characters plus the most frequent others up to ``coverage`` of all counted,
    at most ``room`` of them; the alphabet and the share of the counts it covers."""
    alphabet = set(required)
    total = max(sum(counts.values()), 1)
    covered = sum(counts[c] for c in alphabet)
    for char, n in counts.most_common():
        if covered >= coverage * total or room <= 0:
            break
        if char not in alphabet:
            alphabet.add(char)
            covered += n
            room -= 1
    return alphabet, covered / total


def restrict(sentence: str, alphabet: set[str]) -> list[str]:
    """The parts of ``sentence`` between characters outside ``alphabet``."""
    outside = set(sentence) - alphabet
    if not outside:
        return [sentence]
    parts, start = [], 0
    for i, ch in enumerate(sentence):
        if ch in outside:
            if i > start:
                parts.append(sentence[start:i])
            start = i + 1
    if start < len(sentence):
        parts.append(sentence[start:])
    return parts


def alphabet_floor(total_chars: int) -> int:
    """How often each alphabet character must occur for SentencePiece's coverage pass to keep it.

    That pass compares a float32 ratio with 1.0; a character whose count is below about
    ``2**-24`` of the total rounds to full coverage and is dropped.
    """
    return math.ceil(total_chars * 1e-7) + 1


# ----------------------------------------------------------------------------- training


@dataclass
class TrainingText:
    sentences: list[str]
    alphabet: set[str]
    coverage: float
    """Share of the sample's characters (newlines aside) that are in the alphabet."""
    topped_up: int


def build_training_text(cfg: TokenizerTrainConfig, docs: Iterator[str]) -> TrainingText:
    """Normalized, cut, alphabet-restricted sentences, with the alphabet made frequent enough."""
    normalize = Normalizer(cfg)
    sentences: list[str] = []
    counts: collections.Counter = collections.Counter()
    for doc in docs:
        for sentence in split_sentences(normalize(doc), cfg.max_sentence_length):
            if sentence.strip():
                sentences.append(sentence)
                counts.update(sentence)
    # SentencePiece sees spaces as U+2581 and keeps "\n" as a user-defined piece.
    counts[SPACE_PIECE] += counts.pop(" ", 0)
    counts.pop(NEWLINE, None)
    # Leave a tenth of the vocabulary (at least 100 pieces) for pieces longer than one character.
    required = cfg.required_char_set()
    room = cfg.vocab_size - cfg.fixed_pieces() - len(required) - max(100, cfg.vocab_size // 10)
    alphabet, coverage = choose_alphabet(counts, required, cfg.character_coverage, room)
    alphabet_chars = set(alphabet) | {" ", NEWLINE}
    restricted = [part for s in sentences for part in restrict(s, alphabet_chars)]
    floor = alphabet_floor(sum(counts.values()))
    topped_up = 0
    for char in sorted(alphabet):
        missing = floor - counts.get(char, 0)
        if missing > 0 and char != SPACE_PIECE:
            restricted.extend([char] * missing)
            topped_up += 1
    return TrainingText(restricted, alphabet, coverage, topped_up)


def trainer_arguments(cfg: TokenizerTrainConfig, alphabet: set[str]) -> dict:
    """Keyword arguments of ``SentencePieceTrainer.train`` for this config."""
    return dict(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        normalization_rule_name=cfg.normalization,
        add_dummy_prefix=cfg.add_dummy_prefix,
        remove_extra_whitespaces=cfg.remove_extra_whitespaces,
        allow_whitespace_only_pieces=cfg.allow_whitespace_only_pieces,
        split_digits=cfg.split_digits,
        byte_fallback=cfg.byte_fallback,
        max_sentencepiece_length=cfg.max_piece_length,
        max_sentence_length=cfg.max_sentence_length,
        character_coverage=1.0,  # the alphabet is chosen in build_training_text
        required_chars="".join(sorted(alphabet - {SPACE_PIECE})),
        user_defined_symbols=[NEWLINE] if cfg.newline_piece else [],
        control_symbols=cfg.reserved_piece_names(),
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece=cfg.unk_piece, bos_piece=cfg.bos_piece, eos_piece=cfg.eos_piece, pad_piece=cfg.pad_piece,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        train_extremely_large_corpus=False,
        num_threads=cfg.num_threads,
        minloglevel=2,
    )


def train_model(cfg: TokenizerTrainConfig, text: TrainingText) -> bytes:
    """Run SentencePiece's trainer on the sentences; the serialized model."""
    import sentencepiece as spm

    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text.sentences), model_writer=writer,
                                       **trainer_arguments(cfg, text.alphabet))
    except RuntimeError as err:
        raise HataoriError(f"SentencePiece could not train on this input: {err}") from None
    model = spm_proto.parse(writer.getvalue())
    # Unigram scores on a grid, so the Hugging Face fast tokenizer gives SentencePiece's ids
    # (hataori.tokenizer.proto); BPE scores are already whole numbers (minus the merge rank).
    spm_proto.round_scores(model)
    return model.SerializeToString()


def check_model(cfg: TokenizerTrainConfig, proto: bytes) -> None:
    """The trained model holds every required character and special piece as a piece of its own."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    missing = [c for c in cfg.required_char_set() if sp.piece_to_id(c) == sp.unk_id()]
    if missing:
        raise RuntimeError(f"{len(missing)} required characters did not get a piece, e.g. {''.join(missing[:20])}")
    for piece in [NEWLINE] * cfg.newline_piece + cfg.reserved_piece_names():
        if sp.piece_to_id(piece) == sp.unk_id():
            raise RuntimeError(f"piece {piece!r} is missing from the trained model")


# ----------------------------------------------------------------------------- output


def _escape(piece: str) -> str:
    return piece.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def write_output(out: Output, cfg, proto: bytes, summary: dict) -> None:
    """The tokenizer folder ``out`` (held), written whole or not at all: tokenizer.model, tokenizer.vocab
    (a piece and its score a line), config.yaml (``cfg``) and summary.json."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    # One piece a line, tab, score; the newline and tab pieces are written escaped.
    vocab = "".join(f"{_escape(sp.id_to_piece(i))}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    with out.folder() as tmp:
        (tmp / "tokenizer.model").write_bytes(proto)
        (tmp / "tokenizer.vocab").write_text(vocab, encoding="utf-8")
        (tmp / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n",
                                          encoding="utf-8")


def train(cfg: TokenizerTrainConfig, replace: bool = False) -> dict:
    """Train and write the tokenizer folder; the summary (also written as summary.json). The output is held
    under :mod:`hataori.outputs`' contract: a non-empty one is refused unless ``replace`` and it holds an
    earlier tokenizer, which is replaced once the new one is complete; an input is never replaced."""
    require(bool(cfg.output), "output", "no output folder; pass --output DIR or output=DIR")
    with claim(cfg.output, "tokenizer", option="--output DIR, or the config key output",
               inputs=[source.path for source in cfg.sources]) as out:
        out.check_replace(replace)
        return _train(cfg, out)


def _train(cfg: TokenizerTrainConfig, out: Output) -> dict:
    import sentencepiece as spm

    started = time.perf_counter()
    samples, files = count_sources(cfg)
    text = build_training_text(cfg, sample_documents(cfg, samples, files))
    read_seconds = time.perf_counter() - started
    proto = train_model(cfg, text)
    check_model(cfg, proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    validation = evaluate_held_out(cfg, proto, files)
    summary = {
        "fingerprint": fingerprint_bytes(proto),
        "vocab_size": sp.get_piece_size(),
        "model_type": cfg.model_type,
        "normalization": cfg.normalization,
        "special_ids": {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()},
        "reserved_ids": [sp.piece_to_id(p) for p in cfg.reserved_piece_names()],
        "newline_id": sp.piece_to_id(NEWLINE) if cfg.newline_piece else None,
        "sources": [
            {"name": s.name, "weight": s.weight, "files": s.files, "documents": s.read.documents,
             "chars": s.read.chars, "bytes": s.read.bytes, "skipped_lines": s.read.skipped,
             "skipped_examples": s.read.skipped_examples, "sampling_rate": round(s.rate, 6),
             "sentences_used": s.parts_used, "chars_used": s.chars_used}
            for s in samples
        ],
        "chars_read": sum(s.read.chars for s in samples),
        "chars_used": sum(s.chars_used for s in samples),
        "sentences": len(text.sentences),
        "alphabet": len(text.alphabet),
        "character_coverage": round(text.coverage, 6),
        "required_chars": len(cfg.required_char_set()),
        "required_chars_topped_up": text.topped_up,
        "validation": validation,
        "seconds_reading": round(read_seconds, 2),
        "seconds_total": round(time.perf_counter() - started, 2),
        "versions": {"hataori": __version__, "sentencepiece": spm.__version__, "python": platform.python_version()},
    }
    write_output(out, cfg, proto, summary)
    return summary


def evaluate_held_out(cfg: TokenizerTrainConfig, proto: bytes, files: dict[str, list[Path]]) -> dict | None:
    """Metrics of the new model on the held-out documents (see ``hataori tokenizer eval``)."""
    docs = held_out_documents(cfg, files)
    if not docs:
        return None
    return measure(Tokenizer(cfg.output, proto=proto), TextSet("validation", docs)).as_dict()


def format_summary(summary: dict, output: str) -> str:
    lines = [f"tokenizer written to {output}"]
    for s in summary["sources"]:
        share = s["chars_used"] / max(summary["chars_used"], 1)
        skipped = f", {s['skipped_lines']} bad lines skipped" if s["skipped_lines"] else ""
        lines.append(f"  source {s['name']}: weight {s['weight']:g}, {s['files']} files, {s['documents']:,} docs, "
                     f"{s['chars']:,} chars read, {s['chars_used']:,} used ({share:.1%} of sample, "
                     f"rate {s['sampling_rate']:.3g}){skipped}")
    lines += [
        f"  chars read {summary['chars_read']:,}, used {summary['chars_used']:,} in {summary['sentences']:,} sentences",
        f"  alphabet {summary['alphabet']:,} chars ({summary['required_chars']:,} required), "
        f"covering {summary['character_coverage']:.4%} of the sample",
        f"  {summary['model_type']}, vocab {summary['vocab_size']:,}, normalization {summary['normalization']}",
        f"  fingerprint {summary['fingerprint']}",
        _format_validation(summary["validation"]),
        f"  time {summary['seconds_total']:.1f} s ({summary['seconds_reading']:.1f} s reading)",
    ]
    return "\n".join(lines)


def _format_validation(metrics: dict | None) -> str:
    if metrics is None:
        return "  validation: no held-out documents (val_fraction=0 or too little input)"
    return (f"  validation ({metrics['documents']:,} held-out docs, {metrics['chars']:,} chars): "
            f"{metrics['chars_per_token']:.3f} chars/token, byte fallback {metrics['byte_fallback_rate']:.3%}, "
            f"unk {metrics['unk_rate']:.3%}, round trip {metrics['round_trip']:.2%}")


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="CONFIG.yaml|key=value",
                        help="config files (applied in order, each after its base:) and key=value overrides")
    parser.add_argument("--input", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="a corpus file, glob or folder (JSONL or text, .gz/.zst), with an optional "
                             "sampling weight; repeat for several sources (replaces the config's sources)")
    parser.add_argument("--output", metavar="DIR", help="folder to write (same as output=DIR)")
    parser.add_argument("--replace", action="store_true",
                        help="replace an existing output folder (once the new tokenizer is complete)")


def config_from_args(args: argparse.Namespace) -> TokenizerTrainConfig:
    files, overrides = command_items(args.items, {
        "--input": ("sources", [parse_source(spec) for spec in args.input] if args.input else None),
        "--output": ("output", args.output or None)})
    return load(TokenizerTrainConfig, files, overrides)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    summary = train(cfg, replace=args.replace)
    print(format_summary(summary, cfg.output))
    return 0

