"""TRL as the independent reference of the post-training objectives (docs/sft.md, docs/dpo.md): one tiny Llama as
hataori's model and, with the same weights, as transformers' LlamaForCausalLM; the same examples with the same
masks. hataori's supervised fine-tuning loss over packed rows and its DPO loss, rewards and log-probabilities
over packed pairs, with their gradients, against TRL's SFTTrainer (the loss on the masked tokens of unpacked,
padded rows) and DPOTrainer (the sigmoid loss, a reference model of its own) in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import REPO, jcqa_conversations, prepare_chat, tiny_config

from hataori.data.examples import PairLoader, pack
from hataori.data.shards import Dataset
from hataori.interop.hf import hf_llama_config, hf_name, to_hf_llama_state_dict, to_hf_tensor
from hataori.model import IGNORE_INDEX
from hataori.tokenizer.hf import write_hf_tokenizer
from hataori.tokenizer.model import Tokenizer
from hataori.train.preference import PreferenceConfig, PreferenceObjective, compute_reference

pytest.importorskip("trl", reason="TRL is in the dev extras (pip install -e '.[dev]')")

SEQ_LEN = 512
"""Positions a row: several conversations, or two pairs, to a row."""
TEMPLATE = REPO / "configs/chat/ja-chatml.jinja"
TOLERANCE = 1e-5
"""The largest difference allowed between hataori's and TRL's losses, logged figures and gradients (each tensor's
as a fraction of its norm), in fp32. What differs is rounding: sums taken in another order (packed rows against
padded ones), and the rotary tables, which transformers computes in fp32 from fp32 frequencies."""


@pytest.fixture(scope="module")
def hf_tokenizer(chat_tokenizer, tmp_path_factory):
    """The chat tokenizer as transformers loads it (the export's tokenizer files, with the template)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("hf_tokenizer")
    write_hf_tokenizer(Tokenizer(chat_tokenizer), folder, model_max_length=SEQ_LEN,
                       chat_template=TEMPLATE.read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    return tok


def twins(vocab: int, seed: int):
    """hataori's tiny model and LlamaForCausalLM with the same weights, both fp32 in training mode."""
    from transformers import LlamaForCausalLM

    cfg = tiny_config(vocab_size=vocab, max_seq_len=SEQ_LEN, init_std=0.2, chunked_loss=True)
    torch.manual_seed(seed)
    ours = cfg.build()
    theirs = LlamaForCausalLM(hf_llama_config(cfg, bos_token_id=None, eos_token_id=None))
    theirs.load_state_dict(to_hf_llama_state_dict(cfg, ours.state_dict()))
    return cfg, ours.train(), theirs.float().train()


def gradient_gaps(cfg, ours: torch.nn.Module, theirs: torch.nn.Module) -> dict[str, float]:
    """Every weight's gradient (ours in transformers' names and shapes) against TRL's: the norm of the difference
    as a fraction of the norm of TRL's, by our weight name."""
    theirs_grads = {name: p.grad for name, p in theirs.named_parameters()}
    gaps = {}
    for name, param in ours.named_parameters():
        got, want = to_hf_tensor(cfg, name, param.grad), theirs_grads[hf_name(name)]
        assert want.norm() > 0, name
        gaps[name] = ((got - want).norm() / want.norm()).item()
    return gaps


def masked_span(mask: np.ndarray) -> tuple[int, int]:
    """[start, end) of a single-reply pair's counted tokens, which must be one run."""
    where = np.flatnonzero(mask)
    assert len(where) and np.array_equal(where, np.arange(where[0], where[-1] + 1))
    return int(where[0]), int(where[-1]) + 1


@pytest.fixture(scope="module")
def conversations(chat_tokenizer, tmp_path_factory):
    records = [{"messages": m} for m in jcqa_conversations(60, seed=11)]
    return prepare_chat(tmp_path_factory.mktemp("trl_sft"), records, chat_tokenizer, f"max_tokens={SEQ_LEN + 1}")


def test_sft_loss_and_gradients_equal_trls_sfttrainer(conversations, hf_tokenizer, tmp_path):
    """Sixteen conversations (one to three turns, every assistant turn counted): hataori's loss over them packed
    into rows with per-conversation attention (the trainer's call) against SFTTrainer's compute_loss over the same
    token ids and masks, one conversation a padded row: the loss and every gradient to TOLERANCE."""
    from datasets import Dataset as HFDataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset(conversations, "train")
    docs = [(data.doc(i).astype(np.int64), data.doc_mask(i).astype(np.int64)) for i in range(16)]
    cfg, ours, theirs = twins(len(hf_tokenizer), seed=0)

    rows, placed = pack([(ids, mask, 0) for ids, mask in docs], seq_len=SEQ_LEN, pad_id=data.eos_id)
    assert placed == len(docs) and len(rows.inputs) < len(docs)  # packed several to a row
    doc_ids = torch.from_numpy(np.cumsum(rows.positions == 0, axis=1) - 1)
    loss = ours(torch.from_numpy(rows.inputs), doc_ids=doc_ids, targets=torch.from_numpy(rows.targets))
    loss.backward()

    args = SFTConfig(output_dir=str(tmp_path / "sft"), report_to="none", use_cpu=True, bf16=False, fp16=False,
                     per_device_train_batch_size=len(docs), max_length=None, save_strategy="no", seed=0)
    records = [{"input_ids": ids.tolist(), "assistant_masks": mask.tolist()} for ids, mask in docs]
    trainer = SFTTrainer(model=theirs, args=args, train_dataset=HFDataset.from_list(records),
                         processing_class=hf_tokenizer)
    prepared = trainer.train_dataset
    for (ids, mask), row in zip(docs, prepared):  # TRL's labels: the masked tokens, the rest -100
        assert row["labels"] == np.where(mask != 0, ids, IGNORE_INDEX).tolist()
    batch = trainer.data_collator([prepared[i] for i in range(len(prepared))])
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), rel=TOLERANCE)
    gaps = gradient_gaps(cfg, ours, trainer.model)
    assert max(gaps.values()) <= TOLERANCE, gaps
    print(f"loss {loss.item():.6f}, TRL {trl_loss.item():.6f}; largest gradient gap {max(gaps.values()):.1e}")


@pytest.fixture(scope="module")
def pairs(chat_tokenizer, tmp_path_factory):
    """Preference pairs from single-turn JCommonsenseQA conversations: the answer chosen, another one rejected."""
    records = []
    for messages in jcqa_conversations(200, seed=12):
        if len(messages) == 2:  # one question, one answer: a prompt and a reply
            answer = messages[-1]["content"]
            records.append({"prompt": messages[:-1], "chosen": answer, "rejected": answer[::-1] + "。"})
    return prepare_chat(tmp_path_factory.mktemp("trl_dpo"), records[:40], chat_tokenizer,
                        f"max_tokens={SEQ_LEN // 2 + 1}", "preference=true", "val_fraction=0"), records[:40]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_rewards_and_gradients_equal_trls_dpotrainer(beta, pairs, hf_tokenizer, tmp_path):
    """A batch of packed pairs (two to a row, chosen then rejected) under hataori's preference objective, with the
    reference computed by compute_reference from a second model, against DPOTrainer's compute_loss with that
    reference model of its own, on the same prompt and reply ids (the reply: hataori's counted tokens): the loss,
    the mean rewards, margins, accuracy and log-probabilities and the policy's gradients to TOLERANCE.
    TRL's own tokenization of the same pairs gives hataori's prompt ids, and its reply ids are hataori's counted
    tokens plus the newline the template writes after <|im_end|> (TRL counts it; hataori counts the
    generation block, which ends at the stop token)."""
    from datasets import Dataset as HFDataset
    from trl import DPOConfig, DPOTrainer

    folder, records = pairs
    data = Dataset(folder, "train")
    assert len(data) == 2 * len(records)  # every pair kept, in order: pair i is records[i]
    vocab = len(hf_tokenizer)
    _, reference_model, hf_reference = twins(vocab, seed=1)
    cfg, policy, theirs = twins(vocab, seed=2)
    (table,) = compute_reference(reference_model.eval(), [data], seq_len=SEQ_LEN, batch_size=4,
                                 device=torch.device("cpu"))
    objective = PreferenceObjective(PreferenceConfig(loss="sigmoid", beta=beta), torch.from_numpy(table))
    batch = next(PairLoader([data], seq_len=SEQ_LEN, batch_size=4, seed=3))
    chosen_pairs = batch.pairs[batch.pairs >= 0].tolist()
    assert len(chosen_pairs) >= 6
    loss, sums = objective(policy, batch, lambda a: torch.from_numpy(np.ascontiguousarray(a)).long())
    loss.backward()
    means = objective.means(sums)

    args = DPOConfig(output_dir=str(tmp_path / "dpo"), report_to="none", use_cpu=True, bf16=False, fp16=False,
                     beta=beta, loss_type=["sigmoid"], per_device_train_batch_size=len(chosen_pairs),
                     max_length=None, precompute_ref_log_probs=False, save_strategy="no", seed=0)
    source = HFDataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records])
    trainer = DPOTrainer(model=theirs, ref_model=hf_reference.eval(), args=args, train_dataset=source,
                         processing_class=hf_tokenizer)
    newline = hf_tokenizer("\n", add_special_tokens=False)["input_ids"][-1:]
    examples = []
    for pair in chosen_pairs:
        (c_ids, c_mask), (r_ids, r_mask) = [(data.doc(j).astype(np.int64), data.doc_mask(j)) for j in
                                            (2 * pair, 2 * pair + 1)]
        (c0, c1), (r0, r1) = masked_span(c_mask), masked_span(r_mask)
        assert c0 == r0 and np.array_equal(c_ids[:c0], r_ids[:r0])  # one prompt
        tokenized = trainer.train_dataset[pair]  # TRL's tokenization of the same record
        assert tokenized["prompt_ids"] == c_ids[:c0].tolist()
        assert tokenized["chosen_ids"] == c_ids[c0:c1].tolist() + newline
        assert tokenized["rejected_ids"] == r_ids[r0:r1].tolist() + newline
        examples.append({"prompt_ids": c_ids[:c0].tolist(), "chosen_ids": c_ids[c0:c1].tolist(),
                         "rejected_ids": r_ids[r0:r1].tolist()})
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    trl_loss.backward()
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    tol = TOLERANCE
    assert loss.item() == pytest.approx(trl_loss.item(), rel=tol)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert means[name] == pytest.approx(logged[name], rel=tol, abs=tol), name
    assert means["rewards/accuracies"] == pytest.approx(logged["rewards/accuracies"], abs=1e-6)  # TRL's in fp32
    gaps = gradient_gaps(cfg, policy, trainer.model)
    assert max(gaps.values()) <= tol, gaps
    print(f"loss {loss.item():.6f}, TRL {trl_loss.item():.6f}; largest gradient gap {max(gaps.values()):.1e}")
