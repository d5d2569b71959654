"""The training loop: optimizer steps of accumulated micro-batches through a DeepSpeed engine.

:class:`Trainer` only sequences what the other modules build::

    env = init_distributed()
    model = cfg.zero.build_model(cfg.model, env.device, seq_len=..., grad_clip=cfg.optim.grad_clip)
    optimizer = cfg.optim.build(model)
    scheduler = cfg.schedule.build(optimizer, total_steps=cfg.trainer.max_steps)
    engine = cfg.zero.build(model, optimizer, scheduler, seq_len=..., grad_clip=cfg.optim.grad_clip, run_dir=...)
    loader = cfg.data.build(engine.train_micro_batch_size_per_gpu(), env.rank, env.world_size)
    checkpointer = Checkpointer(cfg.checkpoint, run_dir / "checkpoints", engine)
    Trainer(cfg.trainer, engine=engine, loader=loader, checkpointer=checkpointer).fit()

One optimizer step is ``engine.gradient_accumulation_steps()`` micro-batches, each followed by
``engine.backward`` and ``engine.step`` (DeepSpeed updates, and steps the LR scheduler, on the
last). After each optimizer step the hooks receive a :class:`StepMetrics` (logging, TensorBoard and
validation plug in there), and a checkpoint is saved when due. ``fit`` resumes from the latest
complete checkpoint first when the checkpoint config asks for it, then calls the start hooks with
the step it starts from (0 for a fresh run). ``launch_steps`` ends a launch early, with a checkpoint.

:meth:`Trainer.request_stop` (e.g. from a signal handler) ends training after the current step
with a checkpoint; the request is shared between ranks at each step, so it may reach any of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist

from hataori.config import require
from hataori.train.checkpoint import Checkpointer


@dataclass(kw_only=True, slots=True)
class TrainerConfig:
    """How long to train."""

    max_steps: int
    """Optimizer steps of the whole run (the LR schedule's length)."""
    launch_steps: int = 0
    """Stop this launch after this many optimizer steps, with a checkpoint; the next launch resumes.
    For jobs shorter than the run. 0: train up to max_steps."""

    def __post_init__(self) -> None:
        require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        require(self.launch_steps >= 0, "launch_steps", f"must be >= 0 (0: no limit), got {self.launch_steps}")


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


class BatchLike(Protocol):
    """What the loader yields (:class:`hataori.train.data.Batch`)."""

    inputs: np.ndarray
    targets: np.ndarray

    def doc_ids(self) -> np.ndarray: ...


Hook = Callable[[StepMetrics], None]
StartHook = Callable[[int], None]


class Trainer:
    """Runs optimizer steps until ``max_steps``, saving checkpoints as configured."""

    def __init__(self, cfg: TrainerConfig, *, engine: Any, loader: Iterator[BatchLike], checkpointer: Checkpointer,
                 hooks: list[Hook] | tuple[Hook, ...] = (), start_hooks: list[StartHook] | tuple[StartHook, ...] = ()):
        self.cfg = cfg
        self.engine = engine
        self.loader = loader
        self.checkpointer = checkpointer
        self.hooks = list(hooks)
        self.start_hooks = list(start_hooks)
        self.device = engine.device
        self.step = 0
        self.tokens_seen = 0
        self._stop_requested = False

    def fit(self) -> int:
        """Train (resuming first if configured) and return the number of completed steps."""
        if self.checkpointer.cfg.resume:
            self.resume()
        for start_hook in self.start_hooks:
            start_hook(self.step)
        launched_at = self.step
        while self.step < self.cfg.max_steps:
            metrics = self.train_step()
            for hook in self.hooks:
                hook(metrics)
            stop = self._stop_agreed() or self.step - launched_at == self.cfg.launch_steps
            if self.checkpointer.due(self.step, last=stop or self.step == self.cfg.max_steps):
                self.save()
            if stop:
                break
        return self.step

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
        self.checkpointer.save(self.step, loader_state=self.loader.state_dict(),
                               client_state={"tokens_seen": self.tokens_seen})

    def train_step(self) -> StepMetrics:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        began = time.perf_counter()
        lr = self.engine.get_lr()[0]
        losses, tokens = [], 0
        for _ in range(self.engine.gradient_accumulation_steps()):
            batch = next(self.loader)
            loss = self.engine(self._tensor(batch.inputs), doc_ids=self._tensor(batch.doc_ids()),
                               targets=self._tensor(batch.targets))
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
            tokens += batch.inputs.size
        loss = torch.stack(losses).mean()
        dist.all_reduce(loss)
        self.step += 1
        step_tokens = tokens * dist.get_world_size()  # every rank reads batches of the same shape
        self.tokens_seen += step_tokens
        grad_norm = self.engine.get_global_grad_norm()
        return StepMetrics(step=self.step, loss=loss.item() / dist.get_world_size(), lr=lr,
                           grad_norm=None if grad_norm is None else float(grad_norm), tokens=step_tokens,
                           tokens_seen=self.tokens_seen, seconds=time.perf_counter() - began)

    def request_stop(self) -> None:
        """Stop after the current step, with a checkpoint (safe to call from a signal handler)."""
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype=torch.long, non_blocking=True)
