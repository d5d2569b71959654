"""``hataori sft``: supervised fine-tuning on conversations, the run ``hataori pretrain`` makes with
``objective=sft``.

    hataori sft CONFIG.yaml [key=value ...] --data DATASET --run-dir runs/NAME [--nproc N]

The datasets are conversations prepared with a chat template (``hataori data prepare --chat-template``);
the model usually starts from a trained one (``init.from_run`` or ``init.from_hf``), with or without
LoRA. Everything else (ZeRO stages, checkpoints and exact resumption, validation, logging, Slurm) is the
pretraining run's: the same loop, with the loss taken over the assistant tokens only, per counted token
across the global batch (:mod:`hataori.train.trainer`), and whole conversations packed into rows
(:mod:`hataori.data.examples`).
"""

from __future__ import annotations

import argparse

from hataori.errors import ConfigError
from hataori.train import pretrain


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pretrain.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return run_objective(args, "sft")


def run_objective(args: argparse.Namespace, objective: str) -> int:
    """``hataori pretrain`` with ``objective`` set (refusing another given on the command line)."""
    given = [item.split("=", 1)[1].strip() for item in args.config
             if "=" in item and item.split("=", 1)[0].strip() == "objective"]
    if any(value != objective for value in given):
        raise ConfigError("objective", f"is {given[-1]!r}, but `hataori {objective}` trains objective={objective}; "
                          "use `hataori pretrain` for another objective")
    if not given:
        args.config = [*args.config, f"objective={objective}"]
    return pretrain.main(args)
