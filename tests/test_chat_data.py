"""Conversations through `hataori data prepare --chat-template` (hataori/data/chat.py, the masked shards of
hataori/data/shards.py): every prepared conversation against transformers' apply_chat_template, the
overlong rules, bad records named, and the data config choosing the conversation loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, jcqa_conversations

from hataori.cli import main as hataori_main
from hataori.data.loader import DataConfig, DatasetSpec
from hataori.data.shards import MASKED_VERSION, Dataset, Shard, ShardError, mask_path
from hataori.data.examples import ExampleLoader
from hataori.errors import ConfigError, HataoriError
from hataori.tokenizer.hf import TOKENIZER_CONFIG, write_hf_tokenizer
from hataori.tokenizer.model import Tokenizer

PRESET = REPO / "configs" / "chat" / "ja-chatml.jinja"


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return path


def prepare(inputs: Path, tokenizer: Path, out: Path, *items: str) -> int:
    return hataori_main(["data", "prepare", "--input", str(inputs), "--tokenizer", str(tokenizer), "--chat-template",
                         str(PRESET), "--output", str(out), "progress=false", *items])


def documents(folder: Path) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(ids, mask) of every document of both splits."""
    out = []
    for split in ("train", "val"):
        data = Dataset(folder, split)
        out += [(tuple(data.doc(i).tolist()), tuple(data.doc_mask(i).tolist())) for i in range(len(data))]
    return out


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """300 JCommonsenseQA conversations, a third of them as prompt/completion records."""
    records = []
    for i, messages in enumerate(jcqa_conversations(300, seed=3)):
        if i % 3 == 0 and len(messages) == 2:
            records.append({"prompt": messages[0]["content"], "completion": messages[1]["content"]})
        else:
            records.append({"messages": messages})
    return write_jsonl(tmp_path_factory.mktemp("conversations") / "chat.jsonl", records)


def test_prepared_conversations_equal_apply_chat_template(records, chat_tokenizer, tmp_path, capsys):
    """Every document of the dataset is a conversation's ids from transformers' apply_chat_template with the
    exported tokenizer, then EOS, and its mask the assistant mask, then 0; two workers write the same bytes;
    the manifest counts the loss tokens and records the template."""
    from transformers import AutoTokenizer

    tokenizer = Tokenizer(chat_tokenizer)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    write_hf_tokenizer(tokenizer, hf_dir, model_max_length=4096)
    config = json.loads((hf_dir / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    config["chat_template"] = PRESET.read_text(encoding="utf-8")
    (hf_dir / TOKENIZER_CONFIG).write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    hf = AutoTokenizer.from_pretrained(hf_dir)
    expected = []
    for line in records.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]},
                                              {"role": "assistant", "content": record["completion"]}]
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        expected.append((tuple(out["input_ids"] + [tokenizer.eos_id]), tuple(out["assistant_masks"] + [0])))

    assert prepare(records, chat_tokenizer, tmp_path / "one", "val_docs=20") == 0
    assert "train conversations: 280 kept" in capsys.readouterr().out
    got = documents(tmp_path / "one")
    assert sorted(got) == sorted(expected)
    manifest = json.loads((tmp_path / "one" / "dataset.json").read_text(encoding="utf-8"))
    assert manifest["format_version"] == MASKED_VERSION
    chat = manifest["chat"]
    assert chat["template"]["source"] == PRESET.read_text(encoding="utf-8") and chat["overlong"] == "drop"
    loss = sum(sum(mask) for _, mask in got)
    assert chat["splits"]["train"]["loss_tokens"] + chat["splits"]["val"]["loss_tokens"] == loss
    assert manifest["splits"]["train"]["loss_tokens"] == chat["splits"]["train"]["loss_tokens"]
    assert chat["splits"]["train"]["longest"] == max(len(ids) for ids, _ in got[:280])

    assert prepare(records, chat_tokenizer, tmp_path / "two", "val_docs=20", "workers=2") == 0
    for name in sorted(p.name for p in (tmp_path / "one").glob("*-0000*")):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert prepare(records, chat_tokenizer, tmp_path / "one", "val_docs=20") == 0  # the same again: nothing to do
    assert "nothing to do" in capsys.readouterr().err

    assert hataori_main(["data", "inspect", str(tmp_path / "one"), "--tokenizer", str(chat_tokenizer),
                         "--show", "1"]) == 0
    shown = capsys.readouterr().out
    assert "format version 2" in shown and "loss tokens (" in shown and "its loss tokens, run by run" in shown


@pytest.mark.parametrize("rule, kept, truncated, dropped", [("drop", 2, 0, 1), ("truncate", 3, 1, 0)])
def test_overlong_rules(rule, kept, truncated, dropped, chat_tokenizer, tmp_path, capsys):
    """A conversation over max_tokens is dropped and counted, or truncated to max_tokens (EOS last), or refused
    naming its line; one whose truncation leaves no loss token is dropped as such."""
    tokenizer = Tokenizer(chat_tokenizer)
    short = [{"role": "user", "content": "質問"}, {"role": "assistant", "content": "答え"}]
    long_answer = [{"role": "user", "content": "質問"}, {"role": "assistant", "content": "とても長い答え。" * 40}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": short}, {"messages": long_answer},
                                              {"messages": short + short}])
    assert prepare(path, chat_tokenizer, tmp_path / rule, "val_fraction=0", "max_tokens=120", f"overlong={rule}") == 0
    manifest = json.loads((tmp_path / rule / "dataset.json").read_text(encoding="utf-8"))
    counts = manifest["chat"]["splits"]["train"]
    assert (counts["examples"], counts["truncated"], counts["dropped_overlong"]) == (kept, truncated, dropped)
    data = Dataset(tmp_path / rule, "train")
    lengths = [len(data.doc(i)) for i in range(len(data))]
    assert max(lengths) <= 120 and all(data.doc(i)[-1] == tokenizer.eos_id for i in range(len(data)))
    if rule == "truncate":
        assert 120 in lengths and data.doc_mask(lengths.index(120))[-1] == 0
    else:
        assert "c.jsonl:2" in counts["dropped_examples"][0]

    assert prepare(path, chat_tokenizer, tmp_path / "refuse", "max_tokens=120", "overlong=refuse") == 2
    assert not (tmp_path / "refuse").exists()
    assert "c.jsonl:2: " in capsys.readouterr().err  # refused, naming the record
    # cut to 20 tokens no conversation keeps an assistant token: all are dropped, and no dataset is left
    assert prepare(path, chat_tokenizer, tmp_path / "cut", "val_fraction=0", "max_tokens=20", "overlong=truncate") == 2
    assert "no documents went to the train split" in capsys.readouterr().err


def test_refusals_name_the_record(chat_tokenizer, tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "質問"}, {"role": "assistant", "content": "答え"}]}
    cases = [
        ('{"messages": [{"role": "user"}]}', "c.jsonl:2: messages[0] has no 'content'"),
        ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
         "c.jsonl:2: messages[0].role is 'robot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "c.jsonl:2: no assistant turn"),
        ({"prompt": "x", "chosen": "a", "rejected": "b"}, "c.jsonl:2: a preference record"),
        ({"text": "plain"}, "c.jsonl:2: neither messages nor prompt and completion (fields: 'text')"),
        ("{not json", "c.jsonl:2: malformed JSON"),
        ({"prompt": 3, "completion": "x"}, "c.jsonl:2: prompt is int"),
    ]
    for record, message in cases:
        path = write_jsonl(tmp_path / "c.jsonl", [good, record, good])
        assert prepare(path, chat_tokenizer, tmp_path / "out") == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    assert prepare(path, chat_tokenizer, tmp_path / "skip", "skip_bad_lines=true", "val_fraction=0") == 0
    manifest = json.loads((tmp_path / "skip" / "dataset.json").read_text(encoding="utf-8"))
    assert manifest["sources"][0]["skipped_lines"] == 1 and manifest["splits"]["train"]["documents"] == 2


def test_a_template_the_tokenizer_lacks_pieces_for_is_refused(jcqa_tokenizer, tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "x", "completion": "y"}])
    assert prepare(path, jcqa_tokenizer, tmp_path / "out") == 2
    assert "--pieces '<|im_end|>,<|im_start|>'" in capsys.readouterr().err


def test_masked_shards_are_checked_and_read_by_the_conversation_loader(records, chat_tokenizer, ja_shards, tmp_path):
    """The data config opens the conversation loader for conversations, refuses a mix with text or a weight
    (conversations are pooled), and a damaged or missing mask is named."""
    out = tmp_path / "ds"
    assert prepare(records, chat_tokenizer, out, "val_docs=10") == 0
    assert isinstance(DataConfig(datasets=[DatasetSpec(path=str(out))], seq_len=512).build(batch_size=2),
                      ExampleLoader)
    with pytest.raises(ConfigError, match=r"data.datasets: mixes conversations .* and text"):
        DataConfig(datasets=[DatasetSpec(path=str(out)), DatasetSpec(path=str(ja_shards))]).build(batch_size=2)
    with pytest.raises(ConfigError, match=r"datasets\[0\].weight: conversation datasets are pooled"):
        DataConfig(datasets=[DatasetSpec(path=str(out), weight=2.0)], seq_len=512).build(batch_size=2)
    with pytest.raises(HataoriError, match=r"its longest conversation has \d+ tokens, more than a row of seq_len=64"):
        DataConfig(datasets=[DatasetSpec(path=str(out))], seq_len=64).build(batch_size=2)
    mask = mask_path(out / "train-00000")
    data = mask.read_bytes()
    assert set(data) == {0, 1} and len(data) == Shard(out / "train-00000").num_tokens
    mask.write_bytes(data[:-1])
    with pytest.raises(ShardError, match=r"train-00000.mask: .* bytes, but its index promises a loss mask"):
        Dataset(out, "train")
    mask.unlink()
    with pytest.raises(ShardError, match="missing"):
        Shard(out / "train-00000")
    assert np.frombuffer(data, np.uint8).sum() > 0


def test_datasets_of_another_template_are_refused_together(records, chat_tokenizer, tmp_path):
    from hataori.data.chat import dataset_template

    other = tmp_path / "other.jinja"
    other.write_text(PRESET.read_text(encoding="utf-8").replace("あなたは", "君は"), encoding="utf-8")
    assert prepare(records, chat_tokenizer, tmp_path / "a", "val_docs=5") == 0
    assert hataori_main(["data", "prepare", "--input", str(records), "--tokenizer", str(chat_tokenizer),
                         "--chat-template", str(other), "--output", str(tmp_path / "b"), "progress=false",
                         "val_docs=5"]) == 0
    a, b = Dataset(tmp_path / "a", "train"), Dataset(tmp_path / "b", "train")
    assert dataset_template([a, a]).source == PRESET.read_text(encoding="utf-8")
    with pytest.raises(HataoriError, match="were prepared with different chat templates"):
        dataset_template([a, b])


def test_preference_pairs_are_two_documents_of_one_split(chat_tokenizer, tmp_path, capsys):
    """Each pair becomes its chosen and its rejected conversation, consecutive documents of the same split,
    each equal to apply_chat_template's ids (then EOS) with the assistant mask; a pair preferring nothing, or a
    conversation given as a pair, is refused naming its line; the data config opens pairs with the pair loader."""
    from transformers import AutoTokenizer

    tokenizer = Tokenizer(chat_tokenizer)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    write_hf_tokenizer(tokenizer, hf_dir, model_max_length=4096, chat_template=PRESET.read_text(encoding="utf-8"))
    hf = AutoTokenizer.from_pretrained(hf_dir)
    pairs = []
    for messages in jcqa_conversations(60, seed=11):
        prompt, answer = messages[:-1], messages[-1]["content"]
        pairs.append({"prompt": prompt if len(prompt) > 1 else prompt[0]["content"], "chosen": answer,
                      "rejected": answer[::-1] + "。"})
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert prepare(path, chat_tokenizer, tmp_path / "pairs", "preference=true", "val_docs=6") == 0
    assert "train preference pairs: 54 kept" in capsys.readouterr().out
    expected = {}
    for pair in pairs:
        prompt = pair["prompt"] if isinstance(pair["prompt"], list) else [{"role": "user", "content": pair["prompt"]}]
        both = []
        for name in ("chosen", "rejected"):
            out = hf.apply_chat_template([*prompt, {"role": "assistant", "content": pair[name]}], tokenize=True,
                                         return_dict=True, return_assistant_tokens_mask=True)
            both.append((tuple(out["input_ids"] + [tokenizer.eos_id]), tuple(out["assistant_masks"] + [0])))
        expected[both[0]] = both[1]
    for split in ("train", "val"):
        data = Dataset(tmp_path / "pairs", split)
        assert len(data) % 2 == 0
        for i in range(0, len(data), 2):
            chosen, rejected = ((tuple(data.doc(j).tolist()), tuple(data.doc_mask(j).tolist())) for j in (i, i + 1))
            assert expected[chosen] == rejected
    from hataori.data.examples import PairLoader

    loader = DataConfig(datasets=[DatasetSpec(path=str(tmp_path / "pairs"))], seq_len=2048).build(batch_size=2)
    assert isinstance(loader, PairLoader)

    same = {"prompt": "x", "chosen": "同じ", "rejected": "同じ"}
    for record, message in [(same, "c.jsonl:2: chosen and rejected are the same"),
                            ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
                             "c.jsonl:2: a preference record needs prompt (or messages), chosen and rejected"),
                            ({"prompt": "x", "chosen": [{"role": "user", "content": "y"}], "rejected": "z"},
                             "c.jsonl:2 (chosen): no assistant turn")]:
        bad = write_jsonl(tmp_path / "c.jsonl", [pairs[0], record])
        assert prepare(bad, chat_tokenizer, tmp_path / "bad", "preference=true") == 2
        assert message in capsys.readouterr().err
