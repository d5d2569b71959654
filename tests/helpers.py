"""Helpers that more than one test module uses (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch

from hataori.model import ModelConfig


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
    may be JIT-compiled: the test checks that it stays absent)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions)}
    for name in LAUNCHER_VARIABLES:
        env.pop(name, None)
    return env
