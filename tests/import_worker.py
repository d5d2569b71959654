"""The worker of tests/test_import.py's two-process load: ``python tests/import_worker.py load --hf DIR --stage N
--out FILE`` on each rank loads a transformers folder as init.from_hf, counting the rows it reads, and rank 0
saves the gathered weights and the counts."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def worker_load(args) -> None:
    import deepspeed
    import torch.distributed as dist

    from hataori.interop.hf import HFCheckpoint, model_fields
    from hataori.interop.load import InitConfig, load_initial_weights, open_source
    from hataori.model import ModelConfig
    from hataori.train.zero import ZeroConfig, init_distributed, leave_process, shutdown_distributed

    env = init_distributed()
    folder = Path(args.hf)
    cfg = ModelConfig(**model_fields(HFCheckpoint(folder).config, folder / "config.json"))
    zero = ZeroConfig(stage=args.stage, precision="fp32", micro_batch_size=1, global_batch_tokens=2 * 32)
    model = zero.build_model(cfg, env.device, seq_len=32, grad_clip=1.0)
    plan = open_source(InitConfig(from_hf=str(folder)), cfg, None)
    read = [0]
    rows = HFCheckpoint.rows

    def counting_rows(self, name, start, stop):
        tensor = rows(self, name, start, stop)
        read[0] += tensor.numel()
        return tensor

    HFCheckpoint.rows = counting_rows
    load_initial_weights(model, plan)
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=args.stage == 3):
        weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    counts = [None] * env.world_size
    dist.all_gather_object(counts, read[0])
    if env.is_main:
        torch.save({"weights": weights, "read": dict(enumerate(counts))}, args.out)
    shutdown_distributed()
    leave_process(0)  # no finalization (its docstring)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    load = sub.add_parser("load")
    load.add_argument("--hf", required=True)
    load.add_argument("--stage", type=int, required=True)
    load.add_argument("--out", required=True)
    worker_load(parser.parse_args())
