"""Supervised fine-tuning: the conversation loader (hataori/data/examples.py), the objective's normalisation in
the Trainer under ZeRO 0-3 and LoRA (against a direct computation), packing against no packing and against each
conversation alone, and `hataori sft` end to end with an exact resume."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, jcqa_conversations, post_train, prepare_chat, records, tiny_config
from ranks import launch_ranks, log_tails

from hataori.cli import main as hataori_main
from hataori.data.examples import ExampleLoader, pack
from hataori.data.shards import Dataset
from hataori.model import IGNORE_INDEX
from hataori.tokenizer.model import Tokenizer

SEQ_LEN = 256
"""Positions a row of the training runs; the conversations are prepared to fit one (max_tokens 257)."""
PACK_LEN = 1024
"""Rows of the packing tests: several conversations each."""
LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def conversations(chat_tokenizer, tmp_path_factory) -> Path:
    """1,200 JCommonsenseQA conversations prepared for rows of 256 positions (40 for validation)."""
    records = [{"messages": messages} for messages in jcqa_conversations(1200, seed=5)]
    return prepare_chat(tmp_path_factory.mktemp("sft"), records, chat_tokenizer, f"max_tokens={SEQ_LEN + 1}",
                        "val_docs=40")


def examples_of(rows) -> list[tuple[list[int], list[int]]]:
    """The (inputs, targets) of every conversation in packed rows, read back by their positions."""
    found = []
    for inputs, targets, positions in zip(rows.inputs, rows.targets, rows.positions):
        starts = list(np.flatnonzero(positions == 0)) + [len(positions)]
        for a, b in zip(starts, starts[1:]):
            if (targets[a:b] != IGNORE_INDEX).any() or inputs[a] != inputs[-1] or positions[-1] != b - a - 1:
                found.append((inputs[a:b].tolist(), targets[a:b].tolist()))
    return found


def expected(data: Dataset, index: int) -> tuple[list[int], list[int]]:
    ids, mask = data.doc(index).astype(np.int64), data.doc_mask(index)
    return ids[:-1].tolist(), np.where(mask[1:] != 0, ids[1:], IGNORE_INDEX).tolist()


def test_loader_packs_whole_conversations_in_order_and_resumes(conversations):
    """Each step's rows hold the permutation's next conversations, whole and in order, on every rank alike;
    the step's loss-token count is every rank's micro-batches' sum; the global rows are the same on 1 and 2
    processes; a loader restored from the state after a step gives the next step's batches bit for bit."""
    data = Dataset(conversations, "train")
    ranks = [ExampleLoader([data], seq_len=PACK_LEN, batch_size=2, accum_steps=2, seed=9, rank=r, world_size=2)
             for r in range(2)]
    single = ExampleLoader([data], seq_len=PACK_LEN, batch_size=2, accum_steps=4, seed=9)
    perm = ranks[0].permutation(0)
    taken = 0
    for step in range(3):
        batches = [[next(loader) for _ in range(2)] for loader in ranks]
        flat = [b for rank in batches for b in rank]
        assert len({b.step_loss_tokens for b in flat}) == 1
        assert flat[0].step_loss_tokens == sum(b.loss_tokens for b in flat) > 0
        assert all(b.loss_tokens == np.count_nonzero(b.targets != IGNORE_INDEX) for b in flat)
        alone = [next(single) for _ in range(4)]
        for ours, theirs in zip(flat, alone):
            assert np.array_equal(ours.inputs, theirs.inputs) and np.array_equal(ours.targets, theirs.targets)
        rows = type("Rows", (), {k: np.concatenate([getattr(b, k) for b in flat]) for k in
                                 ("inputs", "targets", "positions")})
        got = examples_of(rows)
        assert got == [expected(data, int(i)) for i in perm[taken:taken + len(got)]], step
        taken += len(got)
        assert ranks[0].state_dict() == ranks[1].state_dict() == {**single.state_dict()} and \
            ranks[0].state_dict()["position"] == taken
        if step == 0:
            state = ranks[1].state_dict()
    restored = ExampleLoader([data], seq_len=PACK_LEN, batch_size=2, accum_steps=2, seed=9, rank=1, world_size=2)
    restored.load_state_dict(json.loads(json.dumps(state)))
    again = ExampleLoader([data], seq_len=PACK_LEN, batch_size=2, accum_steps=2, seed=9, rank=1, world_size=2)
    for _ in range(2):
        next(again)
    for _ in range(4):
        a, b = next(restored), next(again)
        assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)
        assert np.array_equal(a.positions, b.positions) and a.step_loss_tokens == b.step_loss_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_equals_unpacked_and_each_conversation_alone(dtype, conversations):
    """The summed loss over counted targets and its gradient are the same with the conversations packed several
    to a row, one to a row, and each run through the model by itself: to 1e-10 in fp64 (the same sums), and in
    fp32 to its rounding (1e-5 of each tensor's largest gradient)."""
    data = Dataset(conversations, "train")
    chosen = [(data.doc(i), data.doc_mask(i), 0) for i in range(24)]
    torch.manual_seed(0)
    model = tiny_config(vocab_size=Tokenizer(data.manifest["tokenizer"]["path"]).vocab_size, max_seq_len=PACK_LEN,
                        init_std=0.2).build().to(dtype)

    def summed(inputs, targets, doc_ids=None):
        model.zero_grad()
        logits = model(inputs, doc_ids=doc_ids)
        loss = F.cross_entropy(logits.to(dtype).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    results = {}
    for packed in (True, False):
        rows, placed = pack(chosen, seq_len=PACK_LEN, pad_id=data.eos_id, pack_rows=packed)
        assert placed == len(chosen)
        doc_ids = torch.from_numpy(np.cumsum(rows.positions == 0, axis=1) - 1)
        results[packed] = (len(rows.inputs), *summed(torch.from_numpy(rows.inputs), torch.from_numpy(rows.targets),
                                                     doc_ids))
    alone_loss, alone_grads = 0.0, None
    for ids, mask, _ in chosen:
        ids = torch.from_numpy(ids.astype(np.int64))
        targets = torch.where(torch.from_numpy(mask[1:] != 0), ids[1:], IGNORE_INDEX)
        loss, grads = summed(ids[None, :-1], targets[None])
        alone_loss += loss
        alone_grads = grads if alone_grads is None else [a + g for a, g in zip(alone_grads, grads)]
    assert results[True][0] < results[False][0] == len(chosen)  # packing takes fewer rows
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    for rows, loss, grads in results.values():
        assert loss == pytest.approx(alone_loss, rel=rel)
        for ours, theirs in zip(grads, alone_grads):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=rel * theirs.abs().max().item())


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_the_step_loss_is_per_counted_token_across_the_global_batch_under_every_zero_stage(
        conversations, chat_tokenizer, tmp_path):
    """2 processes x 2 accumulated micro-batches: the Trainer's loss and gradient norm for one step equal the
    summed loss over the step's counted targets divided by their number, computed without DeepSpeed, under
    ZeRO 0, 1, 2 and 3 and with LoRA under 1 and 3, while the mean of the micro-batches' means differs by
    more than ten times the tolerance."""
    out = tmp_path / "sft.json"
    vocab = Tokenizer(chat_tokenizer).vocab_size
    codes = launch_ranks(str(REPO / "tests" / "sft_worker.py"), ["--data", str(conversations), "--vocab", str(vocab),
                                                                  "--out", str(out)], tmp_path / "logs", 2,
                         LAUNCH_TIMEOUT_S)
    assert codes == [0, 0], log_tails(tmp_path / "logs")
    for case in json.loads(out.read_text()):
        assert case["loss"] == pytest.approx(case["ref_loss"], rel=1e-5), case
        assert case["grad_norm"] == pytest.approx(case["ref_grad_norm"], rel=1e-4), case
        assert abs(case["naive_loss"] - case["ref_loss"]) > 10 * 1e-5 * case["ref_loss"], case  # told apart


def sft(run: Path, data: Path, vocab: int, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return post_train("sft", run, data, vocab, SEQ_LEN, *overrides, nproc=nproc, timeout=LAUNCH_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S + 30)
def test_sft_runs_validates_and_resumes_exactly(conversations, chat_tokenizer, tmp_path):
    """`hataori sft` on 2 processes: 4 steps with checkpoints at 2 and 4 and validation on the held-out
    conversations' assistant tokens; with step 4's checkpoint taken away the run resumes from step 2 and gives
    steps 3 and 4 the same losses, gradient norms and learning rates, bit for bit."""
    vocab = Tokenizer(chat_tokenizer).vocab_size
    run = tmp_path / "run"
    result = sft(run, conversations, vocab)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train, val = records(run, "train"), records(run, "val")
    assert sorted(train) == [1, 2, 3, 4] and sorted(val) == [0, 2, 4]
    assert val[4]["loss"] < val[0]["loss"]
    held_out = Dataset(conversations, "val")
    counted = sum(int(np.count_nonzero(held_out.doc_mask(i)[1:])) for i in range(len(held_out)))
    assert val[0]["tokens"] == counted  # validation scores the assistant tokens only
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "metrics.jsonl").unlink()
    result = sft(run, conversations, vocab)
    assert result.returncode == 0 and "resuming after step 2" in result.stdout, result.stdout[-3000:]
    resumed = records(run, "train")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm", "lr", "tokens_seen"):
            assert resumed[step][key] == train[step][key], (step, key)


def test_each_objective_reads_its_kind_of_data(conversations, ja_shards, chat_tokenizer, tmp_path, capsys):
    vocab = Tokenizer(chat_tokenizer).vocab_size
    common = ["--run-dir", str(tmp_path / "run"), "--nproc", "2", f"model.vocab_size={vocab}"]
    assert hataori_main(["pretrain", str(REPO / "configs/train/toy.yaml"), "--data", str(conversations), *common]) == 2
    assert "holds conversations (prepared with a chat template), which objective=pretrain does not read; train " \
           "on them with `hataori sft`" in capsys.readouterr().err
    assert hataori_main(["sft", str(REPO / "configs/train/sft-toy.yaml"), "--data", str(ja_shards), *common]) == 2
    assert "holds text, which objective=sft does not read" in capsys.readouterr().err
    assert hataori_main(["sft", str(REPO / "configs/train/sft-toy.yaml"), "--data", str(conversations),
                         "objective=pretrain", *common]) == 2
    assert "`hataori sft` trains objective=sft" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_a_fine_tuned_run_exports_its_template_and_chats_in_transformers(conversations, chat_tokenizer, tmp_path,
                                                                       capsys):
    """The run keeps its chat template; the export carries it, so that transformers' apply_chat_template gives
    the ids hataori trained on for every held-out conversation, and generation_config stops at <|im_end|>;
    transformers' greedy generate on the chat prompt gives `hataori generate --chat --greedy`'s reply."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = Tokenizer(chat_tokenizer)
    run = tmp_path / "run"
    result = sft(run, conversations, tokenizer.vocab_size, "trainer.max_steps=2", "optim.lr=2e-2", nproc=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    template = (REPO / "configs/chat/ja-chatml.jinja").read_text(encoding="utf-8")
    assert (run / "chat_template.jinja").read_text(encoding="utf-8") == template
    out = tmp_path / "hf"
    assert hataori_main(["export", "hf", str(run), "--output", str(out), "--dtype", "fp32"]) == 0
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.chat_template == template
    end = tokenizer.sp.piece_to_id("<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [tokenizer.eos_id, end]
    held_out = Dataset(conversations, "val")
    source = [json.loads(line)["messages"] for line in (conversations.parent / "chat.jsonl").read_text().splitlines()]
    rendered = {tuple(hf_tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"])
                for m in source}
    for i in range(len(held_out)):
        assert tuple(held_out.doc(i)[:-1].tolist()) in rendered  # every held-out conversation, as trained on

    question = source[0][0]["content"]
    capsys.readouterr()
    assert hataori_main(["generate", str(run), question, "--chat", "--greedy", "--max-new-tokens", "12"]) == 0
    ours = capsys.readouterr().out.rstrip("\n")
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    prompt = hf_tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)
    with torch.no_grad():
        new = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    theirs = tokenizer.decode([t for t in new if t not in (tokenizer.eos_id, end)])
    assert ours == theirs
