"""The worker of tests/test_export.py: ``python tests/export_worker.py save --root DIR --tokenizer TOK`` on two
processes saves a checkpoint of the same weights under each ZeRO stage (``DIR/stage0`` .. ``stage3``); the model
the test builds in one process to compare with is :func:`model_config`'s."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from helpers import tiny_config

from hataori.model import ModelConfig

SEQ_LEN = 32
STAGES = (0, 1, 2, 3)


def model_config(vocab_size: int) -> ModelConfig:
    """The tests' tiny model with a head width other than d_model / n_heads, the vocabulary padded past the
    tokenizer's, and a rotary base and norm epsilon other than the defaults (export must carry them)."""
    return tiny_config(vocab_size=vocab_size, head_dim=24, max_seq_len=SEQ_LEN, rope_base=5000.0, norm_eps=1e-6)


def worker_save(args) -> None:
    """For each stage: build the model as pretrain does (seed 7), take one AdamW step at learning rate
    0 so the optimizer holds its states, and save a checkpoint with the run's config beside it."""
    from hataori.checkpoint.checkpointer import CheckpointConfig, Checkpointer
    from hataori.checkpoint.record import record_run
    from hataori.config import to_dict
    from hataori.tokenizer.model import Tokenizer
    from hataori.train.optim import OptimConfig
    from hataori.train.zero import ZeroConfig, init_distributed, leave_process, shutdown_distributed

    env = init_distributed()
    cfg = model_config(Tokenizer(args.tokenizer).vocab_size)
    for stage in STAGES:
        run_dir = Path(args.root) / f"stage{stage}"
        zero = ZeroConfig(stage=stage, precision="fp32", micro_batch_size=2, global_batch_tokens=2 * SEQ_LEN * 2)
        if env.is_main:
            record_run(run_dir, {"model": to_dict(cfg), "tokenizer": args.tokenizer, "zero": to_dict(zero)},
                       world_size=env.world_size)
        torch.manual_seed(7)
        model = zero.build_model(cfg, env.device, seq_len=SEQ_LEN, grad_clip=1.0)
        optimizer = OptimConfig(lr=1e-3, weight_decay=0.1, grad_clip=1.0).build(model)
        for group in optimizer.param_groups:
            group["lr"] = 0.0  # the step fills the optimizer states and leaves the weights as built
        engine = zero.build(model, optimizer, None, seq_len=SEQ_LEN, grad_clip=1.0)
        tokens = torch.randint(0, cfg.vocab_size, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(env.rank))
        engine.backward(engine(tokens[:, :-1], targets=tokens[:, 1:]))
        engine.step()
        Checkpointer(CheckpointConfig(), run_dir / "checkpoints", engine).save(
            1, loader_state={}, client_state={"tokens_seen": 4 * SEQ_LEN})
        engine.destroy()
    shutdown_distributed()
    leave_process(0)  # no finalization (its docstring)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    save = sub.add_parser("save")
    save.add_argument("--root", required=True)
    save.add_argument("--tokenizer", required=True)
    worker_save(parser.parse_args())
