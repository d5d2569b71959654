"""The worker of tests/test_lora_train.py: ``python tests/lora_worker.py frozen --precision P --out FILE`` on two
processes trains a LoRA model three steps under each ZeRO stage and records, per stage, whether any frozen
weight changed or got a gradient, what the optimizer holds and whether every adapter moved."""

from __future__ import annotations

import argparse

import torch


def worker_frozen(args) -> None:
    import deepspeed

    from hataori.checkpoint.checkpointer import seed_all
    from hataori.model import LoRAConfig, ModelConfig, apply_lora
    from hataori.train.optim import OptimConfig
    from hataori.train.zero import ZeroConfig, init_distributed

    env = init_distributed()
    cfg = ModelConfig(vocab_size=500, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=32)
    lora = LoRAConfig(rank=4, targets=("attn.wq", "attn.wv", "mlp.*"))
    results = {}
    precision = args.precision
    for stage in range(4):
        seed_all(3)
        zero = ZeroConfig(stage=stage, precision=precision, micro_batch_size=2,
                          global_batch_tokens=2 * 32 * env.world_size)
        model = zero.build_model(cfg, env.device, seq_len=32, grad_clip=1.0)
        apply_lora(model, lora)

        def whole(names: list[str]) -> dict[str, torch.Tensor]:
            params = dict(model.named_parameters())
            found = {}
            for name in names:
                with deepspeed.zero.GatheredParameters([params[name]], enabled=stage == 3):
                    found[name] = params[name].detach().clone()
            return found

        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        adapters = [n for n, p in model.named_parameters() if p.requires_grad]
        optimizer = OptimConfig(lr=5e-2).build(model)
        optimized = sum(len(group["params"]) for group in optimizer.param_groups)
        engine = zero.build(model, optimizer, None, seq_len=32, grad_clip=1.0)
        before, adapters_before = whole(frozen), whole(adapters)
        generator = torch.Generator().manual_seed(10 + env.rank)
        for _ in range(3):
            tokens = torch.randint(0, 500, (2, 33), generator=generator)
            engine.backward(engine(tokens[:, :-1], targets=tokens[:, 1:]))
            engine.step()
        after, adapters_after = whole(frozen), whole(adapters)
        params = dict(model.named_parameters())
        results[(stage, precision)] = {
            "frozen": len(frozen), "trainable": len(adapters), "optimized": optimized,
            "changed_frozen": [n for n in frozen if not torch.equal(after[n], before[n]) or params[n].grad is not None],
            "still_adapters": [n for n in adapters if n.endswith("lora_B")
                               and torch.equal(adapters_after[n], adapters_before[n])],
        }
        engine.destroy()
    if env.is_main:
        torch.save(results, args.out)


def main() -> None:
    from hataori.train.zero import leave_process, shutdown_distributed

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    frozen = sub.add_parser("frozen")
    frozen.add_argument("--out", required=True)
    frozen.add_argument("--precision", required=True)
    args = parser.parse_args()
    {"frozen": worker_frozen}[args.mode](args)
    shutdown_distributed()
    leave_process(0)  # no finalization (its docstring)


if __name__ == "__main__":
    main()
