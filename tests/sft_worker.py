"""The worker of tests/test_sft.py: ``python tests/sft_worker.py --data DATASET --out OUT`` on each rank, with the
variables torchrun would set. For each case (ZeRO stages 0-3, and LoRA under stages 1 and 3) one optimizer step of
the Trainer over conversations, its loss and gradient norm against the same step computed without DeepSpeed: the
initial model (built from the same seed) on every row of the step at once, the summed loss over the counted targets
divided by their number, and the norm of its gradient."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from helpers import build_engine, tiny_config

SEQ_LEN = 256
MICRO_BATCH = 2
ACCUM = 2
CASES = [(0, False), (1, False), (2, False), (3, False), (1, True), (3, True)]


def reference(cfg, lora, rows) -> dict:
    """The step's loss and gradient norm computed directly: one forward over all the step's rows."""
    from hataori.checkpoint.checkpointer import seed_all
    from hataori.model import IGNORE_INDEX, apply_lora

    seed_all(1234)  # as build_engine builds the model
    model = cfg.build()
    if lora is not None:
        apply_lora(model, lora)
    inputs, targets = torch.from_numpy(rows.inputs), torch.from_numpy(rows.targets)
    doc_ids = torch.from_numpy(np.cumsum(rows.positions == 0, axis=1) - 1)
    logits = model(inputs, doc_ids=doc_ids).float()
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    counted = targets.flatten() != IGNORE_INDEX
    loss = per_token.sum() / counted.sum()
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    # what a mean of the micro-batches' means would give instead (the normalisation the objective must not use)
    micro = per_token.view(len(inputs) // MICRO_BATCH, -1)
    weights = counted.view(len(inputs) // MICRO_BATCH, -1)
    naive = (micro.sum(1) / weights.sum(1)).mean()
    return {"ref_loss": loss.item(), "ref_grad_norm": norm.item(), "naive_loss": naive.item()}


def watch_grad_norm(engine) -> list[float]:
    """The norm of the module's gradients (averaged over the ranks) just before the update, in a list that
    fills when the step's last micro-batch steps the engine (stage 0, where the gradients stay in .grad)."""
    seen: list[float] = []
    step = engine.step

    def step_and_watch(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            grads = [p.grad.double() for p in engine.module.parameters() if p.grad is not None]
            seen.append(torch.sqrt(sum((g ** 2).sum() for g in grads)).item())
        return step(*args, **kwargs)

    engine.step = step_and_watch
    return seen


def main() -> None:
    from hataori.checkpoint.checkpointer import CheckpointConfig, Checkpointer
    from hataori.data.loader import DataConfig, DatasetSpec
    from hataori.model import LoRAConfig
    from hataori.train.optim import OptimConfig
    from hataori.train.trainer import Trainer, TrainerConfig
    from hataori.train.zero import init_distributed, leave_process, shutdown_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    env = init_distributed()
    data = DataConfig(datasets=[DatasetSpec(path=args.data)], seq_len=SEQ_LEN, seed=3)
    cfg = tiny_config(vocab_size=args.vocab, max_seq_len=SEQ_LEN)
    results = []
    for stage, with_lora in CASES:
        lora = LoRAConfig(rank=4, targets=("attn.*", "mlp.*")) if with_lora else None
        engine = build_engine(stage, micro_batch=MICRO_BATCH, seq_len=SEQ_LEN, model_cfg=cfg, total_steps=2,
                              global_batch_tokens=env.world_size * ACCUM * MICRO_BATCH * SEQ_LEN, lora=lora,
                              optim=OptimConfig(lr=1e-3, weight_decay=0.0, grad_clip=0.0))
        loader = data.build(MICRO_BATCH, env.rank, env.world_size, accum_steps=ACCUM)
        seen = watch_grad_norm(engine) if stage == 0 else None  # DeepSpeed reports no norm without ZeRO
        checkpointer = Checkpointer(CheckpointConfig(), Path(args.out).parent / f"run-{stage}-{with_lora}", engine)
        metrics = Trainer(TrainerConfig(max_steps=1), engine=engine, loader=loader,
                          checkpointer=checkpointer).train_step()
        rows = data.build(MICRO_BATCH, 0, env.world_size, accum_steps=ACCUM).step_rows()
        norm = metrics.grad_norm if seen is None else seen[0]
        results.append({"stage": stage, "lora": with_lora, "loss": metrics.loss, "grad_norm": norm,
                        "tokens": metrics.tokens, **reference(cfg, lora, rows)})
        engine.destroy()
    if env.is_main:
        Path(args.out).write_text(json.dumps(results, indent=1))
    shutdown_distributed()
    leave_process(0)  # no finalization (its docstring)


if __name__ == "__main__":
    main()
