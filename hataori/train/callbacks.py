"""The callbacks ``hataori pretrain`` runs around the loop (:class:`hataori.train.trainer.Callback`).

- :class:`Logging`: opens the run's logs when training starts, records every step, closes them at the end.
- :class:`Announce`: rank 0 says what trains, on what, and whether it starts or resumes.
- :class:`Validation`: validation bits per character and the configured eval tasks before the first step
  (a fresh run), when ``validation.every_steps`` falls due and after the last step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hataori.train.metrics import MetricsLogger
from hataori.train.trainer import Callback, StepMetrics, Trainer
from hataori.train.validate import EvalTasks, ValidationConfig, Validator


class Logging(Callback):
    """The console, TensorBoard and metrics.jsonl (:class:`~hataori.train.metrics.MetricsLogger`)."""

    def __init__(self, logger: MetricsLogger):
        self.logger = logger

    def pre_train(self, trainer: Trainer, step: int) -> None:
        self.logger.start(step)

    def post_step(self, trainer: Trainer, metrics: StepMetrics) -> None:
        self.logger.step(metrics)

    def close(self, trainer: Trainer) -> None:
        self.logger.close()


class Announce(Callback):
    """Rank 0 prints ``what`` (the model, processes, precision, ZeRO stage, batch), where the run starts or
    resumes, and the kernels that run."""

    def __init__(self, what: str, run_dir: Path, kernels: str, *, is_main: bool):
        self.what, self.run_dir, self.kernels, self.is_main = what, run_dir, kernels, is_main

    def pre_train(self, trainer: Trainer, step: int) -> None:
        if self.is_main:
            print(f"{self.what}; {'starting' if step == 0 else f'resuming after step {step}'} in {self.run_dir}",
                  flush=True)
            print(f"kernels: {self.kernels}", flush=True)


class Validation(Callback):
    """Validation and eval tasks (all ranks score their share), logged by ``logger``."""

    def __init__(self, cfg: ValidationConfig, validator: Validator, tasks: EvalTasks, logger: MetricsLogger, *,
                 device: torch.device, max_steps: int):
        self.cfg, self.validator, self.tasks, self.logger = cfg, validator, tasks, logger
        self.device, self.max_steps = device, max_steps

    def pre_train(self, trainer: Trainer, step: int) -> None:
        if step == 0:
            self.validate(trainer, 0)

    def post_step(self, trainer: Trainer, metrics: StepMetrics) -> None:
        if self.cfg.due(metrics.step, last=metrics.step == self.max_steps):
            self.validate(trainer, metrics.step)

    def validate(self, trainer: Trainer, step: int) -> None:
        self.logger.validation(step, self.validator.evaluate(trainer.engine, self.device))
        for results in self.tasks.evaluate(trainer.engine, self.device, step, last=step == self.max_steps):
            self.logger.eval_task(step, results)
