"""Worker of tests/test_reshard.py, run as every rank of a CPU process group (tests/ranks.py).

``save``: train ``--steps`` optimizer steps on global batches of two micro-batches and save a
checkpoint with the Checkpointer; rank 0 writes the engine's whole state as it saved it (every
parameter's fp32 weight, low-precision weight and Adam moments, gathered with DeepSpeed's
``safe_get_full_*``; step, lr, param groups, scheduler, counters and loss scaler) to ``--out``.

``load``: build the engine on this world size, load that checkpoint with ``load_resharded``, write
the whole state again, train ``--more`` steps; then train a fresh engine on this world size for
``--steps + --more`` steps without interruption over the same global batches. Rank 0 writes both
runs' losses.

Every step's global batch is the same whatever the world size: micro-batch ``k`` of step ``s``
is drawn from ``(SEED, s, k)``, and rank ``r`` of ``W`` takes micro-batches ``r * A .. r * A + A - 1``
(``A`` = 2 / W accumulation steps).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from helpers import build_engine, tiny_config

SEQ_LEN = 16
VOCAB = 256
ROWS = 2
MICRO_BATCHES = 2
"""Micro-batches of ROWS sequences in every optimizer step, over all ranks."""
SEED = 5
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
SCALER_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def build(args):
    """The engine over a small model with tied embeddings (two parameter groups); ``args.offload``: none,
    cpu (the optimizer) or cpu+params (ZeRO-3's parameters too); ``args.lora``: rank-4 adapters on every
    attention and MLP projection, the rest frozen. Gradient clipping is off: its norm is summed in another
    order on another number of ranks, while the update is otherwise the same bits on one rank and on two."""
    from hataori.model import LoRAConfig
    from hataori.train.optim import OptimConfig, ScheduleConfig

    return build_engine(args.stage, micro_batch=ROWS, global_batch_tokens=MICRO_BATCHES * ROWS * SEQ_LEN,
                        total_steps=args.steps + args.more, precision=args.precision, offload=args.offload,
                        model_cfg=tiny_config(vocab_size=VOCAB, max_seq_len=SEQ_LEN, tie_embeddings=True),
                        seq_len=SEQ_LEN, optim=OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.0),
                        schedule=ScheduleConfig(kind="cosine", warmup_steps=2, min_lr=1e-3),
                        lora=LoRAConfig(rank=4, targets=("attn.*", "mlp.*")) if args.lora else None,
                        bucket_elements=4096)


def micro_batch(step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = np.random.default_rng([SEED, step, index]).integers(0, VOCAB, (ROWS, SEQ_LEN + 1))
    tokens = torch.from_numpy(tokens)
    return tokens[:, :-1], tokens[:, 1:]


def train(engine, first: int, last: int) -> list[float]:
    """Optimizer steps ``first .. last - 1``; each step's mean loss over all micro-batches."""
    accum, rank = engine.gradient_accumulation_steps(), dist.get_rank()
    losses = []
    for step in range(first, last):
        total = torch.zeros(())
        for j in range(accum):
            inputs, targets = micro_batch(step, rank * accum + j)
            loss = engine(inputs, targets=targets)
            engine.backward(loss)
            engine.step()
            total += loss.detach().float()
        dist.all_reduce(total)
        losses.append(total.item() / MICRO_BATCHES)
    return losses


def whole_state(engine) -> dict:
    """Everything a resume must restore, gathered whole on every rank: each parameter's weight as the
    module holds it, its fp32 master weight and Adam moments (stage 0: the optimizer's state dict),
    the optimizer's steps and param groups, the LR scheduler, the engine's counters, the loss scale."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    stage = engine.zero_optimization_stage()
    if stage in (1, 2):  # DeepSpeed links the fragments while only the first param group has state: link again
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    params = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=stage == 3):
            params[name] = {"lp": param.detach().clone()}
        if stage and param.requires_grad:  # a frozen parameter has no master weight or moments
            params[name].update(fp32=safe_get_full_fp32_param(param).clone(),
                                **{key: safe_get_full_optimizer_state(param, key).clone() for key in ADAM_KEYS})
    base = engine.basic_optimizer
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return {"params": params, "optimizer": copy.deepcopy(engine.optimizer.state_dict()) if stage == 0 else None,
            "steps": sorted({float(s["step"]) for s in base.state.values()}), "lr": engine.get_lr(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
            "scheduler": engine.lr_scheduler.state_dict(), "global_steps": engine.global_steps,
            "global_samples": engine.global_samples, "skipped_steps": engine.skipped_steps,
            "loss_scaler": None if scaler is None else {key: getattr(scaler, key, None) for key in SCALER_KEYS}}


def worker_save(args) -> None:
    from hataori.checkpoint.checkpointer import CheckpointConfig, Checkpointer
    from hataori.train.zero import init_distributed

    env = init_distributed()
    engine = build(args)
    losses = train(engine, 0, args.steps)
    checkpointer = Checkpointer(CheckpointConfig(), Path(args.run_dir) / "checkpoints", engine, frozen=args.lora)
    checkpointer.save(args.steps, loader_state={"position": args.steps}, client_state={"tokens_seen": 123})
    state = whole_state(engine)
    if env.is_main:
        torch.save({"losses": losses, "state": state}, args.out)


def worker_load(args) -> None:
    from hataori.checkpoint.checkpointer import CheckpointConfig, Checkpointer
    from hataori.checkpoint.manifest import read_manifest
    from hataori.checkpoint.reshard import load_resharded
    from hataori.train.zero import init_distributed

    env = init_distributed()
    path = Path(args.run_dir) / "checkpoints" / f"step_{args.steps:08d}"
    engine = build(args)
    loader = Checkpointer(CheckpointConfig(), path.parent, engine, frozen=args.lora).module_loader(path)
    client_state = load_resharded(engine, path, read_manifest(path)["world_size"], module_loader=loader)
    loaded = whole_state(engine)
    resumed = train(engine, args.steps, args.steps + args.more)
    engine.destroy()
    engine = build(args)
    uninterrupted = train(engine, 0, args.steps + args.more)
    if env.is_main:
        torch.save({"client_state": {k: client_state[k] for k in ("step", "tokens_seen", "world_size")},
                    "state": loaded, "resumed": resumed, "uninterrupted": uninterrupted}, args.out)


def main() -> None:
    from hataori.train.zero import leave_process, shutdown_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "load"])
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--offload", default="none")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--more", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    {"save": worker_save, "load": worker_load}[args.mode](args)
    shutdown_distributed()
    leave_process(0)  # no finalization (its docstring)


if __name__ == "__main__":
    main()
