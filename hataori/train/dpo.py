"""``hataori dpo``: preference optimisation on preference pairs, the run ``hataori pretrain`` makes with
``objective=dpo``.

    hataori dpo CONFIG.yaml [key=value ...] --data DATASET --run-dir runs/NAME [--nproc N]

The datasets are preference pairs prepared with a chat template (``hataori data prepare --chat-template
T preference=true``); the model starts from a trained one (``init.from_run`` or ``init.from_hf``, usually
the supervised fine-tuning run), with or without LoRA. ``preference.loss``: ``sigmoid`` (DPO, against the
reference log-probabilities computed before the first step and kept in the run folder) or ``simpo``
(reference-free); :mod:`hataori.train.preference`. The rest is the pretraining run's.
"""

from __future__ import annotations

import argparse

from hataori.train import sft


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sft.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return sft.run_objective(args, "dpo")
