"""On a CUDA GPU: a bf16 training step with every kernel choice against fp32, and a two-step bf16
``hataori pretrain`` of the 125m preset with DeepSpeed on one GPU.

- The model step: the loss and every gradient of a bf16 model with each choice of attention backend
  and fused kernels (SDPA and PyTorch ops, our Triton kernels, the chunked loss, flash-attn when
  installed, ``auto``), each within twice the error of PyTorch's own bf16 step against the fp32
  model (flash-attention's rule), on packed documents.
- The run: the 125m preset as it is (its kernels chosen by ``auto``, bf16, ZeRO-1), for two steps of
  2 x 16 x 2048 tokens. The reference is independent of the run: its step-2 checkpoint loaded into the
  fp32 PyTorch model scores the validation documents one by one, which must give the loss the run
  validated with in bf16. The first step's loss must be a fresh model's, about ln(vocab).

The data is made here, from the Japanese text of the JGLUE files the repository ships (hataori/corpus/jglue):
a 8k unigram tokenizer and its shards, so nothing is fetched. Without a GPU the module is skipped;
``HATAORI_GPU_REHEARSAL=1`` runs the same tests on the CPU at toy sizes (fp32 runs, SDPA), which is
how ``scripts/gpu_check.sh --rehearse`` checks this file before a GPU minute is spent on it. With
``HATAORI_GPU_RESULTS=DIR`` the run's figures are written to DIR/pretrain.json for that script.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import bpc_one_by_one, load_script, records, tail, val_documents

from hataori.cli import main as hataori_main
from hataori.model import ModelConfig
from hataori.model.attention import BACKENDS, auto_choice
from hataori.model.model import use_triton

REPO = Path(__file__).resolve().parents[1]
bench_model = load_script(REPO / "benchmarks" / "bench_model.py")
ON_GPU = torch.cuda.is_available()
REHEARSAL = os.environ.get("HATAORI_GPU_REHEARSAL") == "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
pytestmark = pytest.mark.skipif(not (ON_GPU or REHEARSAL),
                                reason="needs a CUDA GPU (HATAORI_GPU_REHEARSAL=1 rehearses it on the CPU)")
VOCAB = 8000
RUN_TIMEOUT_S = 600


def jglue_text() -> list[str]:
    """The Japanese text of the repository's JGLUE files: each JCommonsenseQA training question with
    its choices, each JNLI sentence pair (about 11,400 documents, 440,000 characters)."""
    texts = []
    folder = REPO / "hataori" / "corpus" / "jglue"
    with open(folder / "jcommonsenseqa-train.json", encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            texts.append(item["question"] + "\n" + "、".join(item[f"choice{i}"] for i in range(5)) + "。")
    with open(folder / "jnli-valid.json", encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            texts.append(item["sentence1"] + "\n" + item["sentence2"])
    return texts


@pytest.fixture(scope="module")
def jglue_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(tokenizer folder, dataset folder): an 8k unigram tokenizer trained on :func:`jglue_text` with the
    32k preset's settings, and that text prepared into shards, 200 documents held out for validation."""
    folder = tmp_path_factory.mktemp("jglue")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in jglue_text()),
                      encoding="utf-8")
    tokenizer, dataset = folder / "tokenizer", folder / "dataset"
    assert hataori_main(["tokenizer", "train", str(REPO / "configs/tokenizer/ja-unigram-32k.yaml"),
                         f"vocab_size={VOCAB}", "--input", str(corpus), "--output", str(tokenizer)]) == 0
    assert hataori_main(["data", "prepare", "--input", str(corpus), "--tokenizer", str(tokenizer), "--output",
                         str(dataset), "val_docs=200", "progress=false"]) == 0
    return tokenizer, dataset


# ----------------------------------------------------------------------------- the model step


CHOICES = bench_model.variants_for(DEVICE)
"""The kernel choices benchmarks/bench_model.py times here: on a GPU SDPA and PyTorch ops, our Triton
kernels, the chunked loss, flash-attn and auto; on a CPU SDPA, the chunked loss and auto."""


def _step(cfg: ModelConfig, state: dict, dtype: torch.dtype, batch) -> tuple[torch.Tensor, dict]:
    """Loss and gradients of one forward and backward of ``cfg`` with weights ``state`` cast to ``dtype``."""
    model = cfg.build(DEVICE, dtype)
    model.load_state_dict(state)
    ids, doc_ids = batch
    loss = model(ids[:, :-1], doc_ids=doc_ids, targets=ids[:, 1:])
    loss.backward()
    return loss.detach().float(), {name: p.grad.float() for name, p in model.named_parameters()}


def _errors(loss, grads, ref_loss, ref_grads) -> dict[str, float]:
    errors = {"loss": (loss - ref_loss).abs().item()}
    errors.update({name: (grad - ref_grads[name]).abs().max().item() for name, grad in grads.items()})
    return errors


@pytest.mark.parametrize("choice", CHOICES, ids=[c.name for c in CHOICES])
def test_bf16_step_within_twice_pytorch_error(choice):
    """Head dim 128, grouped-query, packed documents of uneven lengths (not block multiples)."""
    reason = bench_model.unavailable(choice)
    if reason is not None:
        pytest.skip(f"{choice.name}: {reason}")
    seq_len = 1000 if ON_GPU else 100
    base = ModelConfig(vocab_size=2000, d_model=512, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=1024,
                       max_seq_len=seq_len, attention_backend="sdpa", fused_kernels="torch")
    torch.manual_seed(0)
    state = base.build(DEVICE).state_dict()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, base.vocab_size, (2, seq_len + 1), generator=gen).to(DEVICE)  # (B, T + 1)
    starts = torch.rand(2, seq_len, generator=gen) < 3 / seq_len  # about three documents a row
    starts[:, 0] = True
    doc_ids = (starts.cumsum(dim=1) - 1).to(DEVICE)  # (B, T)
    batch = (ids, doc_ids)

    reference = _step(base, state, torch.float32, batch)
    pytorch = _errors(*_step(base, state, torch.bfloat16, batch), *reference)
    cfg = dataclasses.replace(base, attention_backend=choice.attention_backend, fused_kernels=choice.fused_kernels,
                              chunked_loss=choice.chunked_loss)
    ours = _errors(*_step(cfg, state, torch.bfloat16, batch), *reference)
    if choice.attention_backend == "auto":  # what auto ran: flash-attn or our kernel on a GPU, SDPA on a CPU
        assert auto_choice(DEVICE, torch.bfloat16, cfg.head_dim) == (
            ("flash_attn" if BACKENDS["flash_attn"].unavailable() is None else "triton") if ON_GPU else "sdpa")
        assert use_triton("auto", DEVICE) == ON_GPU
    assert ours.keys() == pytorch.keys()
    for name, err in ours.items():
        assert err <= 2 * pytorch[name] + 1e-4, (name, err, pytorch[name])


# ----------------------------------------------------------------------------- the run


def _run_overrides() -> list[str]:
    """The 125m preset as it is, for 2 steps of 2 micro-batches, validated and saved at step 2; in a
    CPU rehearsal shrunk to a toy model in fp32."""
    overrides = [f"model.vocab_size={VOCAB}", "trainer.max_steps=2", "schedule.warmup_steps=1", "logging.every_steps=1",
                 "validation.every_steps=2", "validation.max_tokens=6000", "checkpoint.every_steps=2"]
    if ON_GPU:
        return [*overrides, "zero.global_batch_tokens=65536"]  # 2 x 16 x 2048
    return [*overrides, "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=128",
            "data.seq_len=128", "zero.micro_batch_size=2", "zero.global_batch_tokens=512", "zero.precision=fp32"]


def test_pretrain_125m_preset_bf16_on_one_gpu(jglue_dataset, tmp_path):
    from hataori.interop.load import load_model
    from hataori.tokenizer.model import Tokenizer

    tokenizer_dir, dataset = jglue_dataset
    run_dir = tmp_path / "run"
    log = tmp_path / "pretrain.log"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    if not ON_GPU:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "hataori.cli", "pretrain", str(REPO / "configs/train/125m.yaml"),
               *_run_overrides(), "--data", str(dataset), "--run-dir", str(run_dir), "--nproc", "1"]
    with open(log, "w") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                  timeout=RUN_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not finish in {RUN_TIMEOUT_S} s:\n{tail(log)}")
    assert code == 0, tail(log)
    assert not (tmp_path / "torch_extensions").exists(), "a C++ extension was compiled"

    train, val = records(run_dir, "train"), records(run_dir, "val")
    assert sorted(train) == [1, 2] and sorted(val) == [0, 2], tail(log)  # validated before the first step too
    assert abs(train[1]["loss"] - math.log(VOCAB)) < 0.3, train[1]  # a fresh model guesses about uniformly
    assert all(math.isfinite(record["loss"]) for record in train.values())

    model, config = load_model(run_dir)  # its last checkpoint: step 2
    docs, eos_id = val_documents(dataset, 6000)
    loss, bpc = bpc_one_by_one(model, docs, eos_id, Tokenizer(tokenizer_dir), config["data"]["seq_len"])
    rel = 2e-2 if ON_GPU else 1e-5  # the run validated in bf16, the reference is fp32
    assert val[2]["loss"] == pytest.approx(loss, rel=rel) and val[2]["bpc"] == pytest.approx(bpc, rel=rel)

    results = os.environ.get("HATAORI_GPU_RESULTS")
    if results:
        figures = {"command": "hataori pretrain configs/train/125m.yaml " + " ".join(_run_overrides()) + " --nproc 1",
                   "train": [train[1], train[2]], "val": val[2], "reference_val_loss": loss,
                   "reference_val_bpc": bpc}
        Path(results).mkdir(parents=True, exist_ok=True)
        (Path(results) / "pretrain.json").write_text(json.dumps(figures, indent=1) + "\n")
