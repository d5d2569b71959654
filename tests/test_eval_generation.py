"""Generation tasks of `hataori eval` (hataori/eval/generation.py, answers.py): the answer metrics against
hand-worked cases and numpy, JSQuAD's reader, JSTS's correlations, answers equal to the generator's for each
prompt alone whatever the batch size, chat prompts, seeded shots, the results file, and bad templates and
options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import REPO, tiny_config

from hataori.cli import main as hataori_main
from hataori.errors import ConfigError, InputError
from hataori.eval.answers import char_f1, exact_match, first_line, normalize, parse_number, pearson, ranks, spearman
from hataori.eval.generate import Sampling, generate
from hataori.eval.runner import EvalTaskConfig, prepare_task, run_task
from hataori.eval.tasks import TASKS, read_examples
from hataori.eval.templates import TemplateConfig


# ----------------------------------------------------------------------------- metrics, by hand


@pytest.mark.parametrize("text, normalized", [
    ("ＡＢＣ１２３", "ABC123"),          # full-width Latin and digits
    ("ｶﾀｶﾅ", "カタカナ"),                # half-width katakana
    ("「東京」です。", "東京です"),       # Japanese brackets and full stop
    (" 東 京 \n", "東京"),               # whitespace anywhere
    ("A・B、C!?", "ABC"),                # middle dot, comma, ASCII punctuation
    ("１９４５年", "1945年"),
])
def test_normalize(text, normalized):
    assert normalize(text) == normalized


@pytest.mark.parametrize("answer, golds, em, f1", [
    ("東京", ["東京"], 1.0, 1.0),
    ("「東京」。", ["東京"], 1.0, 1.0),
    ("東京都", ["東京"], 0.0, 0.8),                 # P 2/3, R 1: 2 * (2/3) / (5/3)
    ("京都", ["東京"], 0.0, 0.5),                   # one shared character: P 1/2, R 1/2
    ("大阪", ["東京"], 0.0, 0.0),
    ("小笠原", ["小笠原諸島を除く日本", "小笠原諸島"], 0.0, 0.75),  # the better gold: P 1, R 3/5
    ("ＡＢ", ["ab", "AB"], 1.0, 1.0),              # case is kept: the second gold matches
    ("ああい", ["あいい"], 0.0, 2 / 3),              # characters as multisets: あ and い shared once each
    ("", ["東京"], 0.0, 0.0),
])
def test_exact_match_and_char_f1(answer, golds, em, f1):
    assert exact_match(answer, golds) == em
    assert char_f1(answer, golds) == pytest.approx(f1)


def test_first_line_cuts_at_the_first_stop():
    assert first_line(" 東京 \n大阪", ["\n"]) == "東京"
    assert first_line("東京。次は", ["\n", "。"]) == "東京"
    assert first_line("東京", ["\n"]) == "東京"


@pytest.mark.parametrize("text, number", [("3.5", 3.5), ("３．５", 3.5), ("類似度は4です", 4.0), ("5点", 5.0),
                                          ("なし", None), ("", None), ("-1", -1.0)])
def test_parse_number(text, number):
    assert parse_number(text) == number


def test_correlations_against_numpy_and_hand_worked_ranks():
    """Pearson's against numpy's corrcoef; ranks with ties by hand; Spearman's as Pearson's of those ranks (a
    hand-worked case: one swapped pair of four gives 1 - 6 * 2 / (4 * 15) = 0.8)."""
    import numpy as np

    xs, ys = [0.5, 2.0, 3.5, 1.0, 4.8, 2.2], [1.0, 1.8, 4.0, 0.2, 5.0, 3.0]
    assert pearson(xs, ys) == pytest.approx(float(np.corrcoef(xs, ys)[0, 1]), rel=1e-12)
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman(xs, ys) == pytest.approx(float(np.corrcoef(ranks(xs), ranks(ys))[0, 1]), rel=1e-12)
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) is None and spearman([1.0, 2.0], [3.0, 3.0]) is None


# ----------------------------------------------------------------------------- JSQuAD's file


def test_jsquad_reader_takes_every_answerable_question(tmp_path):
    spec = TASKS["jsquad"]
    tree = json.loads(spec.data.read_text(encoding="utf-8"))
    questions = [(p["context"], qa) for a in tree["data"] for p in a["paragraphs"] for qa in p["qas"]]
    examples = read_examples(spec, spec.data)
    assert len(examples) == sum(not qa.get("is_impossible") for _, qa in questions) == 4442
    for example, (context, qa) in zip(examples, questions):
        assert example.fields["context"] == context and example.fields["question"] == qa["question"]
        assert list(example.answers) == list(dict.fromkeys(a["text"] for a in qa["answers"]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "文", "qas": [{"question": "何？"}]}]}]}))
    with pytest.raises(InputError, match=r"bad.json: data\[0\].paragraphs\[0\].qas\[0\]: needs a 'question'"):
        read_examples(spec, bad)
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="bad.json: expected a JSON object with a 'data' list"):
        read_examples(spec, bad)


# ----------------------------------------------------------------------------- on a model


@pytest.fixture(scope="module")
def tokenizer(jcqa_tokenizer):
    from hataori.tokenizer.model import Tokenizer

    return Tokenizer(jcqa_tokenizer)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=512, init_std=0.2).build().eval()


@pytest.mark.parametrize("task, shots", [("jsquad", 0), ("jcommonsenseqa-gen", 2), ("jnli-gen", 0)])
def test_answers_are_the_generators_whatever_the_batch_size(model, tokenizer, task, shots):
    """Each example's output is what greedy generation gives its prompt alone; batch sizes 1 and 5 give the
    same results; the scores are the examples' mean metrics of the answer cut at the first stop string."""
    results = [run_task(model, tokenizer, task, shots=shots, limit=7, batch_size=b) for b in (1, 5)]
    for key in ("scores", "counts"):
        assert results[0][key] == results[1][key]
    assert [e["output"] for e in results[0]["examples"]] == [e["output"] for e in results[1]["examples"]]
    prepared = prepare_task(tokenizer, task, shots=shots, limit=7)
    stop = prepared.prepared.stop
    for example, ids in zip(results[1]["examples"], prepared.prepared.ids):
        alone = generate(model, ids, max_new_tokens=prepared.prepared.max_new_tokens, eos_id=tokenizer.eos_id,
                         sampling=Sampling(greedy=True))
        text = tokenizer.decode([t for t in alone if t != tokenizer.eos_id])
        assert text.startswith(example["output"])  # the batch stopped at a stop string; alone it went on
        assert example["answer"] == first_line(text, stop)
        assert example["exact_match"] == exact_match(example["answer"], example["golds"])
        assert example["char_f1"] == char_f1(example["answer"], example["golds"])
    n = len(results[0]["examples"])
    assert results[0]["scores"]["char_f1"] == pytest.approx(sum(e["char_f1"] for e in results[0]["examples"]) / n)


def test_jsts_reads_each_answers_number_and_correlates(model, tokenizer):
    """JSTS: the gold similarity of every example, each answer's first number (or none, counted invalid and
    scored as 0), and the correlations of those against the gold values."""
    results = run_task(model, tokenizer, "jsts", shots=1, limit=12, batch_size=4)
    details = results["examples"]
    spec = TASKS["jsts"]
    gold = [e.answers[0] for e in read_examples(spec, spec.data)[:12]]
    assert [d["golds"][0] for d in details] == gold
    assert all(d["prediction"] == parse_number(d["answer"]) for d in details)
    predicted = [d["prediction"] if d["prediction"] is not None else 0.0 for d in details]
    assert results["counts"]["invalid"] == sum(d["prediction"] is None for d in details)
    assert results["scores"] == {"pearson": pearson(predicted, [float(g) for g in gold]),
                                 "spearman": spearman(predicted, [float(g) for g in gold])}
    assert "類似度：" in details[0]["prompt"] and details[0]["prompt"].count("類似度：") == 2  # a shot, then it


def test_gold_answers_and_seeded_shots(tokenizer):
    """JCommonsenseQA's gold is the right choice's text, JNLI's the label as the template writes it; shots carry
    their gold answer after their prompt and repeat with the seed."""
    jcqa = prepare_task(tokenizer, "jcommonsenseqa-gen", shots=2, seed=3, limit=4).prepared
    first = read_examples(TASKS["jcommonsenseqa-gen"], TASKS["jcommonsenseqa-gen"].data)[0]
    assert jcqa.golds[0] == [first.choices[first.label]]
    again = prepare_task(tokenizer, "jcommonsenseqa-gen", shots=2, seed=3, limit=4).prepared
    other = prepare_task(tokenizer, "jcommonsenseqa-gen", shots=2, seed=4, limit=4).prepared
    assert jcqa.prompts == again.prompts and jcqa.prompts != other.prompts
    assert jcqa.prompts[0].count("答え：") == 3  # two shots answered, then the example's own
    jnli = prepare_task(tokenizer, "jnli-gen", limit=30).prepared
    assert {g for golds in jnli.golds for g in golds} <= {"含意", "矛盾", "中立"}


def test_the_results_file_keeps_every_example(model, tokenizer, tmp_path, capsys):
    from hataori.checkpoint.record import record_run
    from hataori.checkpoint.verify import adopt
    from hataori.config import to_dict

    run = record_run(tmp_path / "run", {"model": to_dict(model.config), "tokenizer": str(tokenizer.path.parent)})
    checkpoint = run / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "step": 1, "world_size": 1}, checkpoint / "mp_rank_00_model_states.pt")
    adopt(checkpoint)
    out = tmp_path / "jsquad.json"
    assert hataori_main(["eval", str(run), "--task", "jsquad", "--limit", "3", "--output", str(out)]) == 0
    assert capsys.readouterr().out.startswith("jsquad (jsquad-v1, 0-shot, seed 0): exact_match ")
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["counts"]["examples"] == 3 and results["template"] == "jsquad-v1"
    for example in results["examples"]:
        assert {"prompt", "output", "answer", "golds", "exact_match", "char_f1"} <= set(example)
        assert example["prompt"].startswith("文章を読んで")
    assert hataori_main(["eval", str(run), "--task", "jsquad", "--limit", "3", "--chat"]) == 2
    assert "--chat: " in capsys.readouterr().err  # a run not fine-tuned on conversations has no template


def test_chat_prompts_are_a_user_turn_and_answers_end_at_the_end_of_turn(chat_tokenizer):
    """With a chat template each prompt is one user turn rendered by it with the assistant's opening, and each
    answer is what generation alone gives that prompt, stopping at <|im_end|> (never part of the answer)."""
    from hataori.tokenizer.chat import ChatTemplate
    from hataori.tokenizer.model import Tokenizer

    tokenizer = Tokenizer(chat_tokenizer)
    chat = ChatTemplate.load(REPO / "configs/chat/ja-chatml.jinja")
    torch.manual_seed(0)
    model = tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=512, init_std=0.2).build().eval()
    prepared = prepare_task(tokenizer, "jcommonsenseqa-gen", limit=5, chat=chat).prepared
    end = tokenizer.sp.piece_to_id("<|im_end|>")
    assert prepared.stop_ids == (end,)
    for text, ids in zip(prepared.prompts, prepared.ids):
        assert ids == chat.encode([{"role": "user", "content": text}], tokenizer, add_generation_prompt=True).ids
    results = run_task(model, tokenizer, "jcommonsenseqa-gen", limit=5, batch_size=2, chat=chat)
    assert results["chat_template"]["sha256"] == chat.sha256
    for example, ids in zip(results["examples"], prepared.ids):
        alone = generate(model, ids, max_new_tokens=prepared.max_new_tokens, eos_id=tokenizer.eos_id,
                         sampling=Sampling(greedy=True), stop_ids=(end,))
        text = tokenizer.decode([t for t in alone if t not in (end, tokenizer.eos_id)])
        assert text.startswith(example["output"]) and "<|im_end|>" not in example["output"]
    with pytest.raises(ConfigError, match="--chat: renders a generation task's prompt as a user turn; jcommonsenseqa"):
        run_task(model, tokenizer, "jcommonsenseqa", limit=2, chat=chat)


def test_bad_templates_and_options(tmp_path):
    with pytest.raises(ConfigError, match=r"placeholder \{passage\} is not one of \{title\}, \{context\}"):
        TemplateConfig(task="jsquad", prompt="{passage}")
    with pytest.raises(ConfigError, match="max_new_tokens: must be >= 1, got 0"):
        TemplateConfig(task="jsquad", prompt="{context}", max_new_tokens=0)
    with pytest.raises(ConfigError, match="stop: must be a list of non-empty strings"):
        TemplateConfig(task="jsquad", prompt="{context}", stop=[""])
    assert EvalTaskConfig(task="jsquad", limit=4).label == "jsquad"  # validation runs generation tasks too
    assert Path(TASKS["jsquad"].data).is_file()
