"""The instruction set from JGLUE's training splits (hataori/corpus/jglue_sft.py) and the n-gram
decontamination (hataori/corpus/decontaminate.py), checked against JGLUE's files read directly and against
exact containment of every validation question and sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hataori.cli import main as hataori_main
from hataori.corpus.decontaminate import EvalIndex, find_overlaps, normalize
from hataori.corpus.jglue_files import JGLUE_DIR, VALID_FILES
from hataori.data.chat import to_messages


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jglue") / "sft"
    assert hataori_main(["corpus", "jglue-sft", str(out)]) == 0
    return out


def test_records_follow_the_source_and_carry_its_license(built):
    """Every JCommonsenseQA conversation answers with its question's right choice and every pair prefers it
    to a wrong one; every JSTS answer is its pair's label; the counts add up; the license and attribution
    travel with the files; every record is a conversation data prepare reads."""
    manifest = json.loads((built / "manifest.json").read_text(encoding="utf-8"))
    jcqa = {f"jcommonsenseqa-train/{r['q_id']}": r for r in lines(JGLUE_DIR / "jcommonsenseqa-train.json")}
    jsts = {f"jsts-train/{r['sentence_pair_id']}": r for r in lines(JGLUE_DIR / "jsts-train.json")}
    sft, pairs = lines(built / "sft.jsonl"), lines(built / "preference.jsonl")
    assert manifest["sft"]["read"] == len(jcqa) + len(jsts)
    assert len(sft) == manifest["sft"]["read"] - sum(manifest["sft"]["dropped_overlapping"].values())
    for record in sft:
        user, assistant = (m["content"] for m in to_messages(record, record["id"]))
        if record["source"] == "jcommonsenseqa-train":
            source = jcqa[record["id"]]
            assert source["question"] in user and assistant == source[f"choice{source['label']}"]
        else:
            source = jsts[record["id"]]
            assert source["sentence1"] in user and source["sentence2"] in user
            assert float(assistant) == pytest.approx(source["label"], abs=0.05)
    assert len(pairs) == manifest["preference"]["records"] > 8800
    for pair in pairs:
        source = jcqa[pair["id"]]
        assert pair["chosen"] == source[f"choice{source['label']}"] != pair["rejected"]
        assert pair["rejected"] in [source[f"choice{i}"] for i in range(5)]
    assert (built / "LICENSE").read_bytes() == (JGLUE_DIR / "LICENSE").read_bytes()
    readme = (built / "README.md").read_text(encoding="utf-8")
    assert "CC BY-SA" in readme or "Attribution-ShareAlike 4.0" in readme
    assert "Kurihara, Kawahara and Shibata" in readme


def test_no_validation_question_or_sentence_is_in_the_training_data(built):
    """Independently of the n-grams: no JCommonsenseQA validation question of 13 characters or more, and no
    JNLI or JSTS validation sentence, occurs (normalised) inside any training record, and no validation
    question recurs with the same choices (the short ones, such as 「動物は」, recur with others); the n-gram
    check on the output finds nothing; the builder did drop some (JGLUE's JSTS and JNLI share captions)."""
    training = [normalize(" ".join(m["content"] for m in r["messages"])) for r in lines(built / "sft.jsonl")]
    training += [normalize(r["prompt"] + r["chosen"] + r["rejected"]) for r in lines(built / "preference.jsonl")]
    corpus = "\x00".join(training)
    questions = [normalize(r["question"]) for r in lines(JGLUE_DIR / "jcommonsenseqa-valid.json")]
    sentences = {normalize(r[key]) for name in ("jnli-valid.json", "jsts-valid.json")
                 for r in lines(JGLUE_DIR / name) for key in ("sentence1", "sentence2")}
    assert not [q for q in questions if len(q) >= 13 and q in corpus]
    assert not [s for s in sentences if len(s) >= 13 and s in corpus]
    items = set()
    for record in lines(built / "sft.jsonl"):
        if record["source"] == "jcommonsenseqa-train":
            question, choices = record["messages"][0]["content"].split("質問：")[1].split("\n選択肢：")
            items.add((normalize(question), frozenset(choices.split("、"))))
    valid = [(normalize(r["question"]), frozenset(r[f"choice{i}"] for i in range(5)))
             for r in lines(JGLUE_DIR / "jcommonsenseqa-valid.json")]
    assert not [item for item in valid if item in items]
    against = [str(JGLUE_DIR / name) for name in VALID_FILES]
    assert hataori_main(["corpus", "decontaminate", str(built / "sft.jsonl"), str(built / "preference.jsonl"),
                         "--against", *against]) == 0
    dropped = json.loads((built / "manifest.json").read_text(encoding="utf-8"))["sft"]["dropped_overlapping"]
    assert dropped["jcommonsenseqa-valid.json"] > 0 and dropped["jnli-valid.json"] > 0


def test_rerun_is_a_no_op_and_other_files_are_not_replaced(built, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in built.iterdir() if p.is_file()}
    assert hataori_main(["corpus", "jglue-sft", str(built)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in built.iterdir() if p.is_file()} == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes", encoding="utf-8")
    assert hataori_main(["corpus", "jglue-sft", str(mine), "--replace"]) == 2
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "my notes"


def test_ngram_overlap_normalises_and_ignores_short_strings(tmp_path, capsys):
    """Full-width and half-width forms, case, spaces and punctuation do not hide a copied sentence; a
    shared short word is not an overlap; an evaluation file may be one JSON document; bad lines are named."""
    assert normalize("ＡＢＣ　ｄｅｆ、１２３！ｱｲｳ") == "abcdef123アイウ"
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps({"data": [{"qas": [{"question": "東京タワーの高さは何メートルですか。",
                                                         "answers": [{"text": "333"}]}]}]}, ensure_ascii=False),
                         encoding="utf-8")
    index = EvalIndex.build([eval_file])
    records = [("copied", {"prompt": "問：東京タワーの高さは、何メートルですか？"}),
               ("width", {"messages": [{"role": "user", "content": "東京ﾀﾜｰの高さは何ﾒｰﾄﾙですか"}]}),
               ("short", {"prompt": "333メートル", "completion": "東京タワー"}),
               ("other", {"prompt": "富士山の高さは何メートルですか。"})]
    assert set(find_overlaps(records, index)) == {"copied", "width"}
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r, ensure_ascii=False) for _, r in records) + "\n", encoding="utf-8")
    assert hataori_main(["corpus", "decontaminate", str(train), "--against", str(eval_file)]) == 1
    assert "2 overlap" in capsys.readouterr().out
    train.write_text('{"prompt": "x"}\n{broken\n', encoding="utf-8")
    assert hataori_main(["corpus", "decontaminate", str(train), "--against", str(eval_file)]) == 2
    assert "train.jsonl:2: malformed JSON" in capsys.readouterr().err
