"""``hataori tokenizer extend`` and the embedding rows an extended tokenizer's new pieces start from.

Bases: a Llama-style SentencePiece BPE and a unigram, both trained by SentencePiece itself on
English documentation (Python's docstrings), with Llama's dummy prefix. Added: hataori's Japanese
BPE and unigram tokenizers trained on the Debian corpus. References are independent of the merge:
the base's own ids on the English corpus, SentencePiece's encoding of each added piece, and the
fast tokenizer exported from the merged model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hataori.cli import main as hataori_main
from hataori.tokenizer import proto as spm_proto
from hataori.tokenizer.charsets import is_japanese
from hataori.tokenizer.model import Tokenizer


def docs(path: Path, every: int = 1) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][::every]


@pytest.fixture(scope="module")
def english_unigram(en_corpus, tmp_path_factory) -> Path:
    """A unigram base with Llama's settings (dummy prefix, byte fallback), trained on English."""
    import sentencepiece as spm

    prefix = tmp_path_factory.mktemp("unigram") / "tokenizer"
    lines = [line for text in docs(en_corpus / "corpus.jsonl") for line in text.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=3000,
                                   model_type="unigram", byte_fallback=True, add_dummy_prefix=True,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity", pad_id=-1,
                                   minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def ja_eval(ja_corpus, tmp_path_factory) -> Path:
    """Every 20th Debian document (about 290), as a JSONL file."""
    path = tmp_path_factory.mktemp("eval") / "ja.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                            for t in docs(ja_corpus / "corpus.jsonl", every=20)), encoding="utf-8")
    return path


@pytest.mark.parametrize("base, added", [("llama_style_tokenizer", "ja_bpe_tokenizer"),
                                         ("english_unigram", "ja_tokenizer")], ids=["bpe", "unigram"])
def test_extend_keeps_the_base_and_adds_japanese_pieces_that_are_used(base, added, en_corpus, ja_eval, tmp_path,
                                                                      request, capsys):
    base_path, added_path = request.getfixturevalue(base), request.getfixturevalue(added)
    out = tmp_path / "extended"
    english = en_corpus / "corpus.jsonl"
    assert hataori_main(["tokenizer", "extend", str(base_path), "--add", str(added_path), "--output", str(out),
                         "--ja-text", str(ja_eval), "--other-text", str(english)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    base_tok, merged, new_tok = Tokenizer(base_path), Tokenizer(out), Tokenizer(added_path)
    base_proto, merged_proto = spm_proto.read(base_path), spm_proto.read(out)

    # Every base piece keeps its id, type and score; then come new Japanese pieces, none a duplicate.
    for old, kept in zip(base_proto.pieces, merged_proto.pieces):
        assert (old.piece, old.type, old.score) == (kept.piece, kept.type, kept.score)
    added_pieces = [p.piece for p in merged_proto.pieces[len(base_proto.pieces):]]
    assert len(added_pieces) == summary["added"] > 1000
    assert len(set(added_pieces)) == len(added_pieces)
    assert not set(added_pieces) & {p.piece for p in base_proto.pieces}
    assert all(any(is_japanese(c) for c in piece) for piece in added_pieces)
    assert set(added_pieces) <= {p.piece for p in spm_proto.read(added_path).pieces}

    # Text without Japanese characters is tokenized exactly as before.
    texts = docs(english)
    assert merged.encode(texts) == base_tok.encode(texts)
    assert summary["report"][str(english)]["ids_unchanged"] == len(texts)

    # Every added piece comes out as itself from its own text: none is unreachable.
    import sentencepiece as spm

    probe = spm_proto.read(out)
    probe.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=probe.SerializeToString())
    first = len(base_proto.pieces)
    assert sp.encode([p.replace("\u2581", " ") for p in added_pieces], out_type=int) == \
        [[first + i] for i in range(len(added_pieces))]

    # Japanese gets shorter: characters per token rise well past the base's and new pieces are used.
    ja = summary["report"][str(ja_eval)]
    japanese = docs(ja_eval)
    chars = sum(map(len, japanese))
    assert ja["before"]["chars_per_token"] == pytest.approx(chars / sum(map(len, base_tok.encode(japanese))))
    assert ja["after"]["chars_per_token"] == pytest.approx(chars / sum(map(len, merged.encode(japanese))))
    assert ja["after"]["chars_per_token"] > 3 * ja["before"]["chars_per_token"]
    assert ja["after"]["chars_per_token"] > 0.8 * chars / sum(map(len, new_tok.encode(japanese)))
    assert ja["new_piece_share"] > 0.5 and ja["after"]["round_trip"] == 1.0
    assert f"{ja['before']['chars_per_token']:.3f} -> {ja['after']['chars_per_token']:.3f}" in printed

    # The exported fast tokenizer of the merged model gives SentencePiece's ids: on every text for the
    # BPE, and for the unigram on the Japanese text. The unigram base was trained by SentencePiece
    # with scores off the 1/64 grid (hataori.tokenizer.proto), so where two segmentations of its
    # English tie, float32 and float64 may pick differently.
    from hataori.tokenizer.hf import fast_tokenizer

    fast = fast_tokenizer(merged)
    fast.encode_special_tokens = True
    sample = japanese[:60] + (texts[::10] if base == "llama_style_tokenizer" else [])
    assert [e.ids for e in fast.encode_batch(sample, add_special_tokens=False)] == merged.encode(sample)
    assert spm_proto.scores_on_grid(merged_proto) == (base == "llama_style_tokenizer")


def test_extend_errors(ja_tokenizer, english_unigram, en_corpus, tmp_path, capsys):
    import sentencepiece as spm

    lines = [line for text in docs(en_corpus / "corpus.jsonl")[:100] for line in text.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "no-bytes"),
                                   vocab_size=500, byte_fallback=False, minloglevel=2)
    no_bytes = tmp_path / "no-bytes.model"
    assert hataori_main(["tokenizer", "extend", str(no_bytes), "--add", str(ja_tokenizer), "--output",
                         str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no byte fallback" in err and "<unk>" in err and not (tmp_path / "out").exists()
    assert hataori_main(["tokenizer", "extend", str(english_unigram), "--add", str(ja_tokenizer), "--output",
                         str(tmp_path / "out"), "--ja-text", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_replace(ja_tokenizer, english_unigram, tmp_path, capsys):
    out = tmp_path / "out"
    extend = ["tokenizer", "extend", str(english_unigram), "--add", str(ja_tokenizer), "--output", str(out)]
    assert hataori_main([*extend, "max_pieces=100"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert hataori_main([*extend, "max_pieces=200"]) == 2
    assert f"{out}: holds a tokenizer folder (hataori tokenizer train or extend); pass --replace" in \
        capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert hataori_main([*extend, "max_pieces=200", "--replace"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 100 < summary["added"] <= 200
    assert Tokenizer(out).vocab_size == Tokenizer(english_unigram).vocab_size + summary["added"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    # Its own base as the output, and a run folder: refused with --replace too, and left as they were.
    again = {p.name: p.read_bytes() for p in out.iterdir()}
    assert hataori_main(["tokenizer", "extend", str(out / "tokenizer.model"), "--add", str(ja_tokenizer), "--output",
                         str(out), "--replace"]) == 2
    assert f"{out}: holds {out / 'tokenizer.model'}, an input of this command" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == again
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {d_model: 64}\n")
    (run / "metrics.jsonl").write_text("{}\n")
    assert hataori_main([*extend[:-1], str(run), "--replace"]) == 2
    assert f"{run}: holds a run folder (config.yaml, checkpoints/), not a tokenizer folder" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]


def test_new_embedding_rows_are_the_mean_of_their_base_pieces_rows(en_corpus, ja_tokenizer, tmp_path):
    """An HF model with a base tokenizer (no dummy prefix, so the base's own encoding of a piece's
    text is the reference split) imported with the extended tokenizer: base rows as in the file,
    new rows the mean of the rows of the base pieces of their text, padding rows zero."""
    from helpers import hf_llama

    from hataori.interop.hf import HFCheckpoint, model_fields
    from hataori.interop.load import InitConfig, load_initial_weights, open_source
    from hataori.model import ModelConfig

    base_dir = tmp_path / "base-tokenizer"
    assert hataori_main(["tokenizer", "train", "configs/tokenizer/ja-bpe-32k.yaml", "--input",
                         str(en_corpus / "corpus.jsonl"), "--output", str(base_dir), "vocab_size=2000",
                         "required_chars=none", "max_input_chars=400000", "progress=false"]) == 0
    base = Tokenizer(base_dir)
    extended_dir = tmp_path / "extended"
    assert hataori_main(["tokenizer", "extend", str(base_dir), "--add", str(ja_tokenizer), "--output",
                         str(extended_dir)]) == 0
    extended = Tokenizer(extended_dir)
    for tie in (False, True):
        folder = hf_llama(tmp_path / f"hf-{tie}", vocab_size=base.vocab_size, tie_word_embeddings=tie)
        (folder / "tokenizer.model").write_bytes(base.proto)
        fields = {**model_fields(HFCheckpoint(folder).config, folder / "config.json"),
                  "vocab_size": extended.vocab_size}
        cfg = ModelConfig(**fields)
        plan = open_source(InitConfig(from_hf=str(folder)), cfg, extended)
        assert plan.growth.added == extended.vocab_size - base.vocab_size > 1000
        model = cfg.build()
        load_initial_weights(model, plan)
        from safetensors.torch import load_file

        weights = load_file(folder / "model.safetensors")
        for ours, theirs in (("tok_embeddings.weight", "model.embed_tokens.weight"),
                             ("lm_head.weight", "lm_head.weight")):
            if tie and ours == "lm_head.weight":
                assert model.lm_head.weight is model.tok_embeddings.weight
                continue
            matrix, source = dict(model.named_parameters())[ours].detach(), weights[theirs]
            assert torch.equal(matrix[:base.vocab_size], source)
            for i in range(base.vocab_size, extended.vocab_size, 97):
                text = extended.sp.id_to_piece(i).replace("\u2581", " ")
                split = base.encode([text])[0]
                torch.testing.assert_close(matrix[i], source[split].mean(dim=0), rtol=0, atol=1e-7)
            assert torch.all(matrix[extended.vocab_size:] == 0)


def test_growth_leaves_out_the_base_dummy_prefix(llama_style_tokenizer, ja_bpe_tokenizer, tmp_path):
    from hataori.interop.load import VocabGrowth

    out = tmp_path / "extended"
    assert hataori_main(["tokenizer", "extend", str(llama_style_tokenizer), "--add", str(ja_bpe_tokenizer),
                         "--output", str(out)]) == 0
    base, extended = Tokenizer(llama_style_tokenizer), Tokenizer(out)
    growth = VocabGrowth(base, extended)
    space = base.sp.piece_to_id("\u2581")
    pieces = [extended.sp.id_to_piece(i) for i in range(base.vocab_size, extended.vocab_size)]
    for piece, split in zip(pieces, growth.splits):
        assert base.decode(split) == piece.replace("\u2581", " ").lstrip(" ") or piece.startswith("\u2581")
        if not piece.startswith("\u2581"):
            assert space not in split and base.sp.id_to_piece(split[0])[0] != "\u2581", piece
