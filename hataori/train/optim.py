"""The optimizer (AdamW with decay groups) and the learning-rate schedule.

The schedule is a pure function of the optimizer step, :func:`lr_at`, so that tests and plots can
evaluate it anywhere; :class:`Schedule` wraps it as a torch LR scheduler that DeepSpeed steps after
each optimizer step and saves in every checkpoint. Step ``s`` (0-based) is the update made with
``lr_at(s)``.

Warmup is linear and reaches the peak on its last step: ``lr(s) = peak * (s + 1) / warmup_steps``
for ``s < warmup_steps``. After it:

* ``cosine``: ``min_lr + (peak - min_lr) * (1 + cos(pi * p)) / 2`` with
  ``p = (s - warmup_steps) / (total_steps - warmup_steps)``, reaching ``min_lr`` at ``total_steps``.
* ``wsd`` (warmup-stable-decay): the peak until the last ``decay_steps = round(decay_fraction *
  total_steps)`` steps, then ``min_lr + (peak - min_lr) * shape(p)`` with
  ``p = (s - (total_steps - decay_steps)) / decay_steps`` and ``shape`` one of
  ``linear`` (1 - p), ``cosine`` ((1 + cos(pi * p)) / 2) or ``1-sqrt`` (1 - sqrt(p)).

Past ``total_steps`` the rate stays at ``min_lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from hataori.config import require
from hataori.errors import ConfigError

# ----------------------------------------------------------------------------- optimizer


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW with decoupled weight decay, and the gradient clipping DeepSpeed applies before it."""

    lr: float = 3e-4
    """Peak learning rate (the schedule scales it)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam's moment decay rates (beta1, beta2)."""
    eps: float = 1e-8
    """Adam's denominator epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the weight matrices."""
    decay_norms_and_biases: bool = False
    """Also decay one-dimensional parameters (norm gains, biases); usually left off."""
    decay_embeddings: bool = False
    """Also decay embedding tables (a tied output matrix is the embedding table)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this before each update; 0 turns clipping off."""

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                f"must be two numbers in [0, 1), e.g. [0.9, 0.95]; got {list(self.betas)}")
        require(self.eps > 0, "eps", f"must be positive, got {self.eps}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 turns clipping off), got {self.grad_clip}")

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Two AdamW groups, ``decay`` and ``no_decay``; empty groups are left out."""
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay = [], []
        for param in model.parameters():  # shared (tied) parameters appear once
            if not param.requires_grad:
                continue
            if param.ndim < 2 and not self.decay_norms_and_biases:
                no_decay.append(param)
            elif id(param) in embeddings and not self.decay_embeddings:
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [{"name": "decay", "params": decay, "weight_decay": self.weight_decay},
                  {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def build(self, model: nn.Module) -> torch.optim.AdamW:
        """torch's AdamW over ``model``'s parameters (no compiled extension needed on any device)."""
        return torch.optim.AdamW(self.param_groups(model), lr=self.lr, betas=tuple(self.betas), eps=self.eps)


# ----------------------------------------------------------------------------- schedule


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    """Learning rate over training: linear warmup, then cosine or warmup-stable-decay."""

    kind: Literal["cosine", "wsd"] = "cosine"
    """``cosine``: cosine decay from the peak after warmup; ``wsd``: constant, then decay at the end."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup; the last of them runs at the peak rate."""
    min_lr: float = 0.0
    """Rate at the end of the decay (absolute, not a fraction of the peak)."""
    decay_fraction: float = 0.2
    """wsd only: fraction of all steps spent decaying at the end."""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    """wsd only: shape of the final decay."""

    def __post_init__(self) -> None:
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.min_lr >= 0, "min_lr", f"must be >= 0, got {self.min_lr}")
        require(0 < self.decay_fraction <= 1, "decay_fraction",
                f"must be in (0, 1], the share of all steps spent decaying; got {self.decay_fraction}")

    def decay_steps(self, total_steps: int) -> int:
        """Steps of the final decay (wsd)."""
        return max(1, round(self.decay_fraction * total_steps))

    def check(self, *, peak_lr: float, total_steps: int) -> None:
        """Raise if the schedule does not fit ``total_steps`` or ``min_lr`` exceeds ``peak_lr``."""
        require(total_steps >= 1, "total_steps", f"training must take at least one step, got {total_steps}")
        require(self.min_lr <= peak_lr, "schedule.min_lr",
                f"must not exceed the peak rate optim.lr={peak_lr}; got {self.min_lr}")
        if self.kind == "cosine":
            require(self.warmup_steps < total_steps, "schedule.warmup_steps",
                    f"must be below the total of {total_steps} steps, got {self.warmup_steps}")
        else:
            stable_end = total_steps - self.decay_steps(total_steps)
            require(self.warmup_steps <= stable_end, "schedule.warmup_steps",
                    f"warmup ({self.warmup_steps} steps) overlaps the final decay, which starts at step "
                    f"{stable_end} of {total_steps}; shorten warmup or lower decay_fraction")

    def build(self, optimizer: torch.optim.Optimizer, *, total_steps: int) -> Schedule:
        """A torch LR scheduler over ``optimizer`` whose peak is each group's current ``lr``."""
        for group in optimizer.param_groups:
            self.check(peak_lr=group["lr"], total_steps=total_steps)
        return Schedule(optimizer, self, total_steps=total_steps)


def lr_at(step: int, *, schedule: ScheduleConfig, peak_lr: float, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based); see the module docstring for the formulas."""
    if step < schedule.warmup_steps:
        return peak_lr * (step + 1) / schedule.warmup_steps
    if step >= total_steps:
        return schedule.min_lr
    if schedule.kind == "cosine":
        progress = (step - schedule.warmup_steps) / (total_steps - schedule.warmup_steps)
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule.kind == "wsd":
        decay_steps = schedule.decay_steps(total_steps)
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return peak_lr
        factor = _decay_factor(schedule.decay_shape, (step - decay_start) / decay_steps)
    else:
        raise ConfigError("schedule.kind", f"unknown schedule {schedule.kind!r}; choose 'cosine' or 'wsd'")
    return schedule.min_lr + (peak_lr - schedule.min_lr) * factor


def _decay_factor(shape: str, progress: float) -> float:
    """1 at the start of the decay (progress 0) falling to 0 at its end (progress 1)."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    raise ConfigError("schedule.decay_shape", f"unknown shape {shape!r}; choose linear, cosine or 1-sqrt")


class Schedule(torch.optim.lr_scheduler.LRScheduler):
    """:func:`lr_at` as a torch LR scheduler, one ``step()`` per optimizer step.

    Its state dict holds only the position (``last_epoch``) and the peak rates; the schedule's shape
    and length come from the current config, so a resumed run may extend or reshape its schedule.
    """

    _CONFIG_KEYS = ("schedule", "total_steps")

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, *, total_steps: int):
        self.schedule = schedule
        self.total_steps = total_steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [lr_at(self.last_epoch, schedule=self.schedule, peak_lr=base, total_steps=self.total_steps)
                for base in self.base_lrs]

    def state_dict(self) -> dict:
        state = super().state_dict()
        for key in self._CONFIG_KEYS:
            state.pop(key, None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = {k: v for k, v in state_dict.items() if k not in self._CONFIG_KEYS}
        super().load_state_dict(state)
