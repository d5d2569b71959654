"""The training loop: optimizer steps of accumulated micro-batches through a DeepSpeed engine.

:class:`Trainer` only sequences what the other modules build (hataori.train.pretrain does this)::

    env = init_distributed()
    model = cfg.zero.build_model(cfg.model, env.device, seq_len=..., grad_clip=cfg.optim.grad_clip)
    optimizer = cfg.optim.build(model)
    scheduler = cfg.schedule.build(optimizer, total_steps=cfg.trainer.max_steps)
    engine = cfg.zero.build(model, optimizer, scheduler, seq_len=..., grad_clip=cfg.optim.grad_clip, run_dir=...)
    loader = cfg.data.build(engine.train_micro_batch_size_per_gpu(), env.rank, env.world_size, ...)
    checkpointer = Checkpointer(cfg.checkpoint, run_dir / "checkpoints", engine, identity=...)
    Trainer(cfg.trainer, engine=engine, loader=loader, checkpointer=checkpointer,
            callbacks=[MetricsCallback(...), ValidationCallback(...), StopOnSignals()]).fit()

One optimizer step is ``engine.gradient_accumulation_steps()`` micro-batches, each followed by
``engine.backward`` and ``engine.step`` (DeepSpeed updates, and steps the LR scheduler, on the
last). What happens around the loop is a :class:`Callback`, with named methods: ``pre_train`` once
``fit`` has resumed from the latest complete checkpoint (when the checkpoint config asks for it),
with the step it starts from (0 for a fresh run); ``post_step`` after each optimizer step with its
:class:`StepMetrics` (logging, validation and eval tasks go there); ``post_checkpoint_saved`` after
each checkpoint; ``close`` when training ends, by an error too. Then the step's health is checked and
a checkpoint is saved when due. Saving is the loop's own: when a checkpoint may be written depends
on the steps' health (below), so it is not a callback that could write one at the wrong time.
``launch_steps`` ends a launch early, with a checkpoint.

Health. A step whose loss or gradient norm is not finite and whose update was applied has
damaged the weights: training stops at once with :class:`TrainingFailed` (the command exits with an
error) and nothing is saved, so the last checkpoint holds the last good weights. A step the
optimizer skipped (an overflow, which ZeRO stages 1-3 and fp16 loss scaling detect) leaves the
weights as they were; ``max_skipped_steps`` such steps in a row stop the run the same way, and no
checkpoint is written while skipped steps are running, so weights that only overflow are never
saved: a checkpoint that falls due, and a stop that is requested, wait for the next applied step
(at most ``max_skipped_steps``). After the last step the run saves whatever it holds: skipped steps
leave the weights of the last applied one, and a save finds them finite or refuses (weights that were
non-finite before any step, or that an update damaged without a non-finite loss, are never saved). Each
stop names the first non-finite weight, or says the weights are finite and the gradients overflowed.
``spike_factor`` warns when a loss jumps above that multiple of the recent mean.

The loss. A micro-batch's loss is the model's mean over its targets that count. Text batches all
hold as many, so the step's loss is the mean of the micro-batches'. A batch of conversations
(:mod:`hataori.data.examples`) says how many of its targets count and how many the whole step holds
over every rank; its loss is scaled by ``loss_tokens * accumulation steps * world size /
step_loss_tokens`` before the backward pass, so that with DeepSpeed's division by the accumulation
steps and its mean over ranks the gradient is that of the summed loss over the step's counted
targets divided by their number: per token across the global batch, whatever the packing. A
micro-batch with no counted target (possible only in principle) runs its forward and backward with a
loss scaled by 0, so every rank still takes part in ZeRO's collectives.

An ``objective`` replaces the model's own loss: it returns a micro-batch's loss, a mean over the units the
batch counts (the preference objective's pairs, :mod:`hataori.train.preference`), which is scaled the same
way, and sums that the step adds up over its micro-batches and ranks and logs (``StepMetrics.extra``).

:meth:`Trainer.request_stop` (e.g. from a signal handler) ends training after the current step
with a checkpoint; the request is shared between ranks at each step, so it may reach any of them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist

from hataori.checkpoint.checkpointer import Checkpointer
from hataori.config import require
from hataori.errors import HataoriError

SPIKE_WINDOW = 100
"""Steps whose mean loss a spike is measured against."""


class TrainingFailed(HataoriError):
    """Training cannot go on: the weights were damaged, or every step is being skipped."""


@dataclass(kw_only=True, slots=True)
class TrainerConfig:
    """How long to train."""

    max_steps: int
    """Optimizer steps of the whole run (the LR schedule's length)."""
    launch_steps: int = 0
    """Stop this launch after this many optimizer steps, with a checkpoint; the next launch resumes.
    For jobs shorter than the run. 0: train up to max_steps."""
    max_skipped_steps: int = 10
    """Stop the run after this many optimizer steps in a row skipped for overflow (non-finite
    gradients). fp16's loss scaling skips a few steps while it finds its scale."""
    spike_factor: float = 0.0
    """Warn when a step's loss exceeds this multiple of the mean of the previous steps'; 0: never."""

    def __post_init__(self) -> None:
        require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        require(self.launch_steps >= 0, "launch_steps", f"must be >= 0 (0: no limit), got {self.launch_steps}")
        require(self.max_skipped_steps >= 1, "max_skipped_steps", f"must be >= 1, got {self.max_skipped_steps}")
        require(self.spike_factor == 0 or self.spike_factor > 1, "spike_factor",
                f"must be above 1 (or 0: no warnings), got {self.spike_factor}")


@dataclass(slots=True)
class StepMetrics:
    """What one optimizer step did, the same on every rank."""

    step: int
    """Optimizer steps completed, this one included."""
    loss: float
    """Mean loss over the step's micro-batches and all ranks."""
    lr: float
    """Learning rate this step's update used."""
    grad_norm: float | None
    """Global gradient norm before clipping, where DeepSpeed reports it."""
    tokens: int
    """Tokens this step consumed over all ranks."""
    tokens_seen: int
    """Tokens consumed since step 0 (resumed runs included)."""
    seconds: float
    """Wall time of the step."""
    applied: bool = True
    """Whether the optimizer applied the update (False: skipped for overflow)."""
    extra: dict[str, float] = field(default_factory=dict)
    """What the objective logs besides the loss (the preference objective's rewards), over the step."""

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and (self.grad_norm is None or math.isfinite(self.grad_norm))


class BatchLike(Protocol):
    """What the loader yields (:class:`hataori.data.batch.Batch`)."""

    inputs: np.ndarray
    targets: np.ndarray

    def doc_ids(self) -> np.ndarray: ...


class Objective(Protocol):
    """A loss other than the model's own next-token mean (:class:`hataori.train.preference.PreferenceObjective`)."""

    def __call__(self, engine: Any, batch: Any, tensor: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch's loss (before the trainer's scaling) and the sums it logs."""

    def means(self, sums: torch.Tensor) -> dict[str, float]:
        """The logged values of the step's sums (over its micro-batches and every rank)."""


class Callback:
    """What runs around the training loop at its named points (see the module docstring). Each method does
    nothing unless a subclass overrides it; every rank calls every method, callbacks in the order given."""

    def pre_train(self, trainer: Trainer, step: int) -> None:
        """Before the first step of this launch; ``step``: the steps already done (0 for a fresh run)."""

    def post_step(self, trainer: Trainer, metrics: StepMetrics) -> None:
        """After each optimizer step, before its health check and its checkpoint."""

    def post_checkpoint_saved(self, trainer: Trainer, step: int, path: Path) -> None:
        """After the checkpoint of ``step`` is complete at ``path``."""

    def close(self, trainer: Trainer) -> None:
        """When training ends, normally or by an error: release what ``pre_train`` took."""


class Trainer:
    """Runs optimizer steps until ``max_steps``, saving checkpoints as configured."""

    def __init__(self, cfg: TrainerConfig, *, engine: Any, loader: Iterator[BatchLike], checkpointer: Checkpointer,
                 callbacks: Iterable[Callback] = (), objective: Objective | None = None):
        self.cfg = cfg
        self.objective = objective
        self.engine = engine
        self.loader = loader
        self.checkpointer = checkpointer
        self.callbacks = list(callbacks)
        self.device = engine.device
        self.step = 0
        self.tokens_seen = 0
        self.skipped_in_a_row = 0
        self._recent_losses: list[float] = []
        self._stop_requested = False

    def fit(self) -> int:
        """Train (resuming first if configured) and return the number of completed steps; every callback's
        ``close`` runs at the end, by an error too."""
        try:
            if self.checkpointer.cfg.resume:
                self.resume()
            for callback in self.callbacks:
                callback.pre_train(self, self.step)
            return self._loop()
        finally:
            for callback in self.callbacks:
                callback.close(self)

    def _loop(self) -> int:
        launched_at, save_pending, stopping = self.step, False, False
        while self.step < self.cfg.max_steps:
            metrics = self.train_step()
            for callback in self.callbacks:
                callback.post_step(self, metrics)
            self.check_health(metrics)
            stopping = (self._stop_agreed() or stopping
                        or bool(self.cfg.launch_steps) and self.step - launched_at >= self.cfg.launch_steps)
            last = self.step == self.cfg.max_steps
            save_pending |= self.checkpointer.due(self.step, last=stopping or last)
            if self.skipped_in_a_row and not last:
                continue  # save, and stop, after the next applied step (or fail within max_skipped_steps)
            if save_pending:
                self.save()
                save_pending = False
            if stopping:
                break
        return self.step

    def check_health(self, metrics: StepMetrics) -> None:
        """Raise :class:`TrainingFailed` if the step damaged the weights or ends a run of skipped steps
        too long; warn on a loss spike. The metrics are the same on every rank, and so is the verdict."""
        where = f"step {metrics.step}: loss {metrics.loss}, gradient norm {metrics.grad_norm}"
        if metrics.applied and not metrics.finite:
            raise TrainingFailed(f"{where}, applied to the weights ({self._weights_health()}): training stopped "
                                 f"without saving; {self._last_good()}. Lower optim.lr, raise schedule.warmup_steps "
                                 "or check the data, then launch again")
        self.skipped_in_a_row = 0 if metrics.applied else self.skipped_in_a_row + 1
        if self.skipped_in_a_row >= self.cfg.max_skipped_steps:
            raise TrainingFailed(f"{where}: {self.skipped_in_a_row} steps in a row skipped for non-finite gradients "
                                 f"(trainer.max_skipped_steps={self.cfg.max_skipped_steps}), and "
                                 f"{self._weights_health()}; training stopped without saving; {self._last_good()}. "
                                 "Lower optim.lr or check the data, then launch again")
        if metrics.applied and self.cfg.spike_factor:
            recent = self._recent_losses
            if len(recent) >= 10 and metrics.loss > self.cfg.spike_factor * (mean := sum(recent) / len(recent)):
                if dist.get_rank() == 0:
                    print(f"warning: loss spike at step {metrics.step}: {metrics.loss:.4f}, "
                          f"{metrics.loss / mean:.1f} x the mean of the previous {len(recent)} steps", flush=True)
            recent.append(metrics.loss)
            del recent[:-SPIKE_WINDOW]

    def _weights_health(self) -> str:
        name = first_nonfinite(self.engine.module, self.device)
        return ("the weights are finite: the loss or the gradients overflowed" if name is None
                else f"weight {name} holds NaN or inf")

    def _last_good(self) -> str:
        last = self.checkpointer.latest()
        return "no checkpoint was written" if last is None else f"checkpoint step {last} holds the last good weights"

    def resume(self) -> bool:
        """Load the latest complete checkpoint, if any; True if one was loaded."""
        resumed = self.checkpointer.resume()
        if resumed is None:
            return False
        self.loader.load_state_dict(resumed.loader_state)
        self.step = resumed.step
        self.tokens_seen = resumed.client_state.get("tokens_seen", 0)
        return True

    def save(self) -> None:
        """Save a checkpoint of the current state, which must be finite (all ranks)."""
        if (name := first_nonfinite(self.engine.module, self.device)) is not None:
            raise TrainingFailed(f"step {self.step}: weight {name} holds NaN or inf; training stopped without "
                                 f"saving; {self._last_good()}. Check the init source and the data, lower optim.lr, "
                                 "then launch again")
        path = self.checkpointer.save(self.step, loader_state=self.loader.state_dict(),
                                      client_state={"tokens_seen": self.tokens_seen})
        for callback in self.callbacks:
            callback.post_checkpoint_saved(self, self.step, path)

    def train_step(self) -> StepMetrics:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        began = time.perf_counter()
        lr = self.engine.get_lr()[0]
        losses, tokens, sums = [], 0, None
        accum = self.engine.gradient_accumulation_steps()
        for _ in range(accum):
            batch = next(self.loader)
            scale = None
            if batch.step_loss_tokens is not None:
                scale = batch.loss_tokens * accum * dist.get_world_size() / batch.step_loss_tokens
            if self.objective is not None:
                loss, batch_sums = self.objective(self.engine, batch, self._tensor)
                sums = batch_sums if sums is None else sums + batch_sums
            else:
                targets = batch.targets
                if scale is not None and batch.loss_tokens == 0:  # a finite loss to scale by 0 (module docstring)
                    targets = batch.targets.copy()
                    targets[0, 0] = 0
                loss = self.engine(self._tensor(batch.inputs), doc_ids=self._tensor(batch.doc_ids()),
                                   targets=self._tensor(targets))
            if scale is not None:
                loss = loss * scale
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
            tokens += batch.inputs.size
        loss = torch.stack(losses).mean()
        dist.all_reduce(loss)
        extra = {}
        if sums is not None:
            dist.all_reduce(sums)
            extra = self.objective.means(sums)
        self.step += 1
        step_tokens = tokens * dist.get_world_size()  # every rank reads batches of the same shape
        self.tokens_seen += step_tokens
        grad_norm = self.engine.get_global_grad_norm()
        return StepMetrics(step=self.step, loss=loss.item() / dist.get_world_size(), lr=lr,
                           grad_norm=None if grad_norm is None else float(grad_norm), tokens=step_tokens,
                           tokens_seen=self.tokens_seen, seconds=time.perf_counter() - began,
                           applied=self.engine.was_step_applied(), extra=extra)

    def request_stop(self) -> None:
        """Stop after the current step, with a checkpoint (safe to call from a signal handler)."""
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype=torch.long, non_blocking=True)


def first_nonfinite(module: torch.nn.Module, device: torch.device) -> str | None:
    """The name of the first parameter that holds NaN or inf on any rank, or None; all ranks must call it
    (``device``: the one collectives run on). Under ZeRO-3 each rank looks at its own partition
    (``ds_tensor``), so nothing is gathered."""
    names, finite = [], []
    for name, param in module.named_parameters():
        names.append(name)
        finite.append(torch.isfinite(getattr(param, "ds_tensor", param).detach()).all().to(device))
    flags = torch.stack(finite).tolist() if finite else []
    first = torch.tensor([next((i for i, ok in enumerate(flags) if not ok), len(names))], device=device)
    if dist.is_initialized():
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    index = int(first.item())
    return names[index] if index < len(names) else None
