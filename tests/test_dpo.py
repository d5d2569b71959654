"""Preference optimisation (hataori/train/preference.py): the pair loader, the reference log-probabilities and
the DPO and SimPO losses and gradients of packed pairs against each sequence scored alone, and `hataori dpo`
end to end on two processes with its reference kept in the run folder and an exact resume."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import jcqa_conversations, post_train, prepare_chat, records, tiny_config

from hataori.data.examples import ExampleLoader, PairLoader
from hataori.data.shards import Dataset
from hataori.errors import HataoriError
from hataori.interop.load import InitConfig
from hataori.tokenizer.model import Tokenizer
from hataori.train.preference import (PreferenceConfig, PreferenceObjective, compute_reference, ensure_reference,
                                      reference_key)

SEQ_LEN = 512
"""Positions a row; a pair (both answers) fits one: the pairs are prepared with max_tokens 257."""
LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def pairs(chat_tokenizer, tmp_path_factory) -> Path:
    """Preference pairs from JCommonsenseQA conversations: the answer chosen, a reversed answer rejected."""
    records = []
    for messages in jcqa_conversations(400, seed=3):
        prompt, answer = messages[:-1], messages[-1]["content"]
        records.append({"prompt": prompt, "chosen": answer, "rejected": answer[::-1] + "。"})
    return prepare_chat(tmp_path_factory.mktemp("dpo"), records, chat_tokenizer, f"max_tokens={SEQ_LEN // 2 + 1}",
                        "overlong=drop", "preference=true", "val_docs=20")


def pair_docs(data: Dataset, pair: int) -> list[tuple[list[int], list[int]]]:
    """The (ids, mask) of a pair's chosen and rejected documents."""
    return [(data.doc(j).astype(np.int64).tolist(), data.doc_mask(j).tolist()) for j in (2 * pair, 2 * pair + 1)]


def test_pairs_are_packed_whole_in_order_and_resume(pairs):
    """Every row holds whole pairs, chosen then rejected, each its own segment; an epoch reads every pair once in
    the seeded order; a batch counts its pairs and the step's; the loader resumes exactly; the conversation
    loader refuses pairs."""
    data = Dataset(pairs, "train")
    loader = PairLoader([data], seq_len=SEQ_LEN, batch_size=2, accum_steps=2, seed=4, rank=0, world_size=1)
    seen = []
    while len(seen) < len(data) // 2:
        step = [next(loader) for _ in range(2)]
        assert {b.step_loss_tokens for b in step} == {sum(b.loss_tokens for b in step)}
        for batch in step:
            assert batch.loss_tokens == int((batch.pairs >= 0).sum())
            doc_ids = batch.doc_ids()
            for r, row_pairs in enumerate(batch.pairs):
                for k, pair in enumerate(row_pairs[row_pairs >= 0]):
                    for segment, (ids, mask) in zip((2 * k, 2 * k + 1), pair_docs(data, int(pair))):
                        where = doc_ids[r] == segment
                        assert batch.inputs[r][where].tolist() == ids[:-1]
                        counted = [t for t, m in zip(ids[1:], mask[1:]) if m]
                        assert [t for t in batch.targets[r][where].tolist() if t >= 0] == counted
                    seen.append(int(pair))
    assert sorted(seen[:len(data) // 2]) == list(range(len(data) // 2))
    state = loader.state_dict()
    assert state["kind"] == "preference"
    again = PairLoader([data], seq_len=SEQ_LEN, batch_size=2, accum_steps=2, seed=4)
    again.load_state_dict(state)
    for _ in range(4):
        a, b = next(loader), next(again)
        assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.pairs, b.pairs)
    with pytest.raises(HataoriError, match="preference pairs; supervised fine-tuning reads conversations"):
        ExampleLoader([data], seq_len=SEQ_LEN, batch_size=2)
    with pytest.raises(HataoriError, match=r"its longest pair .* prepare it with max_tokens=129"):
        PairLoader([data], seq_len=256, batch_size=2)


def alone_logp(model: torch.nn.Module, ids: list[int], mask: list[int]) -> torch.Tensor:
    """A sequence scored by itself: the summed log-probability of its masked targets (float64)."""
    tokens = torch.tensor(ids)
    logits = model(tokens[None, :-1])[0].double()
    logp = F.log_softmax(logits, dim=-1).gather(1, tokens[1:, None])[:, 0]
    return (logp * torch.tensor(mask[1:], dtype=torch.float64)).sum()


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_packed_losses_rewards_and_gradients_equal_each_pair_scored_alone(loss, pairs, chat_tokenizer):
    """The reference of every pair (one model) and the objective on a packed batch (another model, the policy)
    against each chosen and rejected sequence scored alone and the loss written out from them: the loss,
    the rewards and the policy's gradients to fp32 rounding (measured 1.5e-5 of a tensor's largest
    gradient)."""
    data = Dataset(pairs, "train")
    vocab = Tokenizer(chat_tokenizer).vocab_size
    cfg_model = tiny_config(vocab_size=vocab, max_seq_len=SEQ_LEN, chunked_loss=True)
    torch.manual_seed(0)
    reference_model = cfg_model.build()
    torch.manual_seed(1)
    policy = cfg_model.build()
    reference = compute_reference(reference_model, [data], seq_len=SEQ_LEN, batch_size=3, device=torch.device("cpu"))
    (table,) = reference
    for pair in (0, 7, len(data) // 2 - 1):
        for column, (ids, mask) in enumerate(pair_docs(data, pair)):
            assert table[pair, column] == pytest.approx(alone_logp(reference_model, ids, mask).item(), rel=1e-5)
    cfg = PreferenceConfig(loss=loss, beta=0.5, gamma=0.3)
    objective = PreferenceObjective(cfg, torch.from_numpy(table) if loss == "sigmoid" else None)
    batch = next(PairLoader([data], seq_len=SEQ_LEN, batch_size=3, seed=2))
    packed_loss, sums = objective(policy, batch, lambda a: torch.from_numpy(np.ascontiguousarray(a)).long())
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    losses, chosen_rewards = [], []
    for pair in batch.pairs[batch.pairs >= 0].tolist():
        (c_ids, c_mask), (r_ids, r_mask) = pair_docs(data, pair)
        pi_c, pi_r = alone_logp(policy, c_ids, c_mask), alone_logp(policy, r_ids, r_mask)
        if loss == "sigmoid":
            r_c, r_r = cfg.beta * (pi_c - float(table[pair, 0])), cfg.beta * (pi_r - float(table[pair, 1]))
            margin = r_c - r_r
        else:
            r_c, r_r = cfg.beta * pi_c / sum(c_mask[1:]), cfg.beta * pi_r / sum(r_mask[1:])
            margin = r_c - r_r - cfg.gamma
        losses.append(-F.logsigmoid(margin))
        chosen_rewards.append(r_c.item())
    direct = torch.stack(losses).mean()
    direct.backward()
    assert packed_loss.item() == pytest.approx(direct.item(), rel=1e-5)
    means = objective.means(sums)
    assert means["rewards/chosen"] == pytest.approx(np.mean(chosen_rewards), rel=1e-4, abs=1e-6)
    for name, param in policy.named_parameters():
        scale = param.grad.abs().max().item()  # fp32 rounding of sums over many positions, at the tensor's scale
        assert (packed_grads[name] - param.grad).abs().max().item() <= 1e-4 * scale, name


def test_a_resumed_run_without_its_reference_is_refused(pairs, tmp_path):
    data = Dataset(pairs, "train")
    key = reference_key([data], precision="fp32", init=InitConfig())
    made = []

    def compute():
        made.append(1)
        return [np.full((len(data) // 2, 2), -3.0, np.float32)]

    first = ensure_reference(tmp_path, key, resuming=False, compute=compute, is_main=True, device=torch.device("cpu"))
    again = ensure_reference(tmp_path, key, resuming=True, compute=compute, is_main=True, device=torch.device("cpu"))
    assert made == [1] and torch.equal(first, again) and first.shape == (len(data) // 2, 2)
    with pytest.raises(HataoriError, match="the run has checkpoints but no reference log-probabilities"):
        ensure_reference(tmp_path, {**key, "precision": "bf16"}, resuming=True, compute=compute, is_main=True,
                         device=torch.device("cpu"))


def dpo(run: Path, data: Path, vocab: int, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return post_train("dpo", run, data, vocab, SEQ_LEN, "optim.lr=2e-3", f"model.max_seq_len={SEQ_LEN}", *overrides,
                      nproc=nproc, timeout=LAUNCH_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S + 30)
def test_dpo_runs_logs_its_rewards_and_resumes_exactly(pairs, chat_tokenizer, tmp_path):
    """`hataori dpo` on 2 processes under ZeRO-2: the reference is computed before step 1 and kept in the run
    folder; the rewards go to metrics.jsonl and TensorBoard; the loss starts at log 2 (the policy is the
    reference); with step 4's checkpoint taken away the run resumes from step 2 with the kept reference and
    gives steps 3 and 4 the same losses and rewards, bit for bit."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    vocab = Tokenizer(chat_tokenizer).vocab_size
    run = tmp_path / "run"
    result = dpo(run, pairs, vocab, "zero.stage=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "reference log-probabilities of" in result.stdout
    kept = json.loads((run / "reference" / "reference.json").read_text())
    assert kept["datasets"][0]["pairs"] == len(Dataset(pairs, "train")) // 2
    train = records(run, "train")
    assert sorted(train) == [1, 2, 3, 4]
    assert train[1]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert train[1]["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert train[4]["rewards/margins"] > train[1]["rewards/margins"]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen"} <= set(events.Tags()["scalars"])
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "metrics.jsonl").unlink()
    result = dpo(run, pairs, vocab, "zero.stage=2")
    assert result.returncode == 0 and "resuming after step 2" in result.stdout, result.stdout[-3000:]
    assert "reference log-probabilities of" not in result.stdout
    resumed = records(run, "train")
    for step in (3, 4):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "rewards/accuracies"):
            assert resumed[step][key] == train[step][key], (step, key)
