"""The Hugging Face fast tokenizer exported from a SentencePiece model against SentencePiece itself.

Each model is written out with ``write_hf_tokenizer`` and loaded back through transformers'
``AutoTokenizer`` (offline, from the folder), then both encode the same texts: the Debian Japanese
corpus, English documentation, and texts made to break converters (emoji, half-width kana, kanji
no vocabulary holds, mixed scripts, runs of spaces and newlines, written special tokens). One id
or one character of a decode that differs fails the test. The models: hataori's unigram and BPE
tokenizers (identity and NFKC normalization) and a Llama-style SentencePiece BPE (dummy prefix,
byte fallback, no user-defined pieces) trained with SentencePiece directly, and hataori's English
BPE with the same settings plus its newline piece (a dummy prefix before a user-defined piece).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hataori.cli import main as hataori_main
from hataori.tokenizer import proto as spm_proto
from hataori.tokenizer.hf import fast_tokenizer, write_hf_tokenizer
from hataori.tokenizer.model import Tokenizer

HARD_TEXTS = [
    "Debian のパッケージは、 ２つ の方法で\n\nインストールできます。",
    "絵文字 😀🎌👨‍👩‍👧 と国旗 🇯🇵、異体字セレクタ 葛󠄀 と ❤️",
    "半角カナ ｶﾀｶﾅ ﾃﾞﾊﾞｲｽ ｰ と全角英数 ＡＢＣ１２３",
    "常用外の漢字 魑魅魍魎 齟齬 鬱 𠮷野家 𩸽 躑躅",
    "mixed 日本語 and English, 한국어, 中文, Ελληνικά, кириллица; x² ≤ √y",
    "   leading spaces", "trailing spaces   ", "a  b   c    d", "\n\n\nnewlines first", "tabs\tand\t\ttabs",
    " \n \n  \n", "", " ", "\n",
    "written specials <s> </s> <pad> <unk> <|reserved_0|> and byte pieces <0x41> <0xE3>",
    "runs MMMMMMM xxxxx ..... ----- ==== 0000000 ",
    "NFKC を変える文字: ① ㍻ ﬁ ｶﾞ Å ½",
]


def run(*argv) -> int:
    return hataori_main([str(a) for a in argv])


def docs(corpus: Path, every: int = 1) -> list[str]:
    with open(corpus / "corpus.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][::every]


@pytest.fixture(scope="module")
def texts(ja_corpus, en_corpus) -> dict[str, list[str]]:
    return {"hard": HARD_TEXTS, "debian-ja": docs(ja_corpus, every=3), "python-docs": docs(en_corpus, every=2)}


@pytest.fixture(scope="module")
def ja_nfkc(ja_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nfkc") / "tok"
    assert run("tokenizer", "train", "configs/tokenizer/ja-unigram-32k-nfkc.yaml", "--input",
               ja_corpus / "corpus.jsonl", "--output", out, "vocab_size=4000", "max_input_chars=500000",
               "required_chars=kana", "progress=false") == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ja_tokenizer", "ja_bpe_tokenizer", "ja_nfkc", "llama_style_tokenizer",
                                   "en_bpe_tokenizer"])
def test_fast_tokenizer_gives_sentencepiece_ids(model, texts, tmp_path, request):
    from transformers import AutoTokenizer

    tok = Tokenizer(request.getfixturevalue(model))
    written = write_hf_tokenizer(tok, tmp_path, model_max_length=256)
    assert sorted(written) == sorted(p.name for p in tmp_path.iterdir())
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert len(hf) == tok.vocab_size
    assert (hf.eos_token_id, hf.bos_token_id, hf.unk_token_id) == (tok.eos_id, tok.bos_id, tok.sp.unk_id())
    byte_ids = {i for i in range(tok.vocab_size) if tok.sp.is_byte(i)}
    used_bytes = 0
    for name, group in texts.items():
        expected = tok.encode(group)
        got = hf(group, add_special_tokens=False)["input_ids"]
        for text, want, have in zip(group, expected, got):
            assert have == want, f"{model} on {name}: ids differ for {text[:60]!r}"
            assert hf.decode(have) == tok.decode(want), f"{model} on {name}: decode differs for {text[:60]!r}"
            used_bytes += sum(i in byte_ids for i in want)
    assert used_bytes > 0  # the texts exercise byte fallback
    # Every text begins after the document-start token, as training documents follow an EOS.
    assert hf(HARD_TEXTS[0])["input_ids"] == [tok.eos_id] + tok.encode([HARD_TEXTS[0]])[0]


def test_identity_tokenizers_decode_to_the_text(ja_tokenizer, llama_style_tokenizer, texts):
    for path in (ja_tokenizer, llama_style_tokenizer):
        fast = fast_tokenizer(Tokenizer(path))
        fast.encode_special_tokens = True
        for text in texts["hard"]:
            assert fast.decode(fast.encode(text, add_special_tokens=False).ids) == text


def test_trained_unigram_scores_lie_on_the_grid(ja_tokenizer, ja_bpe_tokenizer):
    """What makes float32 and float64 segmentations agree (hataori.tokenizer.proto)."""
    for path in (ja_tokenizer, ja_bpe_tokenizer):
        proto = spm_proto.read(path)
        assert spm_proto.scores_on_grid(proto)
        assert spm_proto.newline_splits(proto)


def test_unsupported_settings_are_refused(ja_tokenizer, tmp_path):
    from hataori.errors import InputError

    proto = spm_proto.read(ja_tokenizer)
    proto.normalizer_spec.remove_extra_whitespaces = True
    path = tmp_path / "squeezing.model"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(InputError, match="remove_extra_whitespaces"):
        fast_tokenizer(Tokenizer(path))


def test_normalizer_matches_sentencepiece_on_every_character(ja_nfkc):
    """NFKC as SentencePiece applies it, on each code point below U+30000 and on kana followed by
    voiced and semi-voiced marks (which SentencePiece composes as one match)."""
    tok = Tokenizer(ja_nfkc)
    normalizer = fast_tokenizer(tok).normalizer
    kana = [chr(c) for c in range(0xFF66, 0xFF9E)] + list("かさたはカサタハウ")
    texts = [chr(c) for c in range(0x30000) if not 0xD800 <= c < 0xE000 and c not in (0x0A, 0x2581)]
    texts += [k + mark for k in kana for mark in "\uff9e\uff9f\u3099\u309a\u309b\u309c"]
    differ = [t for t in texts if normalizer.normalize_str(t) != tok.sp.normalize(t)]
    assert differ == []


def test_dummy_prefix_with_user_defined_pieces_is_refused(en_corpus, tmp_path):
    from hataori.errors import InputError

    out = tmp_path / "tok"
    assert hataori_main(["tokenizer", "train", "configs/tokenizer/en-bpe-llama-style.yaml", "--input",
                         str(en_corpus / "corpus.jsonl"), "--output", str(out), "vocab_size=1000",
                         "max_input_chars=200000", "newline_piece=true", "progress=false"]) == 0
    with pytest.raises(InputError, match="newline_piece=false"):
        fast_tokenizer(Tokenizer(out))
