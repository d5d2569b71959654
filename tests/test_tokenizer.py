"""``hataori tokenizer train`` and ``hataori tokenizer eval`` on real Japanese text.

Models are small (4k-8k pieces) and trained on capped samples of the Debian Japanese corpus so the
file runs in well under a minute or two on two cores. Checks compare against things computed
independently of the trainer: JIS X 0208 enumerated through ``str.encode("euc_jp")``, token counts
from SentencePiece itself, SHA-256 of the model file, source shares counted from the sample.
"""

from __future__ import annotations

import collections
import functools
import gzip
import hashlib
import io
import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm

from hataori.cli import main as hataori_main
from hataori.config import load
from hataori.corpus.sources import SourceConfig, expand, in_validation, iter_documents
from hataori.data.prepare import PrepareConfig, prepare
from hataori.data.shards import Dataset
from hataori.errors import ConfigError
from hataori.tokenizer.model import Tokenizer
from hataori.tokenizer.trainer import TokenizerTrainConfig, count_sources, sample_documents

BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def run(*argv: str) -> int:
    return hataori_main([str(a) for a in argv])


@functools.lru_cache(maxsize=None)
def jis0208_by_encoding() -> frozenset[str]:
    """JIS X 0208 as the characters of the BMP that EUC-JP writes as two bytes 0xA1-0xFE."""
    chars = set()
    for code in range(0x80, 0x10000):
        ch = chr(code)
        try:
            raw = ch.encode("euc_jp")
        except UnicodeEncodeError:
            continue
        if len(raw) == 2 and 0xA1 <= raw[0] <= 0xFE and 0xA1 <= raw[1] <= 0xFE:
            chars.add(ch)
    return frozenset(chars)


@pytest.fixture(scope="module")
def ja_docs(ja_corpus: Path) -> list[str]:
    """The corpus's documents in file order."""
    with open(ja_corpus / "corpus.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def kana_kanji_corpus(ja_docs, tmp_path_factory) -> Path:
    """A sample of the corpus keeping only JIS X 0208 characters and newlines.

    On such text SentencePiece's own handling of required_chars drops the rare ones; ours must not.
    """
    path = tmp_path_factory.mktemp("kana") / "kana.txt"
    jis = jis0208_by_encoding() | {"\n"}
    kept, total = [], 0
    for doc in ja_docs[::7]:
        doc = re.sub(r"\n+", "\n", "".join(c for c in doc if c in jis)).strip()
        if doc:
            kept.append(doc)
            total += len(doc)
        if total > 600_000:
            break
    path.write_text("\n\n".join(kept) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def jis_tokenizer(kana_kanji_corpus, tmp_path_factory) -> Path:
    """An 8k unigram tokenizer with the full JIS X 0208 set required."""
    out = tmp_path_factory.mktemp("jis") / "tok"
    assert run("tokenizer", "train", "--input", kana_kanji_corpus, "--output", out,
               "vocab_size=8000", "required_chars=jis0208", "progress=false") == 0
    return out


# ----------------------------------------------------------------------------- the model


def test_special_pieces_and_ids(ja_tokenizer):
    tok = Tokenizer(ja_tokenizer)
    sp = tok.sp
    assert (sp.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    cfg = yaml_config(ja_tokenizer)
    reserved = [sp.piece_to_id(f"<|reserved_{i}|>") for i in range(cfg["reserved_tokens"])]
    assert reserved == list(range(4, 4 + cfg["reserved_tokens"]))
    assert all(sp.is_control(i) for i in reserved)
    # Control pieces are never produced from text, so a document cannot forge them.
    assert sp.piece_to_id("<|reserved_0|>") not in tok.encode(["<|reserved_0|>"])[0]
    assert sum(1 for i in range(sp.get_piece_size()) if BYTE_PIECE.fullmatch(sp.id_to_piece(i))) == 256
    assert tok.vocab_size == 4000
    summary = json.loads((ja_tokenizer / "summary.json").read_text(encoding="utf-8"))
    assert summary["vocab_size"] == 4000 and summary["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}


def yaml_config(folder: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))


def test_digits_split(ja_tokenizer):
    tok = Tokenizer(ja_tokenizer)
    pieces = tok.sp.encode("2024年12月31日、バージョン10.04", out_type=str)
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits and all(len(p) == 1 for p in digits), pieces


def test_newline_and_whitespace_round_trip(ja_tokenizer):
    tok = Tokenizer(ja_tokenizer)
    newline = tok.sp.piece_to_id("\n")
    assert newline != tok.sp.unk_id()
    texts = ["一行目\n二行目\n\n  字下げした行\n\t タブ　全角空白", "  先頭の空白と末尾の空白  ", "\n\n\n", "a  b   c",
             "def f(x):\n    return x\n"]
    for text, ids in zip(texts, tok.encode(texts)):
        assert tok.decode(ids) == text
        assert ids.count(newline) == text.count("\n")


def test_byte_fallback_decodes_unseen_characters(ja_tokenizer):
    tok = Tokenizer(ja_tokenizer)
    text = "絵文字😀と𠮷野家と鱻、それにÅngström"
    ids = tok.encode([text])[0]
    pieces = [tok.sp.id_to_piece(i) for i in ids]
    assert tok.sp.unk_id() not in ids
    assert any(BYTE_PIECE.fullmatch(p) for p in pieces)
    assert tok.decode(ids) == text


def test_required_chars_all_present(jis_tokenizer, kana_kanji_corpus):
    expected = jis0208_by_encoding()
    assert len(expected) == 6879
    sp = Tokenizer(jis_tokenizer).sp
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    assert expected - pieces == set()
    assert {chr(c) for c in range(0xFF61, 0xFFA0)} <= pieces  # half-width katakana
    assert {chr(c) for c in range(0x21, 0x7F)} <= pieces  # printable ASCII, absent from this text

    # SentencePiece left to itself, with the same settings, drops most of them on this text (no
    # dummy-prefix spaces, so the required characters alone reach the coverage): the check above can fail.
    plain = io.BytesIO()
    text = [line for line in kana_kanji_corpus.read_text(encoding="utf-8").split("\n") if line]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=plain, vocab_size=8000,
                                   required_chars="".join(sorted(expected)), byte_fallback=True,
                                   normalization_rule_name="identity", add_dummy_prefix=False,
                                   minloglevel=2, num_threads=2)
    plain_sp = spm.SentencePieceProcessor(model_proto=plain.getvalue())
    plain_pieces = {plain_sp.id_to_piece(i) for i in range(plain_sp.get_piece_size())}
    assert len(expected - plain_pieces) > 1000


def test_rare_kanji_get_one_piece(jis_tokenizer):
    tok = Tokenizer(jis_tokenizer)
    for ch in "鬱薔薇憂鬱檸檬麒麟":  # JIS level 2 and rare level 1
        assert tok.sp.encode(ch, out_type=str) == [ch]


# ----------------------------------------------------------------------------- sampling


def write_lines(path: Path, docs: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    return path


@pytest.mark.parametrize("weights, cap", [((3.0, 1.0), 600_000), ((1.0, 4.0), 500_000), ((1.0, 1.0), 10**9)])
def test_weights_honoured_by_sampler(ja_docs, tmp_path, weights, cap):
    # Every line of source b is marked so that each sampled line can be told apart.
    a_docs = ja_docs[0:2000]
    b_docs = ["\n".join("◆" + line for line in doc.split("\n")) for doc in ja_docs[3000:4000]]
    a = write_lines(tmp_path / "a.jsonl", a_docs)
    b = write_lines(tmp_path / "b.jsonl", b_docs)
    sizes = [sum(len(d) for d in a_docs), sum(len(d) for d in b_docs)]
    cfg = TokenizerTrainConfig(sources=[SourceConfig(path=str(a), weight=weights[0], name="a"),
                                        SourceConfig(path=str(b), weight=weights[1], name="b")],
                               max_input_chars=cap, required_chars="none", progress=False)
    samples, files = count_sources(cfg)
    assert [s.read.chars for s in samples] == sizes
    chars = collections.Counter()
    sampled = list(sample_documents(cfg, samples, files))
    for line in sampled:
        chars["b" if line.startswith("◆") else "a"] += len(line)
    total = min(cap, sum(sizes) - sum(d.count("\n") for d in a_docs + b_docs))  # lines are sampled
    assert sum(chars.values()) == pytest.approx(total, rel=0.06)  # lines are drawn whole
    assert chars["a"] / sum(chars.values()) == pytest.approx(weights[0] / sum(weights), abs=0.02)
    assert list(sample_documents(cfg, *count_sources(cfg))) == sampled  # deterministic for a seed


# ----------------------------------------------------------------------------- bad input


def train_fails(capsys, *argv) -> str:
    """Run a training that must fail with a user error; its message."""
    assert run("tokenizer", "train", *argv, "vocab_size=500", "required_chars=none", "progress=false") == 2
    return capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    err = train_fails(capsys, "--input", tmp_path / "nope.jsonl", "--output", tmp_path / "out")
    assert "nope.jsonl" in err and "no such file" in err
    assert not (tmp_path / "out").exists()


def test_malformed_jsonl_names_file_and_line(ja_docs, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    write_lines(path, ja_docs[:2])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"text": "閉じていない\n')
    err = train_fails(capsys, "--input", path, "--output", tmp_path / "out")
    assert f"{path}:3" in err and "malformed JSON" in err
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "sjis.txt"
    path.write_bytes("一行目です\n".encode() + "二行目です\n".encode("shift_jis"))
    err = train_fails(capsys, "--input", path, "--output", tmp_path / "out")
    assert f"{path}:2" in err and "UTF-8" in err


def test_missing_text_field(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": "本文"}, ensure_ascii=False) + "\n", encoding="utf-8")
    err = train_fails(capsys, "--input", path, "--output", tmp_path / "out")
    assert f"{path}:1" in err and "'text'" in err and "'body'" in err


def test_empty_input(tmp_path, capsys):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n", encoding="utf-8")
    err = train_fails(capsys, "--input", path, "--output", tmp_path / "out")
    assert "empty.txt" in err and "no text" in err


def test_unknown_config_key_suggests_closest(tmp_path, capsys):
    err = train_fails(capsys, "--input", tmp_path, "--output", tmp_path / "out", "vocab_sise=1000")
    assert "vocab_sise" in err and "did you mean 'vocab_size'" in err
    with pytest.raises(ConfigError, match="no room"):
        load(TokenizerTrainConfig, overrides=["sources=[{path: x}]", "vocab_size=4000", "required_chars=jis0208"])


def test_skip_bad_lines_counts_skips(ja_docs, tmp_path):
    path = tmp_path / "mixed.jsonl.gz"
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in ja_docs[:3000]]
    lines[10] = "{not json"
    lines[20] = json.dumps({"other": 1})
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run("tokenizer", "train", "--input", path, "--output", out, "vocab_size=2000",
               "max_input_chars=300000", "required_chars=none", "skip_bad_lines=true", "progress=false") == 0
    source = json.loads((out / "summary.json").read_text(encoding="utf-8"))["sources"][0]
    assert source["skipped_lines"] == 2 and source["documents"] == 2998


def test_failed_training_leaves_previous_output_intact(ja_docs, tmp_path, capsys):
    good = write_lines(tmp_path / "good.jsonl", ja_docs[:3000])
    out = tmp_path / "tok"
    assert run("tokenizer", "train", "--input", good, "--output", out, "vocab_size=2000",
               "max_input_chars=300000", "required_chars=none", "progress=false") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # Too few distinct pieces for the vocabulary: SentencePiece itself refuses.
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("あいう\n", encoding="utf-8")
    err = train_fails(capsys, "--input", tiny, "--output", out, "--replace")
    assert "SentencePiece could not train" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    # A non-empty folder is not replaced unless asked.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("x")
    err = train_fails(capsys, "--input", good, "--output", tmp_path / "notes")
    assert "holds files that no hataori command wrote (keep.txt)" in err and (tmp_path / "notes" / "keep.txt").exists()


def test_existing_output_is_refused_unless_replace(ja_docs, tmp_path, capsys):
    common = ["--input", write_lines(tmp_path / "good.jsonl", ja_docs[:3000]), "max_input_chars=300000",
              "required_chars=none", "progress=false"]
    out = tmp_path / "tok"
    assert run("tokenizer", "train", *common, "--output", out, "vocab_size=2000") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for output in (["--output", out], [f"output={out}"]):
        assert run("tokenizer", "train", *common, *output, "vocab_size=2100") == 2
        err = capsys.readouterr().err
        assert f"{out}: holds a tokenizer folder (hataori tokenizer train or extend); pass --replace" in err
        assert "config key output" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run("tokenizer", "train", *common, "--output", out, "vocab_size=2100", "--replace") == 0
    assert spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).get_piece_size() == 2100
    assert json.loads((out / "summary.json").read_text())["vocab_size"] == 2100
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    # A folder of the input corpus, and one of a user's: refused with --replace too.
    assert run("tokenizer", "train", *common, "--output", tmp_path, "--replace") == 2
    assert f"{tmp_path}: holds {tmp_path / 'good.jsonl'}, an input of this command" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert run("tokenizer", "train", *common, "--output", mine, "--replace") == 2
    assert "holds files that no hataori command wrote (notes.txt), not a tokenizer folder" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# ----------------------------------------------------------------------------- fingerprint


@pytest.mark.slow
def test_fingerprint_follows_model_bytes(ja_docs, ja_tokenizer, tmp_path):
    tok = Tokenizer(ja_tokenizer)
    model_bytes = (ja_tokenizer / "tokenizer.model").read_bytes()
    assert tok.fingerprint == hashlib.sha256(model_bytes).hexdigest()[:16]
    copy = tmp_path / "copy.model"
    copy.write_bytes(model_bytes)
    assert Tokenizer(copy).fingerprint == tok.fingerprint
    summary = json.loads((ja_tokenizer / "summary.json").read_text(encoding="utf-8"))
    assert summary["fingerprint"] == tok.fingerprint

    corpus = write_lines(tmp_path / "c.jsonl", ja_docs[:3000])
    prints = []
    for seed, vocab in [(0, 2000), (0, 2000), (0, 2100)]:
        out = tmp_path / f"t{len(prints)}"
        assert run("tokenizer", "train", "--input", corpus, "--output", out, f"vocab_size={vocab}",
                   f"seed={seed}", "max_input_chars=300000", "required_chars=none", "progress=false") == 0
        prints.append(Tokenizer(out).fingerprint)
    assert prints[0] == prints[1] != prints[2]


# ----------------------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def spm_default(ja_docs, tmp_path_factory) -> Path:
    """A tokenizer made by SentencePiece's own trainer with its defaults (NFKC normalization, no byte fallback,
    character coverage 0.9995): 4,000 pieces of the first 1,500 documents (the evaluation sample is the last 1,500)."""
    prefix = tmp_path_factory.mktemp("spm-default") / "spm_default_4000"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(ja_docs[:1500]), model_prefix=str(prefix),
                                   vocab_size=4000, minloglevel=2)
    return prefix.with_suffix(".model")


def counts_by_sentencepiece(model: Path, docs: list[str]) -> dict:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tokens = byte = unk = lossless = 0
    for doc in docs:
        pieces = sp.encode(doc, out_type=str)
        ids = sp.encode(doc)
        tokens += len(ids)
        byte += sum(1 for p in pieces if BYTE_PIECE.fullmatch(p))
        unk += ids.count(sp.unk_id())
        lossless += sp.decode(ids) == doc
    return {"tokens": tokens, "byte_tokens": byte, "unk_tokens": unk, "lossless_docs": lossless}


def test_eval_against_sentencepiece_and_its_defaults(ja_tokenizer, spm_default, ja_docs, tmp_path, capsys):
    """``tokenizer eval`` of ours beside a tokenizer SentencePiece's trainer made with its defaults: every count
    against SentencePiece's own encoding of the same texts."""
    other = spm_default
    sample = write_lines(tmp_path / "sample.jsonl", ja_docs[-1500:])
    extra = tmp_path / "extra.txt"
    extra.write_text("絵文字😀を含む段落。\n二行目。\n\n別の段落、鱻。\n", encoding="utf-8")
    out = tmp_path / "eval.json"
    assert run("tokenizer", "eval", ja_tokenizer, other, "--text", sample, extra, "--json", out) == 0
    table = capsys.readouterr().out
    assert "chars/token" in table and "spm_default_4000.model" in table
    result = json.loads(out.read_text(encoding="utf-8"))
    texts = {str(sample): ja_docs[-1500:], str(extra): ["絵文字😀を含む段落。\n二行目。", "別の段落、鱻。"]}
    for model, entry in zip([ja_tokenizer / "tokenizer.model", other], result["models"]):
        assert entry["vocab_size"] == spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
        assert entry["fingerprint"] == hashlib.sha256(model.read_bytes()).hexdigest()[:16]
        for name, docs in texts.items():
            metrics = entry["metrics"][name]
            expected = counts_by_sentencepiece(model, docs)
            assert {k: metrics[k] for k in expected} == expected
            assert metrics["chars"] == sum(len(d) for d in docs)
            assert metrics["bytes"] == sum(len(d.encode()) for d in docs)
    ours, theirs = (m["metrics"][str(sample)] for m in result["models"])
    assert ours["round_trip"] == 1.0 and ours["unk_rate"] == 0.0
    assert theirs["round_trip"] < 1.0  # NFKC and no byte fallback
    assert result["models"][0]["normalizes"] is False and result["models"][1]["normalizes"] is True


@pytest.fixture(scope="module")
def other_text(request) -> list[str]:
    """Japanese that is not documentation (fiction, blogs), where a ``ja_other_text`` fixture provides it."""
    try:
        path = Path(request.getfixturevalue("ja_other_text"))
    except pytest.FixtureLookupError:
        pytest.skip("no out-of-domain Japanese text fixture (ja_other_text) is available")
    source = SourceConfig(path=str(path))
    return [doc for p in expand(source) for doc in iter_documents(p, source)]


@pytest.fixture(scope="module")
def debian_8k(ja_corpus, tmp_path_factory) -> Path:
    """An 8k unigram tokenizer with JIS X 0208 required, trained on a sample of the Debian corpus."""
    out = tmp_path_factory.mktemp("debian8k") / "tok"
    assert run("tokenizer", "train", "--input", ja_corpus / "corpus.jsonl", "--output", out, "vocab_size=8000",
               "max_input_chars=1000000", "progress=false") == 0
    return out


@pytest.mark.slow
def test_byte_fallback_stays_low_out_of_domain(debian_8k, ja_corpus, other_text):
    """On news-style text, ours falls back to bytes for under 2% of tokens; SentencePiece with its
    usual character coverage, trained on the same sample, does far more often."""
    def byte_share(sp: spm.SentencePieceProcessor) -> float:
        pieces = [p for doc in other_text[:5000] for p in sp.encode(doc, out_type=str)]
        return sum(1 for p in pieces if BYTE_PIECE.fullmatch(p)) / len(pieces)

    ours = byte_share(Tokenizer(debian_8k).sp)
    assert ours < 0.02

    with open(ja_corpus / "corpus.jsonl", encoding="utf-8") as f:
        lines = [line for doc in (json.loads(row)["text"] for row in f) for line in doc.split("\n") if line]
    lines = lines[: len(lines) // 7]
    plain = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=plain, vocab_size=8000,
                                   character_coverage=0.9995, byte_fallback=True, add_dummy_prefix=False,
                                   normalization_rule_name="identity", minloglevel=2, num_threads=2)
    theirs = byte_share(spm.SentencePieceProcessor(model_proto=plain.getvalue()))
    assert theirs > 3 * ours


@pytest.mark.slow
def test_held_out_documents_are_the_shards_validation_split(ja_docs, tmp_path):
    """The trainer never sees the documents that ``data prepare`` (same fraction and seed) puts
    into validation, and reports metrics on them. A character that occurs only in those documents
    gets no piece, while a control run that holds nothing out learns it."""
    marker = "\U00020bb7" * 40  # 𠮷, outside JIS X 0208 and absent from the corpus
    docs = []
    for doc in ja_docs[:250]:
        marked = doc + marker
        if in_validation(marked, 0.1, 7):
            docs.append(marked)
        elif not in_validation(doc, 0.1, 7):
            docs.append(doc)
    held_out = [d for d in docs if marker in d]
    assert 10 < len(held_out) < 80
    corpus = write_lines(tmp_path / "corpus.jsonl", docs)

    def train(out: Path, val_fraction: float) -> spm.SentencePieceProcessor:
        assert run("tokenizer", "train", "--input", corpus, "--output", out, "vocab_size=3000", "required_chars=none",
                   f"val_fraction={val_fraction}", "split_seed=7", "progress=false") == 0
        return spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))

    assert train(tmp_path / "control", 0.0).piece_to_id(marker[0]) != 0
    held = train(tmp_path / "held", 0.1)
    assert held.piece_to_id(marker[0]) == 0  # <unk>: never seen in training
    summary = json.loads((tmp_path / "held" / "summary.json").read_text())
    assert summary["validation"]["documents"] == len(held_out)
    assert summary["validation"]["byte_fallback_rate"] > 0

    prepare(PrepareConfig(sources=[SourceConfig(path=str(corpus))], tokenizer=str(tmp_path / "held"),
                          output=str(tmp_path / "ds"), val_fraction=0.1, split_seed=7, progress=False))
    val = Dataset(tmp_path / "ds", "val")
    decoded = [held.decode(val.doc(i)[:-1].tolist()) for i in range(len(val))]
    assert decoded == held_out
