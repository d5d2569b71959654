"""The worker of tests/test_generate.py: ``python tests/generate_worker.py train --stage N --run-dir RUN
--tokenizer TOK`` on two processes trains :func:`tiny_config`'s model two steps under ZeRO stage N and saves a
checkpoint, the run's config and (rank 0) the weights as the engine holds them."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from helpers import tiny_config

from hataori.model import ModelConfig

SEQ_LEN = 32


def model_config(vocab_size: int = 97) -> ModelConfig:
    """The model the workers train and test_generate.py builds: the tests' tiny one, embeddings tied."""
    return tiny_config(vocab_size=vocab_size, max_seq_len=SEQ_LEN, tie_embeddings=True)


def worker_train(args) -> None:
    """Two optimizer steps on random tokens, a checkpoint through the Checkpointer, the run's config, and
    (rank 0) the weights as the engine holds them in memory."""
    import deepspeed

    from hataori.checkpoint.checkpointer import CheckpointConfig, Checkpointer, seed_all
    from hataori.checkpoint.record import record_run
    from hataori.config import to_dict
    from hataori.tokenizer.model import Tokenizer
    from hataori.train.optim import OptimConfig, ScheduleConfig
    from hataori.train.zero import ZeroConfig, init_distributed, leave_process, shutdown_distributed

    env = init_distributed()
    run_dir = Path(args.run_dir)
    cfg = model_config(Tokenizer(args.tokenizer).vocab_size)
    if env.is_main:
        record_run(run_dir, {"model": to_dict(cfg), "tokenizer": args.tokenizer}, world_size=env.world_size)
    seed_all(1234)
    model = cfg.build()
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=1.0)
    optimizer = optim.build(model)
    scheduler = ScheduleConfig(kind="cosine", warmup_steps=1, min_lr=1e-3).build(optimizer, total_steps=2)
    zero = ZeroConfig(stage=args.stage, precision="fp32", micro_batch_size=2,
                      global_batch_tokens=2 * SEQ_LEN * env.world_size)
    engine = zero.build(model, optimizer, scheduler, seq_len=SEQ_LEN, grad_clip=optim.grad_clip, run_dir=run_dir)
    rng = np.random.default_rng([5, env.rank])
    for _ in range(2):
        tokens = torch.from_numpy(rng.integers(0, cfg.vocab_size, (2, SEQ_LEN + 1)))
        engine.backward(engine(tokens[:, :-1], targets=tokens[:, 1:]))
        engine.step()
    Checkpointer(CheckpointConfig(), run_dir / "checkpoints", engine).save(2, loader_state={})
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=args.stage == 3):
        weights = {name: tensor.detach().clone().float() for name, tensor in engine.module.state_dict().items()}
    if env.is_main:
        torch.save(weights, run_dir / "weights.pt")
    shutdown_distributed()
    leave_process(0)  # no finalization (its docstring)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    train = sub.add_parser("train")
    train.add_argument("--stage", type=int, required=True)
    train.add_argument("--run-dir", required=True)
    train.add_argument("--tokenizer", required=True)
    worker_train(parser.parse_args())
