"""Training logs: console lines, TensorBoard scalars and ``metrics.jsonl``, all written by rank 0.

Every ``logging.every_steps`` steps (and at the last step) one console line and these scalars,
averaged over the steps since the previous log where they vary per step:

==================  =================================================================================
train/loss          mean training loss (nats per token) of the steps since the last log
train/lr            learning rate of the last step
train/grad_norm     mean global gradient norm before clipping
perf/tokens_per_s   tokens over the steps' wall time (validation and checkpoints excluded), all ranks
perf/mfu            model FLOPs utilisation: ``flops_per_token * tokens_per_s / (peak * world_size)``;
                    only on GPUs of known peak (:data:`PEAK_FLOPS`) training in bf16 or fp16
mem/max_allocated   GPU: ``torch.cuda.max_memory_allocated`` of rank 0, in GiB
mem/rss             CPU: resident memory of rank 0's process, in GiB
==================  =================================================================================

Each validation adds ``val/loss`` (nats per token) and ``val/bpc`` (bits per character), and
each eval task run at it (``validation.tasks``) ``eval/NAME/acc`` and ``eval/NAME/acc_norm``
(NAME: the task's, or the name given it), a console line, and its full results, per-choice
log-likelihoods included, in ``eval/NAME-step_N.json`` in the run folder (the format of
``hataori eval --output``). ``metrics.jsonl`` in the run folder holds one record per step
(``{"kind": "train", "step": ...}`` with the step's own loss, learning rate, gradient norm, tokens
and seconds), per validation (``"kind": "val"``) and per eval task run (``"kind": "eval"``: name,
task, template, shots, seed, examples, acc, acc_norm, seconds). A resumed run drops the records
after the step it resumes from, and its TensorBoard writer hides the events after that step
(``purge_step``), so both read like one run; the results files of those steps are replaced when
the steps run again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hataori.checkpoint.layout import EVAL_DIR, METRICS_FILE, tag
from hataori.config import require
from hataori.eval.runner import summary
from hataori.fsutil import atomic_write_text
from hataori.train.trainer import StepMetrics
from hataori.train.validate import ValResult

"""The folder of the eval tasks' results files, in the run folder."""

PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
)
"""Dense bf16/fp16 tensor-core peak FLOP/s by GPU name (first match wins; the vendors' data sheets)."""


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Peak FLOP/s of one device at ``precision``, or None where it is not known (CPUs, fp32, other GPUs)."""
    if device_name is None or precision not in ("bf16", "fp16"):
        return None
    for name, flops in PEAK_FLOPS:
        if name in device_name:
            return flops
    return None


def memory_scalar() -> tuple[str, float]:
    """GPU: peak allocated memory; CPU: this process's resident set size (both GiB)."""
    if torch.cuda.is_available():
        return "mem/max_allocated", torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return "mem/rss", pages * os.sysconf("SC_PAGE_SIZE") / 2**30


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """Console lines and TensorBoard scalars (written by rank 0)."""

    every_steps: int = 10
    """Log the training scalars, averaged over the steps since the last log, every this many steps."""
    tensorboard_dir: str = "tensorboard"
    """TensorBoard event folder, relative to run_dir (or absolute); empty: no TensorBoard."""

    def __post_init__(self) -> None:
        require(self.every_steps >= 1, "every_steps", f"must be >= 1, got {self.every_steps}")


class MetricsLogger:
    """Rank 0's console, TensorBoard and JSONL logs; on other ranks every method does nothing."""

    def __init__(self, cfg: LoggingConfig, run_dir: str | Path, *, is_main: bool, max_steps: int,
                 flops_per_token: int, peak_flops_total: float | None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.max_steps = max_steps
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total
        self.writer = None
        self._window: list[StepMetrics] = []

    def start(self, step: int) -> None:
        """Open the logs for a launch that starts after ``step`` optimizer steps."""
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / METRICS_FILE
        if metrics.is_file():  # drop what a killed launch logged after its last checkpoint
            kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                    if line.endswith("}") and json.loads(line)["step"] <= step]  # a kill may cut the last line
            atomic_write_text(metrics, "".join(line + "\n" for line in kept))
        if self.cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / self.cfg.tensorboard_dir),
                                        purge_step=step + 1 if step > 0 else None)

    def step(self, m: StepMetrics) -> None:
        """Record one optimizer step; log the window when due."""
        if not self.is_main:
            return
        self._append({"kind": "train", "step": m.step, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm,
                      "tokens": m.tokens, "tokens_seen": m.tokens_seen, "seconds": m.seconds, **m.extra})
        self._window.append(m)
        if m.step % self.cfg.every_steps == 0 or m.step == self.max_steps:
            self._log_window()

    def validation(self, step: int, result: ValResult) -> None:
        if not self.is_main:
            return
        self._append({"kind": "val", "step": step, "loss": result.loss, "bpc": result.bpc, "nll": result.nll,
                      "tokens": result.tokens, "chars": result.chars, "documents": result.documents,
                      "seconds": result.seconds})
        self._scalars(step, {"val/loss": result.loss, "val/bpc": result.bpc})
        print(f"validation at step {step}: loss {result.loss:.4f} nats/token, {result.bpc:.4f} bits/char "
              f"({result.documents} documents, {result.tokens:,} tokens, {result.chars:,} chars, "
              f"{result.seconds:.1f} s)", flush=True)

    def eval_task(self, step: int, results: dict) -> None:
        """Log one eval task's results at the validation after ``step`` (:class:`hataori.train.validate.EvalTasks`)."""
        if not self.is_main:
            return
        name, scores = results["name"], results["scores"]
        atomic_write_text(self.run_dir / EVAL_DIR / f"{name}-{tag(step)}.json",
                          json.dumps(results, ensure_ascii=False, indent=1) + "\n")
        self._append({"kind": "eval", "step": step, "name": name, "task": results["task"],
                      "template": results["template"], "shots": results["shots"], "seed": results["seed"],
                      "examples": results["counts"]["examples"], **scores, "seconds": results["seconds"]})
        self._scalars(step, {f"eval/{name}/{score}": value for score, value in scores.items()
                             if value is not None})  # an undefined correlation has no scalar
        print(f"eval at step {step}: {summary(results)}, {results['seconds']:.1f} s", flush=True)

    def close(self) -> None:
        """Log the steps since the last log (a launch may stop between logs) and close TensorBoard."""
        if self._window:
            self._log_window()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _log_window(self) -> None:
        window, self._window = self._window, []
        last = window[-1]
        seconds = sum(m.seconds for m in window)
        tokens_per_s = sum(m.tokens for m in window) / seconds if seconds > 0 else 0.0
        norms = [m.grad_norm for m in window if m.grad_norm is not None]
        scalars = {"train/loss": sum(m.loss for m in window) / len(window), "train/lr": last.lr,
                   "perf/tokens_per_s": tokens_per_s}
        if norms:
            scalars["train/grad_norm"] = sum(norms) / len(norms)
        for name in window[-1].extra:
            scalars[f"train/{name}"] = sum(m.extra[name] for m in window) / len(window)
        if self.peak_flops_total:
            scalars["perf/mfu"] = self.flops_per_token * tokens_per_s / self.peak_flops_total
        mem_name, mem = memory_scalar()
        scalars[mem_name] = mem
        self._scalars(last.step, scalars)
        parts = [f"step {last.step}/{self.max_steps}", f"loss {scalars['train/loss']:.4f}", f"lr {last.lr:.3e}"]
        if norms:
            parts.append(f"grad_norm {scalars['train/grad_norm']:.3f}")
        if "rewards/accuracies" in last.extra:
            parts.append(f"reward acc {scalars['train/rewards/accuracies']:.3f} "
                         f"margin {scalars['train/rewards/margins']:.3f}")
        parts.append(f"{tokens_per_s:,.0f} tokens/s")
        if "perf/mfu" in scalars:
            parts.append(f"mfu {100 * scalars['perf/mfu']:.1f}%")
        parts.append(f"{mem_name.split('/')[1]} {mem:.2f} GiB")
        print(" | ".join(parts), flush=True)

    def _scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def _append(self, record: dict) -> None:
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
