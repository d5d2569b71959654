"""Eval tasks during pretraining (``validation.tasks``): a real ``hataori pretrain`` on two processes
under ZeRO-3 scores JCommonsenseQA at its validations, and the scores of its last step must be
those ``hataori eval`` gives for the final checkpoint on one process; the ranks' share of the
batches against one process scoring them all; config mistakes named.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cpu_env, tiny_config

from hataori.cli import main as hataori_main

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "train" / "toy.yaml"
LAUNCH_TIMEOUT_S = 150
SEQ_LEN = 64

# The toy preset shrunk: 2 processes x 2 sequences of 64 tokens a step, ZeRO-3, validation at 0, 2 and 4.
# jcommonsenseqa at every validation (24 examples: 15 batches of 8, one rank has a batch fewer); a
# 2-shot run of it only where the step is a multiple of 4 (and at step 0).
OVERRIDES = ["model.vocab_size=4000", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
             "model.max_seq_len=128", f"data.seq_len={SEQ_LEN}", "zero.stage=3", "zero.micro_batch_size=2",
             f"zero.global_batch_tokens={2 * 2 * SEQ_LEN}", "schedule.warmup_steps=1", "schedule.min_lr=1e-4",
             "trainer.max_steps=4", "checkpoint.every_steps=4", "validation.every_steps=2",
             "validation.max_tokens=1000", "logging.every_steps=1",
             "validation.tasks=[{task: jcommonsenseqa, limit: 24}, {task: jcommonsenseqa, name: jcqa-2shot, shots: 2, "
             "seed: 3, limit: 5, batch_size: 3, every_steps: 4}]"]


# ----------------------------------------------------------------------------- one process against ranks


class Counted(torch.nn.Module):
    """A model that counts its forward passes."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(input_ids)


def test_ranks_share_the_batches_and_their_sum_is_one_process(ja_tokenizer):
    """7 examples of 5 choices in batches of 4 (9 batches) dealt to 2, 3, 4 and 12 ranks: every rank runs
    as many forward passes as the others, each request is scored on one rank, and the scores summed
    over the ranks are those of one process, bit for bit (the same batches)."""
    from hataori.eval.choice import loglikelihoods
    from hataori.eval.runner import prepare_task
    from hataori.tokenizer.model import Tokenizer

    tokenizer = Tokenizer(ja_tokenizer)
    torch.manual_seed(0)
    model = tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=128, init_std=0.2).build().eval()
    task = prepare_task(tokenizer, "jcommonsenseqa", shots=1, limit=7)
    requests = task.prepared.requests
    one = task.run(model, batch_size=4)
    single, _ = loglikelihoods(model, requests, batch_size=4, pad_id=tokenizer.eos_id)
    assert [ll for example in one["examples"] for ll in example["loglikelihoods"]] == single
    for world_size in (2, 3, 4, 12):
        shares, calls = [], []
        for rank in range(world_size):
            counted = Counted(model)
            scores, _ = loglikelihoods(counted, requests, batch_size=4, pad_id=tokenizer.eos_id, rank=rank,
                                       world_size=world_size, max_len=128, device="cpu")
            shares.append(scores)
            calls.append(counted.calls)
        assert calls == [-(-9 // world_size)] * world_size, world_size
        assert all(sum(share[i] != 0.0 for share in shares) == 1 for i in range(len(requests)))
        assert [sum(column) for column in zip(*shares)] == single


# ----------------------------------------------------------------------------- config mistakes


@pytest.mark.parametrize("tasks, message", [
    ("[{task: jemhopqa}]", "validation.tasks[0].task: unknown task 'jemhopqa'; tasks run during pretraining: "
                           "jcommonsenseqa, jnli, jsquad, jcommonsenseqa-gen, jnli-gen, jsts"),
    ("[{task: bpc}]", "validation.tasks[0].task: bpc is not run during pretraining: every validation already "
                      "scores the validation split in bits per character (val/bpc)"),
    ("[{task: jnli, shots: 1}]", "validation.tasks[0].shots: jnli has no bundled train file to draw shots from; "
                                 "set shots: 0"),
    ("[{task: jnli, limit: -5}]", "validation.tasks[0].limit: must be >= 0, got -5"),
    ("[{task: jnli, template: jcommonsenseqa-v1}]", "validation.tasks[0].template: "
                                                    f"{REPO}/configs/eval/jcommonsenseqa-v1.yaml formats "
                                                    "jcommonsenseqa examples, not jnli"),
    ("[{task: jnli}, {task: jnli, shots: 0}]", "validation.tasks[1].name: 'jnli' is the name of tasks[0] too"),
    ("[{task: jnli, every_steps: 3}]", "validation.tasks[0].every_steps: 3 is not a multiple of "
                                       "validation.every_steps=2"),
], ids=["unknown", "bpc", "shots-without-train-file", "negative-limit", "template-of-another-task", "same-name",
        "every-steps"])
def test_task_config_mistakes_are_named(tmp_path, capsys, tasks, message):
    code = hataori_main(["pretrain", str(TOY), "validation.every_steps=2", f"validation.tasks={tasks}",
                         "--data", str(tmp_path / "none"), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "run").exists()


def test_preparation_errors_name_the_config_key(ja_tokenizer, tmp_path):
    """What only reading the task's files finds (more shots than train examples) names the task's key."""
    from hataori.errors import ConfigError
    from hataori.eval.runner import EvalTaskConfig
    from hataori.tokenizer.model import Tokenizer
    from hataori.train.validate import EvalTasks

    tasks = [EvalTaskConfig(task="jnli"), EvalTaskConfig(task="jcommonsenseqa", shots=9000)]
    with pytest.raises(ConfigError) as err:
        EvalTasks.build(tasks, Tokenizer(ja_tokenizer), max_len=128, run_dir=tmp_path)
    assert str(err.value).startswith("validation.tasks[1].shots: 9000 shots is more than the 8939 examples")


# ----------------------------------------------------------------------------- during a real run


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def pretrain(run: Path, shards: Path, *overrides: str) -> str:
    """``hataori pretrain`` on 2 processes in a subprocess with a clean environment; its stdout. Nothing
    may be JIT-compiled: TORCH_EXTENSIONS_DIR (beside the run) must stay absent."""
    extensions = run.parent / "torch_extensions"
    env = cpu_env(extensions)
    command = [sys.executable, "-m", "hataori.cli", "pretrain", str(TOY), *OVERRIDES, *overrides, "--data",
               str(shards), "--run-dir", str(run), "--nproc", "2"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert not extensions.exists(), "a C++ extension was compiled"
    return result.stdout


def hataori_eval(run: Path, out: Path, *options: str) -> dict:
    assert hataori_main(["eval", str(run), "--task", "jcommonsenseqa", *options, "--output", str(out),
                         "--device", "cpu"]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S + 60)
def test_eval_tasks_during_zero3_pretraining_match_hataori_eval(ja_shards, tmp_path, capsys):
    """4 steps on 2 processes under ZeRO-3 with validations at 0, 2 and 4, in two launches (the second
    resumes after step 3 and appends its records). The last step's eval records and results files
    against `hataori eval` of the final checkpoint on one process: per-choice log-likelihoods to 1e-5,
    the same predictions and accuracies; the records' steps; TensorBoard's eval scalars read back with
    its own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    first = pretrain(run, ja_shards, "trainer.launch_steps=3")  # stops after step 3, with a checkpoint
    assert "ZeRO stage 3" in first
    assert "eval at step 2: jcommonsenseqa (jcommonsenseqa-v1, 0-shot, seed 0): acc " in first
    resumed = pretrain(run, ja_shards)
    assert "resuming after step 3" in resumed
    assert "eval at step 4: jcommonsenseqa (jcommonsenseqa-v1, 0-shot, seed 0): acc " in resumed
    assert "eval at step 4: jcommonsenseqa (jcommonsenseqa-v1, 2-shot, seed 3): acc " in resumed

    evals = records(run, "eval")
    assert [(r["name"], r["step"]) for r in evals] == [
        ("jcommonsenseqa", 0), ("jcqa-2shot", 0), ("jcommonsenseqa", 2), ("jcommonsenseqa", 4), ("jcqa-2shot", 4)]
    assert [r["step"] for r in records(run, "val")] == [0, 2, 4]
    with capsys.disabled():
        print("\neval seconds:", ", ".join(f"{r['name']} step {r['step']} {r['seconds']:.3f}" for r in evals))

    for name, shots, seed, examples, batch_size in (("jcommonsenseqa", 0, 0, 24, 8), ("jcqa-2shot", 2, 3, 5, 3)):
        ours = json.loads((run / "eval" / f"{name}-step_00000004.json").read_text(encoding="utf-8"))
        reference = hataori_eval(run, tmp_path / f"{name}.json", "--shots", str(shots), "--seed", str(seed),
                                 "--limit", str(examples), "--batch-size", str(batch_size))
        assert reference["model"]["step"] == ours["model"]["step"] == 4 and ours["model"]["kind"] == "training"
        assert ours["counts"] == reference["counts"] and ours["counts"]["examples"] == examples
        for key in ("task", "template", "template_config", "shots", "seed", "limit", "data"):
            assert ours[key] == reference[key], key
        for mine, theirs in zip(ours["examples"], reference["examples"], strict=True):
            assert mine["prompt"] == theirs["prompt"] and mine["tokens"] == theirs["tokens"]
            torch.testing.assert_close(torch.tensor(mine["loglikelihoods"], dtype=torch.float64),
                                       torch.tensor(theirs["loglikelihoods"], dtype=torch.float64), rtol=1e-5, atol=0)
            assert (mine["prediction"], mine["prediction_norm"]) == (theirs["prediction"], theirs["prediction_norm"])
        assert ours["scores"] == reference["scores"]
        (last,) = [r for r in evals if r["name"] == name and r["step"] == 4]
        assert {key: last[key] for key in ("task", "template", "shots", "seed", "examples", "acc", "acc_norm")} == {
            "task": "jcommonsenseqa", "template": "jcommonsenseqa-v1", "shots": shots, "seed": seed,
            "examples": examples, **reference["scores"]}
    assert sorted(p.name for p in (run / "eval").iterdir()) == [
        "jcommonsenseqa-step_00000000.json", "jcommonsenseqa-step_00000002.json", "jcommonsenseqa-step_00000004.json",
        "jcqa-2shot-step_00000000.json", "jcqa-2shot-step_00000004.json"]
    capsys.readouterr()

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for name, steps in (("jcommonsenseqa", [0, 2, 4]), ("jcqa-2shot", [0, 4])):
        for score in ("acc", "acc_norm"):
            scalars = events.Scalars(f"eval/{name}/{score}")
            assert [s.step for s in scalars] == steps
            expected = [r[score] for r in evals if r["name"] == name]
            assert [s.value for s in scalars] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_generation_tasks_during_zero3_pretraining_match_hataori_eval(ja_shards, tmp_path):
    """Generation tasks at validations of a 2-process ZeRO-3 run (JSQuAD: 7 examples in batches of 3, JSTS with a
    shot: 5 in batches of 2; in both one rank has a batch fewer): the last step's answers and scores against
    `hataori eval` of the final checkpoint on one process, and the scores in metrics.jsonl."""
    run = tmp_path / "run"
    tasks = ("validation.tasks=[{task: jsquad, limit: 7, batch_size: 3}, "
             "{task: jsts, shots: 1, limit: 5, batch_size: 2}]")
    out = pretrain(run, ja_shards, "trainer.max_steps=2", "checkpoint.every_steps=2", tasks)
    assert "eval at step 2: jsquad (jsquad-v1, 0-shot, seed 0): exact_match " in out
    evals = {(r["name"], r["step"]): r for r in records(run, "eval")}
    assert sorted(evals) == [("jsquad", 0), ("jsquad", 2), ("jsts", 0), ("jsts", 2)]
    for name, options in (("jsquad", ["--limit", "7", "--batch-size", "2"]),
                          ("jsts", ["--shots", "1", "--limit", "5", "--batch-size", "5"])):
        ours = json.loads((run / "eval" / f"{name}-step_00000002.json").read_text(encoding="utf-8"))
        assert hataori_main(["eval", str(run), "--task", name, *options, "--output", str(tmp_path / f"{name}.json"),
                             "--device", "cpu"]) == 0
        reference = json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8"))
        assert [e["prompt"] for e in ours["examples"]] == [e["prompt"] for e in reference["examples"]]
        assert [e["output"] for e in ours["examples"]] == [e["output"] for e in reference["examples"]]
        assert ours["scores"] == reference["scores"] and ours["counts"] == reference["counts"]
        assert {k: evals[(name, 2)][k] for k in ours["scores"]} == ours["scores"]
