"""``hataori eval``: multiple-choice log-likelihoods against transformers' LlamaForCausalLM on the same
weights, the token boundary rule where the tokenizer merges prompt and choice, batches against single
sequences, seeded shots, bits per character against documents scored one window at a time, and the
message of each bad input.

A run folder is made in-process (a ZeRO-0 checkpoint file with a manifest) and exported with
``hataori export hf``; the tokenizer is trained by ``hataori tokenizer train`` on the bundled
JCommonsenseQA train questions and choices.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from capabilities import needs
from helpers import tiny_config

from hataori.cli import main as hataori_main
from hataori.errors import ConfigError, InputError
from hataori.eval.tasks import JGLUE, TASKS, read_examples

SEQ_LEN = 256


@pytest.fixture(scope="module")
def tokenizer_dir(jcqa_tokenizer) -> Path:
    return jcqa_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from hataori.tokenizer.model import Tokenizer

    return Tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    # GQA 4:2, a head width other than d_model / n_heads, vocabulary padded past the tokenizer's
    return tiny_config(vocab_size=tokenizer.vocab_size, head_dim=24, max_seq_len=SEQ_LEN, init_std=0.2).build().eval()


@pytest.fixture(scope="module")
def folders(model, tokenizer_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(run folder with one ZeRO-0 checkpoint of ``model``, its `hataori export hf` folder in fp32)."""
    from hataori.checkpoint.record import record_run
    from hataori.checkpoint.verify import adopt
    from hataori.config import to_dict

    root = tmp_path_factory.mktemp("models")
    run = record_run(root / "run", {"model": to_dict(model.config), "tokenizer": str(tokenizer_dir)})
    checkpoint = run / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "step": 1, "world_size": 1}, checkpoint / "mp_rank_00_model_states.pt")
    adopt(checkpoint)
    assert hataori_main(["export", "hf", str(run), "--output", str(root / "hf"), "--dtype", "fp32"]) == 0
    return run, root / "hf"


def reference_loglikelihood(hf_model, tokenizer, prompt: str, choice: str) -> float:
    """Sum of log_softmax of the tokens after the longest common prefix of encode(prompt) and
    encode(prompt + choice), one sequence (EOS first) through transformers' Llama."""
    context, whole = tokenizer.encode([prompt])[0], tokenizer.encode([prompt + choice])[0]
    cut = next((i for i, (a, b) in enumerate(zip(context, whole)) if a != b), min(len(context), len(whole)))
    ids = torch.tensor([[tokenizer.eos_id] + whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(ids).logits[0].double(), dim=-1)  # (T, V)
    return sum(logprobs[j, whole[j]].item() for j in range(cut, len(whole)))


@pytest.fixture(scope="module")
def hf_model(folders):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folders[1], local_files_only=True, torch_dtype=torch.float32,
                                            attn_implementation="eager").eval()


# ----------------------------------------------------------------------------- against transformers


def test_choice_loglikelihoods_match_transformers(folders, hf_model, tokenizer, tmp_path, capsys):
    """`hataori eval` on the run folder and on its export: each choice's log-likelihood equals the
    Hugging Face model's, one example at a time, and the scores follow from them."""
    run, hf_folder = folders
    results = {}
    for name, path in (("run", run), ("hf", hf_folder)):
        out = tmp_path / f"{name}.json"
        assert hataori_main(["eval", str(path), "--task", "jcommonsenseqa", "--shots", "1", "--limit", "5",
                             "--batch-size", "3", "--output", str(out), "--device", "cpu"]) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith("jcommonsenseqa (jcommonsenseqa-v1, 1-shot, seed 0): acc ") and "examples/s" in line
        results[name] = json.loads(out.read_text(encoding="utf-8"))
    # An existing results file is not replaced unless asked.
    written = out.read_bytes()
    assert hataori_main(["eval", str(hf_folder), "--task", "jcommonsenseqa", "--limit", "2", "--output", str(out),
                         "--device", "cpu"]) == 2
    assert f"{out}: holds an eval results file (hataori eval --output); pass --replace" in capsys.readouterr().err
    assert out.read_bytes() == written
    # A folder, a file that is not a results file, and the model itself: refused before any scoring.
    for target, message in ((tmp_path, "is a folder; --output names a file to write"),
                            (hf_folder, f"is {hf_folder}, an input of this command"),
                            (hf_folder / "config.json", "holds a file that no hataori command wrote, not an eval"),
                            (tmp_path / "notes.json", "holds a file that no hataori command wrote, not an eval")):
        if target.name == "notes.json":
            target.write_text("[]")
        assert hataori_main(["eval", str(hf_folder), "--task", "jcommonsenseqa", "--limit", "2", "--output",
                             str(target), "--device", "cpu", "--replace"]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "notes.json").read_text() == "[]"
    assert hataori_main(["eval", str(hf_folder), "--task", "jcommonsenseqa", "--limit", "2", "--output", str(out),
                         "--device", "cpu", "--replace"]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["counts"]["examples"] == 2
    capsys.readouterr()

    ours = results["run"]
    assert (ours["counts"]["examples"], ours["counts"]["requests"], ours["counts"]["truncated"]) == (5, 25, 0)
    assert (ours["task"], ours["template"], ours["shots"], ours["seed"]) == ("jcommonsenseqa", "jcommonsenseqa-v1",
                                                                             1, 0)
    assert ours["model"]["kind"] == "run" and results["hf"]["model"]["kind"] == "hf"
    assert ours["model"]["tokenizer"] == results["hf"]["model"]["tokenizer"] == tokenizer.fingerprint
    assert len(ours["model"]["fingerprint"]) == 16 != results["hf"]["model"]["fingerprint"]
    for example, exported in zip(ours["examples"], results["hf"]["examples"]):
        expected = [reference_loglikelihood(hf_model, tokenizer, example["prompt"], choice)
                    for choice in example["choices"]]
        torch.testing.assert_close(torch.tensor(example["loglikelihoods"], dtype=torch.float64),
                                   torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(exported["loglikelihoods"], dtype=torch.float64),
                                   torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
        assert example["prediction"] == max(range(5), key=lambda c: example["loglikelihoods"][c])
        assert example["chars"] == [len(choice) for choice in example["choices"]]
    labels = [example["label"] for example in ours["examples"]]
    assert ours["scores"]["acc"] == sum(e["prediction"] == y for e, y in zip(ours["examples"], labels)) / 5
    assert ours["scores"]["acc_norm"] == sum(e["prediction_norm"] == y for e, y in zip(ours["examples"], labels)) / 5


@needs("bf16")
def test_bf16_eval_scores_the_model_in_bf16(folders, hf_model, tokenizer, tmp_path, capsys):
    """``--dtype bf16`` runs the model in bf16 and records the dtype: its log-likelihoods are off the fp32
    reference (transformers in fp32) by at most twice as much as transformers' own in bf16."""
    run, hf_folder = folders
    found = {}
    for name, path in (("run", run), ("hf", hf_folder)):
        out = tmp_path / f"{name}.json"
        assert hataori_main(["eval", str(path), "--task", "jcommonsenseqa", "--limit", "5", "--output", str(out),
                             "--device", "cpu", "--dtype", "bf16"]) == 0
        found[name] = json.loads(out.read_text(encoding="utf-8"))
    capsys.readouterr()
    assert found["run"]["model"]["dtype"] == found["hf"]["model"]["dtype"] == "bf16"
    from transformers import LlamaForCausalLM

    hf_bf16 = LlamaForCausalLM.from_pretrained(hf_folder, local_files_only=True, torch_dtype=torch.bfloat16,
                                               attn_implementation="eager").eval()
    ours, theirs = [], []
    for example, exported in zip(found["run"]["examples"], found["hf"]["examples"]):
        assert example["loglikelihoods"] == exported["loglikelihoods"]  # the same bf16 weights either way
        for choice, got in zip(example["choices"], example["loglikelihoods"]):
            exact = reference_loglikelihood(hf_model, tokenizer, example["prompt"], choice)
            ours.append(abs(got - exact))
            theirs.append(abs(reference_loglikelihood(hf_bf16, tokenizer, example["prompt"], choice) - exact))
    assert 1e-4 < max(ours) <= 2 * max(theirs), (max(ours), max(theirs))  # bf16, and no worse than bf16 is


def test_token_boundary_where_prompt_and_choice_merge(model, hf_model, tokenizer):
    """A prompt/choice pair whose tokens merge across the boundary: the scored tokens are those after the
    longest common prefix, they cover the choice, and their log-likelihood is transformers'."""
    from hataori.eval.choice import build_requests, loglikelihoods

    def merged(prompt: str, choice: str) -> bool:
        context, whole = tokenizer.encode([prompt, prompt + choice])
        return whole[:len(context)] != context

    questions = [e.fields["question"]
                 for e in read_examples(TASKS["jcommonsenseqa"], JGLUE / "jcommonsenseqa-valid.json")]
    prompt, choice = next((q[:i], q[i:]) for q in questions[:50] for i in range(1, len(q) - 1) if merged(q[:i], q[i:]))
    context, whole = tokenizer.encode([prompt, prompt + choice])
    (request,) = build_requests(tokenizer, [(prompt, choice)])
    assert request.context[0] == tokenizer.eos_id and list(request.context[1:] + request.target) == whole
    assert len(request.context) - 1 < len(context), "the prompt's last tokens should have merged with the choice"
    covered = tokenizer.decode(list(request.target))
    assert covered.endswith(choice) and len(covered) > len(choice) and prompt.startswith(
        tokenizer.decode(list(request.context[1:])))
    (score,), _ = loglikelihoods(model, [request], batch_size=1, pad_id=tokenizer.eos_id)
    assert score == pytest.approx(reference_loglikelihood(hf_model, tokenizer, prompt, choice), rel=1e-5, abs=1e-5)


# ----------------------------------------------------------------------------- batches and shots


@pytest.mark.parametrize("task, shots", [("jcommonsenseqa", 2), ("jnli", 0)])
def test_batch_size_does_not_change_scores(model, tokenizer, task, shots):
    from hataori.eval.runner import run_task

    single, batched = (run_task(model, tokenizer, task, shots=shots, limit=7, batch_size=size) for size in (1, 4))
    assert [e["prompt"] for e in single["examples"]] == [e["prompt"] for e in batched["examples"]]
    for a, b in zip(single["examples"], batched["examples"]):
        torch.testing.assert_close(torch.tensor(a["loglikelihoods"]), torch.tensor(b["loglikelihoods"]),
                                   rtol=0, atol=1e-5)
    assert single["scores"] == batched["scores"]
    assert single["counts"]["requests"] == 7 * len(TASKS[task].labels or range(5))


def test_shots_are_drawn_by_the_seed(tokenizer):
    from hataori.eval.choice import prompts
    from hataori.eval.templates import load_template

    task = TASKS["jcommonsenseqa"]
    template = load_template(None, task)
    examples = read_examples(task, task.data)[:6]
    train = read_examples(task, task.train)
    first, again, other = (prompts(template, examples, train=train, shots=3, seed=seed) for seed in (1, 1, 2))
    assert first == again and first != other
    assert all(p.count("答え：") == 4 and p.endswith(template.context(e)) for p, e in zip(first, examples))
    # The same examples' prompts do not depend on how many examples are evaluated.
    assert prompts(template, examples[:2], train=train, shots=3, seed=1) == first[:2]
    # Shots drawn from the evaluated file itself never include the example.
    own = prompts(template, examples, train=examples, shots=5, seed=0)
    assert all(p.count(e.fields["question"]) == 1 for p, e in zip(own, examples))


# ----------------------------------------------------------------------------- bits per character


def test_bpc_task_matches_documents_scored_window_by_window(model, tokenizer, tmp_path):
    from hataori.eval.runner import run_task

    questions = [e.fields["question"]
                 for e in read_examples(TASKS["jcommonsenseqa"], JGLUE / "jcommonsenseqa-valid.json")]
    texts = ["".join(questions[:40])] + questions[40:45]  # the first is longer than a window
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    result = run_task(model, tokenizer, "bpc", data=corpus, batch_size=2)

    nll, tokens, chars = 0.0, 0, 0
    with torch.no_grad():
        for ids in tokenizer.encode(texts):
            ids = torch.tensor(ids + [tokenizer.eos_id])
            inputs = torch.cat([torch.tensor([tokenizer.eos_id]), ids[:-1]])
            for start in range(0, len(ids), SEQ_LEN):
                logits = model(inputs[None, start:start + SEQ_LEN])[0]
                nll += F.cross_entropy(logits, ids[start:start + SEQ_LEN], reduction="sum").item()
            tokens += len(ids)
            chars += len(tokenizer.decode(ids[:-1].tolist()))
    assert tokens > 2 * SEQ_LEN
    assert result["counts"] == {"examples": 6, "documents": 6, "tokens": tokens, "chars": chars}
    assert result["scores"]["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["scores"]["bpc"] == pytest.approx(nll / math.log(2) / chars, rel=1e-5)

    text = tmp_path / "corpus.txt"  # plain text: a document a paragraph
    text.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    assert run_task(model, tokenizer, "bpc", data=text, limit=3)["counts"]["documents"] == 3


# ----------------------------------------------------------------------------- bad input


def test_unknown_task_lists_the_known_ones(tmp_path, capsys):
    assert hataori_main(["eval", str(tmp_path), "--task", "jemhopqa"]) == 2
    assert "--task: unknown task 'jemhopqa'; known tasks: jcommonsenseqa (" in capsys.readouterr().err


GOOD = {"q_id": 0, "question": "どれ？", "choice0": "あ", "choice1": "い", "choice2": "う", "choice3": "え",
        "choice4": "お", "label": 2}


@pytest.mark.parametrize("lines, message", [
    ([GOOD, "{not json"], ":2: malformed JSON (Expecting property name enclosed in double quotes at column 2)"),
    ([{k: v for k, v in GOOD.items() if k != "choice4"}], ":1: no 'choice4' field; a jcommonsenseqa example has"),
    ([{**GOOD, "label": 5}], ":1: label is 5; JCommonsenseQA labels are the integers 0-4"),
    ([GOOD, {**GOOD, "question": 3}], ":2: field 'question' is int, not a string"),
    (["[1, 2]"], ":1: expected a JSON object, got list"),
    ([], ": holds no jcommonsenseqa examples"),
], ids=["bad-json", "missing-key", "label-out-of-range", "not-a-string", "not-an-object", "empty"])
def test_malformed_task_file_names_file_and_line(model, tokenizer, tmp_path, lines, message):
    from hataori.eval.runner import run_task

    path = tmp_path / "task.json"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    with pytest.raises(InputError) as err:
        run_task(model, tokenizer, "jcommonsenseqa", data=path)
    assert str(err.value).startswith(f"{path}{message}")


def test_jnli_label_out_of_range(model, tokenizer, tmp_path):
    from hataori.eval.runner import run_task

    path = tmp_path / "jnli.json"
    path.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": "maybe"}) + "\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        run_task(model, tokenizer, "jnli", data=path)
    assert str(err.value) == f"{path}:1: label is 'maybe'; JNLI labels are entailment, contradiction, neutral"


def test_option_errors(model, tokenizer, tmp_path):
    from hataori.eval.runner import run_task

    def error(**options) -> str:
        task = options.pop("task", "jcommonsenseqa")
        with pytest.raises(ConfigError) as err:
            run_task(model, tokenizer, task, **options)
        return str(err.value)

    assert error(template="nope") == ("--template: unknown template 'nope'; "
                                      "templates for jcommonsenseqa: jcommonsenseqa-v1")
    assert error(template="jnli-v1").endswith("jnli-v1.yaml formats jnli examples, not jcommonsenseqa")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: jcommonsenseqa\nprompt: '{quesiton}'\n", encoding="utf-8")
    assert error(template=str(bad)) == (f"prompt: {bad}: placeholder {{quesiton}} is not one of {{question}}, "
                                        "{choice0}, {choice1}, {choice2}, {choice3}, {choice4}")
    small = tmp_path / "train.json"
    small.write_text("".join(json.dumps({**GOOD, "q_id": i}) + "\n" for i in range(2)), encoding="utf-8")
    assert error(shots=3, train=small) == f"--shots: 3 shots is more than the 2 examples of {small}"
    assert error(task="jnli", shots=1).startswith("--shots: jnli has no bundled train file to draw shots from")
    assert error(task="bpc").startswith("--data: the bpc task scores a corpus file")
    assert error(task="bpc", data=small, shots=2) == "--shots: the bpc task scores whole documents; it takes no shots"
    assert error(shots=-1) == "--shots: must be >= 0, got -1"
    assert error(batch_size=0) == "--batch-size: must be >= 1, got 0"
