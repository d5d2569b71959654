"""Helpers that more than one test module uses (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import math
import importlib.util
import os
import random
import subprocess
import weakref
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hataori.model import ModelConfig
from hataori.model.lora import LoRAConfig

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 32
"""The sequence length two-process training tests train at (:func:`build_engine`)."""
VOCAB = 1000


def tiny_config(**overrides) -> ModelConfig:
    """The tests' one small Llama-style model: 2 layers, width 64, 4 query heads sharing 2 key/value heads,
    vocabulary 1000 (padded to 1024), 64 positions, rotary base 500 (about 0.3M parameters); a test
    names the fields it needs otherwise."""
    fields = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, rope_base=500.0)
    return ModelConfig(**{**fields, **overrides})


def make_run(root: Path, tokenizer_dir: Path, change=None) -> tuple[Path, Path]:
    """(run folder, its checkpoint) of a tiny model whose state dict ``change`` edits in place first."""
    from hataori.checkpoint.record import record_run
    from hataori.checkpoint.verify import adopt
    from hataori.config import to_dict
    from hataori.tokenizer.model import Tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=Tokenizer(tokenizer_dir).vocab_size, d_model=32, n_layers=2, n_heads=4,
                      ffn_hidden=64, max_seq_len=128)
    state = cfg.build().state_dict()
    if change is not None:
        change(state)
    run = record_run(root, {"model": to_dict(cfg), "tokenizer": str(tokenizer_dir)})
    checkpoint = run / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    torch.save({"module": state, "step": 1, "world_size": 1}, checkpoint / "mp_rank_00_model_states.pt")
    adopt(checkpoint)
    return run, checkpoint


def built(cfg: ModelConfig, seed: int = 0):
    """The model of ``cfg`` with weights far from init (norm gains too), so every mapping matters."""
    torch.manual_seed(seed)
    model = cfg.build()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def hf_llama(folder: Path, *, seed: int = 0, shard: str | None = None, vocab_size: int = 300, **shape) -> Path:
    """A random LlamaForCausalLM saved in ``folder``, every weight far from its init (norms too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"tie_word_embeddings": False, "num_key_value_heads": 2, "head_dim": None, **shape}  # untied, GQA
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6,
                         rope_theta=2500.0, bos_token_id=1, eos_token_id=2, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5) if p.ndim == 1 else p.normal_(0.0, 0.1)
    model.save_pretrained(folder, max_shard_size=shard or "1GB")
    return folder


def load_script(path: Path):
    """Import a script of benchmarks/ or scripts/ (folders of scripts, not packages) by its path."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """``folder`` as the mount point of a tmpfs of ``size`` (e.g. ``64k``): a real full disk. Skips the test
    where mounting is not allowed (it needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                           text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)])


def fill(folder: Path) -> None:
    """Write into ``folder`` until its filesystem has no room left."""
    with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"x" * 4096)


def after_each_step(fn):
    """A training-loop callback that calls ``fn(metrics)`` after each optimizer step (to record or steer)."""
    from hataori.train.trainer import Callback

    class AfterEachStep(Callback):
        def post_step(self, trainer, metrics) -> None:
            fn(metrics)

    return AfterEachStep()


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_ID")
"""What a launcher sets: a command started with :func:`cpu_env` must not think it is one of its ranks."""


def cpu_env(extensions: Path) -> dict[str, str]:
    """The environment of a ``hataori pretrain`` subprocess on the CPU: DeepSpeed's CPU accelerator, one
    thread a rank, no launcher's variables, and an empty ``TORCH_EXTENSIONS_DIR`` at ``extensions`` (nothing
    may be JIT-compiled: the test checks that it stays absent). A process that crashes (an abort, a
    segfault) writes every thread's Python traceback to its log (faulthandler)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONFAULTHANDLER": "1",
           "TORCH_EXTENSIONS_DIR": str(extensions)}
    for name in LAUNCHER_VARIABLES:
        env.pop(name, None)
    return env


# ----------------------------------------------------------------------------- a toy engine


class TokenStream:
    """Deterministic random token rows for one rank, each row two documents, with a resumable position."""

    def __init__(self, *, seed: int, rank: int, rows: int):
        self.seed, self.rank, self.rows, self.position = seed, rank, rows, 0

    def __iter__(self):
        return self

    def __next__(self):
        from hataori.data.batch import Batch

        rng = np.random.default_rng([self.seed, self.rank, self.position])
        self.position += 1
        tokens = rng.integers(0, VOCAB, (self.rows, SEQ_LEN + 1))
        second_doc = rng.integers(1, SEQ_LEN, (self.rows, 1))  # where each row's second document starts
        index = np.arange(SEQ_LEN)
        positions = np.where(index < second_doc, index, index - second_doc).astype(np.int32)
        return Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=positions,
                     sources=np.zeros((self.rows, SEQ_LEN), np.uint8))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        assert (state["seed"], state["rank"]) == (self.seed, self.rank)
        self.position = state["position"]


def build_engine(stage: int, *, micro_batch: int, global_batch_tokens: int, total_steps: int, run_dir=None,
                 precision: str = "fp32", offload: str = "none", build_model: bool = False, model_cfg=None,
                 seq_len: int = SEQ_LEN, optim=None, schedule=None, lora: LoRAConfig | None = None, **zero_fields):
    """A DeepSpeed engine over ``model_cfg`` (default: :func:`tiny_config` at ``seq_len`` positions), built
    by ``ModelConfig.build()`` or, with ``build_model``, by ``ZeroConfig.build_model`` (partitioned as it
    is built for ZeRO-3); ``offload``: none, cpu (the optimizer) or cpu+params (ZeRO-3's parameters too);
    ``lora``: adapters applied before the optimizer is built; ``zero_fields``: other ZeroConfig fields."""
    from hataori.checkpoint.checkpointer import seed_all
    from hataori.train.optim import OptimConfig, ScheduleConfig
    from hataori.train.zero import ZeroConfig

    seed_all(1234)
    optim = optim or OptimConfig(lr=1e-3, weight_decay=0.1, grad_clip=1.0)
    schedule = schedule or ScheduleConfig(kind="cosine", warmup_steps=1, min_lr=1e-4)
    zero = ZeroConfig(stage=stage, precision=precision, offload_optimizer="none" if offload == "none" else "cpu",
                      offload_params="cpu" if offload == "cpu+params" else "none", micro_batch_size=micro_batch,
                      global_batch_tokens=global_batch_tokens, **zero_fields)
    model_cfg = model_cfg or tiny_config(max_seq_len=seq_len)
    if build_model:
        model = zero.build_model(model_cfg, torch.device("cpu"), seq_len=seq_len, grad_clip=optim.grad_clip)
    else:
        model = model_cfg.build()
    if lora is not None:
        from hataori.model import apply_lora

        apply_lora(model, lora)
    optimizer = optim.build(model)
    scheduler = schedule.build(optimizer, total_steps=total_steps)
    return zero.build(model, optimizer, scheduler, seq_len=seq_len, grad_clip=optim.grad_clip, run_dir=run_dir)


def jcqa_conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """Japanese conversations from JCommonsenseQA train questions: one to three question-and-answer turns,
    some with a system turn, answers with and without a newline, a number, Latin letters or spaces."""
    from hataori.eval.tasks import JGLUE, TASKS, read_examples

    examples = read_examples(TASKS["jcommonsenseqa"], JGLUE / "jcommonsenseqa-train.json")
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "あなたは常識問題に答えるアシスタントです。"})
        for example in rng.sample(examples, rng.randint(1, 3)):
            choices = "、".join(example.choices)
            answer = example.choices[example.label]
            messages.append({"role": "user", "content": f"{example.fields['question']}\n選択肢: {choices}"})
            style = rng.randrange(4)
            reply = (answer if style == 0 else f"答えは「{answer}」です。" if style == 1
                     else f"{answer}です。\n理由: 選択肢 {example.label + 1} が最も自然だからです。" if style == 2
                     else f"  {answer} (No. {example.label})  ")
            messages.append({"role": "assistant", "content": reply})
        out.append(messages)
    return out


# ----------------------------------------------------------------------------- run folders


def tail(log: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, for an assertion's message."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def records(run_dir: Path, kind: str) -> dict[int, dict]:
    """``metrics.jsonl`` records of one kind (train or val), by step."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    found = {}
    for line in path.read_text().splitlines():
        if line.endswith("}"):
            record = json.loads(line)
            if record["kind"] == kind:
                found[record["step"]] = record
    return found


# ----------------------------------------------------------------------------- independent bpc


def bpc_one_by_one(model, docs: list[np.ndarray], eos_id: int, tokenizer, seq_len: int) -> tuple[float, float]:
    """Loss and bits per character with each document run alone, unpacked, in windows of ``seq_len``."""
    nll, tokens, chars = 0.0, 0, 0
    with torch.no_grad():
        for doc in docs:
            ids = torch.from_numpy(np.asarray(doc, dtype=np.int64))
            inputs = torch.cat([torch.tensor([eos_id]), ids[:-1]])
            for start in range(0, len(ids), seq_len):
                logits = model(inputs[None, start:start + seq_len])[0]
                nll += F.cross_entropy(logits, ids[start:start + seq_len], reduction="sum").item()
            tokens += len(ids)
            chars += len(tokenizer.decode(ids[:-1].tolist()))
    return nll / tokens, nll / math.log(2) / chars


def val_documents(shards: Path, max_tokens: int) -> tuple[list[np.ndarray], int]:
    from hataori.data.shards import Dataset

    val = Dataset(shards, "val")
    docs, total = [], 0
    for i in range(len(val)):
        if total + len(val.doc(i)) > max_tokens:
            break
        docs.append(np.asarray(val.doc(i)))
        total += len(docs[-1])
    return docs, val.eos_id


# ----------------------------------------------------------------------------- activation memory against autograd


def saved_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype,
                           lora: LoRAConfig | None = None) -> tuple[int, int]:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one loss computation,
    parameters and buffers excluded, and the number of documents in the batch. Parameters are cast
    as DeepSpeed casts them (buffers stay fp32). ``lora``: with adapters applied, in training mode.

    Counted while the loss is alive, each storage once: a tensor saved by a node that the loss's
    graph does not reach (a checkpoint's saved input where nothing in or before the block trains) is
    freed with it, and its memory may hold a later tensor."""
    from hataori.model.lora import apply_lora

    torch.manual_seed(0)
    model = cfg.build()
    if lora is not None:
        apply_lora(model, lora)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, list[tuple[weakref.ref, int]]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own and t.dim() > 0:  # scalars (the loss's total weight) aside
            saved.setdefault(storage.data_ptr(), []).append((weakref.ref(t), storage.nbytes()))
        return t

    contexts = []
    make_context = model.context
    model.context = lambda *args: contexts.append(make_context(*args)) or contexts[-1]

    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    targets = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    doc_ids = (torch.rand(batch, seq_len) < 0.1).long().cumsum(dim=1)  # (B, T), a few documents a row
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, doc_ids=doc_ids, targets=targets)
    if cfg.activation_checkpointing:  # the blocks' context stays alive for their recomputation
        for t in context_tensors(contexts[0]):
            pack(t)
    from hataori.model.attention import document_starts

    n_docs = int(document_starts(doc_ids).sum())
    alive = [max(nbytes for ref, nbytes in tensors if ref() is not None) for tensors in saved.values()
             if any(ref() is not None for ref, _ in tensors)]
    del loss
    return sum(alive), n_docs


def context_tensors(ctx) -> list[torch.Tensor]:
    """The tensors a model.Context holds: rotary tables or gathered values, positions, documents."""
    tensors = [ctx.cos, ctx.sin, ctx.positions]
    if ctx.docs is not None:
        tensors += [value for value in vars(ctx.docs).values() if isinstance(value, torch.Tensor)]
    return [t for t in tensors if t is not None]


def check_activation_formula(precision: str, dtype: torch.dtype, checkpointing: bool, lora: LoRAConfig | None = None,
                             **overrides) -> None:
    """The plan's per-token activation terms against what autograd keeps on a small model.

    The Triton attention with documents also keeps the int32 cumulative document lengths (4 bytes
    per document, which the plan leaves out): they are added to the expectation here. A LoRA
    adapter's dropout on a CPU keeps the scaled noise in the activations' dtype where CUDA keeps a
    bool mask: the formula is given the CPU's mask size."""
    from hataori.model.memory import activation_bytes, activation_bytes_per_token, loss_backward_bytes, trainable

    cfg = tiny_config(n_layers=3, activation_checkpointing=checkpointing, **overrides)
    B, T = 2, 40
    adapters = None if lora is None else trainable(cfg, lora)
    t = activation_bytes_per_token(cfg, seq_len=T, precision=precision, lora=adapters, mask_bytes=dtype.itemsize)
    if checkpointing:  # saved through the forward: each block's input; the block itself is recomputed later
        forward = B * T * (t["block_inputs"] + t["checkpoint_inputs"] + t["head"])
    else:
        forward = B * T * (t["blocks"] + t["head"])
    saved, n_docs = saved_activation_bytes(cfg, B, T, dtype, lora)
    cu_seqlens = 4 * (n_docs + 1) if cfg.attention_backend == "triton" and cfg.doc_masking else 0
    assert saved == forward + cu_seqlens
    if lora is None or not lora.dropout:  # (the plan's peak counts CUDA's masks)
        peak = activation_bytes(cfg, micro_batch=B, seq_len=T, precision=precision, checkpointing=checkpointing,
                                lora=adapters)
        assert peak == (forward + B * T * (t["loss_backward"] + (t["block"] if checkpointing else 0))
                        + loss_backward_bytes(cfg, tokens=B * T, precision=precision, lora=adapters))


def prepare_chat(folder: Path, records: list[dict], tokenizer: Path, *settings: str) -> Path:
    """``records`` (conversations, or preference pairs with ``preference=true``) written to ``folder/chat.jsonl``
    and prepared by `hataori data prepare` with the Japanese ChatML preset into ``folder/data``; ``settings``
    are prepare's key=value settings."""
    from hataori.cli import main as hataori_main

    source = folder / "chat.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = folder / "data"
    assert hataori_main(["data", "prepare", "--input", str(source), "--tokenizer", str(tokenizer), "--chat-template",
                         str(REPO / "configs/chat/ja-chatml.jinja"), "--output", str(out), "progress=false",
                         *settings]) == 0
    return out


def post_train(objective: str, run: Path, data: Path, vocab: int, seq_len: int, *overrides: str, nproc: int = 2,
               timeout: float = 240) -> subprocess.CompletedProcess:
    """`hataori sft` or `hataori dpo` (``objective``) on the sft-toy preset shrunk to a 2-layer width-64 model,
    rows of ``seq_len``, 2 rows a micro-batch, 4 steps with checkpoints and validations every 2; in a subprocess
    with the CPU DeepSpeed environment, its output captured."""
    command = [sys.executable, "-m", "hataori.cli", objective, str(REPO / "configs/train/sft-toy.yaml"),
               "--data", str(data), "--run-dir", str(run), "--nproc", str(nproc), f"model.vocab_size={vocab}",
               "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
               f"data.seq_len={seq_len}", "zero.micro_batch_size=2", f"zero.global_batch_tokens={2 * 2 * 2 * seq_len}",
               "trainer.max_steps=4", "schedule.warmup_steps=1", "checkpoint.every_steps=2", "validation.every_steps=2",
               "logging.every_steps=1", *overrides]
    return subprocess.run(command, env=cpu_env(run.parent / "torch_extensions"), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
