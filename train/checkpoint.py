"""Training checkpoints: complete or absent, the last few kept, the latest found on restart.

A checkpoint is the folder ``<folder>/step_<8 digits>``. It holds what DeepSpeed's
``save_checkpoint`` writes (model, optimizer and LR scheduler state, sharded by ZeRO, plus the
client state: step, tokens seen, world size) and one ``rank_<5 digits>.pt`` per process with that
rank's data-loader state and random number generator states (python, numpy, torch, CUDA).

Writing is atomic at the folder level. Every rank writes into ``step_<N>.incomplete``; after a
barrier, rank 0 renames it to ``step_<N>``. A folder with the final name is therefore complete, and
one killed part-way keeps the ``.incomplete`` name, is never loaded, and is deleted on the next
start. Older checkpoints beyond ``keep_last`` are deleted only after a newer one is complete, by
first renaming them out of the ``step_<N>`` namespace, so a kill during deletion leaves nothing
that looks complete. All ranks must see the same folder (one machine, or a shared filesystem).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hataori.config import require
from hataori.fsutil import atomic_path

COMPLETE = re.compile(r"^step_(\d{8})$")
INCOMPLETE_SUFFIX = ".incomplete"
DELETING_PREFIX = ".deleting-"


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_steps: int = 1000
    """Save after every this many optimizer steps (and always after the last step)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: bool = True
    """Continue from the latest complete checkpoint in the run folder, if there is one."""

    def __post_init__(self) -> None:
        require(self.every_steps >= 1, "every_steps", f"must be >= 1, got {self.every_steps}")
        require(self.keep_last >= 1, "keep_last", f"must keep at least one checkpoint, got {self.keep_last}")


@dataclass(slots=True)
class Resumed:
    """What a loaded checkpoint hands back to the training loop."""

    step: int
    """Optimizer steps completed when it was saved."""
    path: Path
    client_state: dict[str, Any] = field(default_factory=dict)
    """The client state saved with it (step, tokens_seen, world_size and the caller's extras)."""
    loader_state: Any = None
    """This rank's data-loader state dict."""


def complete_steps(folder: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := COMPLETE.match(p.name)) and p.is_dir())


def tag(step: int) -> str:
    """The folder name of the complete checkpoint after ``step`` optimizer steps."""
    return f"step_{step:08d}"


class Checkpointer:
    """Saves and restores a DeepSpeed engine, the loader state and RNG states under ``folder``."""

    def __init__(self, cfg: CheckpointConfig, folder: str | os.PathLike, engine: Any):
        self.cfg = cfg
        self.folder = Path(folder)
        self.engine = engine
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    # ------------------------------------------------------------------ saving

    def due(self, step: int, *, last: bool) -> bool:
        """Whether to save after ``step`` optimizer steps (``last``: training has ended)."""
        return last or step % self.cfg.every_steps == 0

    def save(self, step: int, *, loader_state: Any, client_state: dict[str, Any] | None = None) -> Path:
        """Save a complete checkpoint of ``step``; all ranks must call it. Returns its folder."""
        final = self.folder / tag(step)
        partial = self.folder / (tag(step) + INCOMPLETE_SUFFIX)
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
        dist.barrier()
        state = {"step": step, "world_size": self.world_size, **(client_state or {})}
        self.engine.save_checkpoint(str(self.folder), tag=partial.name, client_state=state, save_latest=False)
        _save_file({"loader": loader_state, "rng": rng_state()}, partial / _rank_file(self.rank))
        dist.barrier()
        if self.rank == 0:
            if final.exists():
                _delete(final)
            os.replace(partial, final)
            _fsync_dir(self.folder)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        for step in self.complete_steps()[:-self.cfg.keep_last]:
            _delete(self.folder / tag(step))

    # ------------------------------------------------------------------ finding and loading

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints in the folder, oldest first."""
        return complete_steps(self.folder)

    def remove_incomplete(self) -> list[Path]:
        """Delete folders left by a save or a deletion that was killed part-way (rank 0 only)."""
        removed = []
        if self.rank == 0 and self.folder.is_dir():
            for path in self.folder.iterdir():
                # .incomplete saves, .deleting- folders and temporary files all end up here.
                if not (path.name.endswith(INCOMPLETE_SUFFIX) or path.name.startswith(".")):
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def latest(self) -> int | None:
        """The step of the latest complete checkpoint, as rank 0 sees it, on every rank."""
        steps = self.complete_steps() if self.rank == 0 else []
        found = [steps[-1] if steps else None]
        dist.broadcast_object_list(found, src=0)
        return found[0]

    def resume(self) -> Resumed | None:
        """Clean up interrupted saves and load the latest complete checkpoint, if any (all ranks)."""
        self.remove_incomplete()
        dist.barrier()
        step = self.latest()
        if step is None:
            return None
        return self.load(step)

    def load(self, step: int) -> Resumed:
        """Restore engine, scheduler, RNG and this rank's loader state from checkpoint ``step``."""
        path = self.folder / tag(step)
        load_path, client_state = self.engine.load_checkpoint(str(self.folder), tag=path.name,
                                                              load_optimizer_states=True,
                                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        saved_world = client_state.get("world_size")
        if saved_world != self.world_size:
            raise RuntimeError(f"{path} was saved by {saved_world} processes, this run has {self.world_size}; "
                               "resuming on a different number of processes is not supported")
        rank_state = torch.load(path / _rank_file(self.rank), weights_only=False)
        set_rng_state(rank_state["rng"])
        return Resumed(step=step, path=path, client_state=client_state, loader_state=rank_state["loader"])


# ----------------------------------------------------------------------------- RNG


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's generator states: python, numpy, torch CPU and (where present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- files


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _save_file(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def _delete(path: Path) -> None:
    """Remove a checkpoint folder, renaming it out of the complete namespace first."""
    doomed = path.with_name(f"{DELETING_PREFIX}{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
