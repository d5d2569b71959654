"""The workers of tests/test_zero_resume.py: ``python tests/zero_worker.py MODE ...`` on each rank, with the
variables torchrun would set. ``train``: train with checkpoints through the Trainer, resuming (optionally killed
in a save, or stopped on one rank); ``accum``: accumulated micro-batches against one big one; ``build``: the
ZeRO-3 model built partitioned against the whole model."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch

from helpers import SEQ_LEN, TokenStream, after_each_step, build_engine, tiny_config


def worker_train(args) -> None:
    """Train with checkpoints through the Trainer, resuming from the latest complete checkpoint; rank 0
    logs each step's loss and a draw from each random generator (which a resume must restore)."""
    from hataori.checkpoint.checkpointer import CheckpointConfig, Checkpointer
    from hataori.checkpoint.record import record_run
    from hataori.train.trainer import Trainer, TrainerConfig
    from hataori.train.zero import init_distributed

    env = init_distributed()
    run_dir = Path(args.run_dir)
    if env.is_main:
        record_run(run_dir, {"stage": args.stage, "steps": args.steps}, world_size=env.world_size)
    engine = build_engine(args.stage, micro_batch=2, global_batch_tokens=2 * 2 * SEQ_LEN * env.world_size,
                          total_steps=args.steps, run_dir=run_dir, precision=args.precision, offload=args.offload,
                          build_model=True)  # as hataori pretrain builds it
    checkpointer = Checkpointer(CheckpointConfig(every_steps=args.save_every, keep_last=args.keep_last),
                                run_dir / "checkpoints", engine)
    if args.kill_in_save_at is not None:
        _die_after_deepspeed_save(engine, args.kill_in_save_at)
    data = TokenStream(seed=7, rank=env.rank, rows=engine.train_micro_batch_size_per_gpu())

    def record(metrics) -> None:
        draws = [random.random(), float(np.random.rand()), torch.rand(1).item()]
        if env.is_main:
            with open(run_dir / "steps.jsonl", "a") as f:
                f.write(json.dumps({"step": metrics.step, "loss": metrics.loss, "rng": draws, "lr": metrics.lr,
                                    "tokens_seen": metrics.tokens_seen, "seconds": metrics.seconds}) + "\n")
        if metrics.step == args.stop_at and env.rank == env.world_size - 1:
            trainer.request_stop()  # on the last rank only: the request must reach the others

    trainer = Trainer(TrainerConfig(max_steps=args.steps), engine=engine, loader=data, checkpointer=checkpointer,
                      callbacks=[after_each_step(record)])
    trainer.fit()


def _die_after_deepspeed_save(engine, step: int) -> None:
    """SIGKILL this process once DeepSpeed has written its part of checkpoint ``step``."""
    save = engine.save_checkpoint

    def save_then_die(save_dir, tag=None, **kwargs):
        result = save(save_dir, tag=tag, **kwargs)
        if tag == f"step_{step:08d}.incomplete":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    engine.save_checkpoint = save_then_die


def worker_accum(args) -> None:
    """For each stage: two optimizer steps on the same global batches, as 1 x 8 and as 4 x 2."""
    import deepspeed

    from hataori.train.zero import init_distributed

    env = init_distributed()
    rows, steps = 8, 2
    results = {}
    for stage in (0, 1, 2, 3):
        runs = []
        for micro in (8, 2):
            engine = build_engine(stage, micro_batch=micro, global_batch_tokens=rows * SEQ_LEN * env.world_size,
                                  total_steps=steps)
            data = TokenStream(seed=11, rank=env.rank, rows=rows)
            grads = []
            for _ in range(steps):
                batch = next(data)
                inputs, targets = torch.from_numpy(batch.inputs), torch.from_numpy(batch.targets)
                for k in range(0, rows, micro):
                    engine.backward(engine(inputs[k:k + micro], targets=targets[k:k + micro]))
                    if k + micro == rows:  # the accumulation boundary: gradients are averaged now
                        grads.append({name: deepspeed.utils.safe_get_full_grad(param).clone()
                                      for name, param in engine.module.named_parameters()})
                    engine.step()
            params = {}
            for name, param in engine.module.named_parameters():
                with deepspeed.zero.GatheredParameters([param], enabled=stage == 3):
                    params[name] = param.detach().clone()
            runs.append({"micro_batches": rows // micro, "grads": grads, "params": params})
            engine.destroy()
        results[stage] = runs
    if env.is_main:
        torch.save(results, args.out)


def worker_build(args) -> None:
    """For ZeRO-3 (and stage 1): the model built partitioned against the model built whole, in the
    parameters each process holds after the build, the weights and the losses of three steps."""
    import deepspeed

    from hataori.train.zero import init_distributed

    env = init_distributed()
    cfg = tiny_config(max_seq_len=SEQ_LEN, tie_embeddings=True)
    results = {}
    for stage in (1, 3):
        runs = {}
        for build_model in (False, True):
            engine = build_engine(stage, micro_batch=2, global_batch_tokens=2 * SEQ_LEN * env.world_size,
                                  total_steps=3, precision=args.precision, build_model=build_model, model_cfg=cfg)
            held = sum(p.numel() if getattr(p, "ds_tensor", None) is None else p.ds_tensor.numel()
                       for p in engine.module.parameters())
            params = {}
            for name, param in engine.module.named_parameters():
                with deepspeed.zero.GatheredParameters([param], enabled=stage == 3):
                    params[name] = param.detach().float().clone()
            data = TokenStream(seed=3, rank=env.rank, rows=2)
            losses = []
            for _ in range(3):
                batch = next(data)
                loss = engine(torch.from_numpy(batch.inputs), targets=torch.from_numpy(batch.targets))
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            runs[build_model] = {"held": held, "params": params, "losses": losses}
            engine.destroy()
        results[stage] = runs
    torch.save(results, f"{args.out}.rank{env.rank}")


def main() -> None:
    from hataori.train.zero import leave_process, shutdown_distributed

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    train = sub.add_parser("train")
    train.add_argument("--stage", type=int, required=True)
    train.add_argument("--run-dir", required=True)
    train.add_argument("--steps", type=int, required=True)
    train.add_argument("--save-every", type=int, required=True)
    train.add_argument("--keep-last", type=int, default=2)
    train.add_argument("--kill-in-save-at", type=int)
    train.add_argument("--stop-at", type=int)
    train.add_argument("--precision", default="fp32")
    train.add_argument("--offload", default="none")
    accum = sub.add_parser("accum")
    accum.add_argument("--out", required=True)
    build = sub.add_parser("build")
    build.add_argument("--out", required=True)
    build.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    {"train": worker_train, "accum": worker_accum, "build": worker_build}[args.mode](args)
    shutdown_distributed()
    leave_process(0)  # no finalization (its docstring)


if __name__ == "__main__":
    main()
