"""Training checkpoints: complete or absent, the last few kept, the latest found on restart.

A checkpoint is the folder ``<folder>/step_<8 digits>``. It holds what DeepSpeed's
``save_checkpoint`` writes (model, optimizer and LR scheduler state, sharded by ZeRO, plus the
client state: step, tokens seen, world size) and one ``rank_<5 digits>.pt`` per process with that
rank's data-loader state and random number generator states (python, numpy, torch, CUDA).

Writing is atomic at the folder level. Every rank writes into ``step_<N>.incomplete``; after a
barrier, the ranks read back what was written and checksum it (each rank a share of the files),
rank 0 writes ``manifest.json`` (every file's size and CRC-32, the world size and the run's
identity) and renames the folder to ``step_<N>``. A folder with the final name is therefore
complete, and one killed part-way keeps the ``.incomplete`` name, is never loaded, and is deleted
on the next start. Older checkpoints beyond ``keep_last`` are deleted only after a newer one is
complete and checksummed, by first renaming them out of the ``step_<N>`` namespace, so a kill
during deletion leaves nothing that looks complete. All ranks must see the same folder (one
machine, or a shared filesystem).

Resuming verifies before it loads. The latest checkpoint's files are checked against its manifest
(sizes, then checksums, the ranks sharing the reading); a damaged one (a file truncated, emptied,
deleted or changed, or no manifest) is reported by path and file, set aside as
``step_<N>.damaged`` (never deleted) and the previous checkpoint is tried. A run whose every
checkpoint is damaged stops rather than start again from step 0. The manifests are
:mod:`hataori.checkpoint.manifest`'s; ``hataori checkpoint verify RUN`` (:mod:`hataori.checkpoint.verify`)
checks a run's checkpoints without loading them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hataori.checkpoint.layout import complete_steps, tag
from hataori.checkpoint.manifest import (DAMAGED_SUFFIX, INCOMPLETE_SUFFIX, MANIFEST, MANIFEST_FORMAT,
                                         CheckpointDamaged, check_identity, checksum, crc_of, delete_checkpoint,
                                         rank_file, read_manifest, remove_incomplete, set_aside, verify_files)
from hataori.checkpoint.reshard import load_resharded
from hataori.config import require
from hataori.errors import HataoriError
from hataori.fsutil import atomic_path, atomic_write_text, fsync_dir


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


class Checkpointer:
    """Saves and restores a DeepSpeed engine, the loader state and RNG states under ``folder``.

    ``identity`` (JSON-ready, e.g. the model's shape and the tokenizer's fingerprint) is recorded in
    every manifest; resuming with a different one is refused with what differs. With ``frozen``
    the parameters that do not train (a LoRA run's base) are left out of the checkpoint, and a
    resumed run keeps the values it already holds for them.
    """

    def __init__(self, cfg: CheckpointConfig, folder: str | os.PathLike, engine: Any,
                 identity: dict[str, Any] | None = None, *, frozen: bool = False):
        self.cfg = cfg
        self.folder = Path(folder)
        self.engine = engine
        self.identity = identity or {}
        self.frozen = frozen
        if frozen:
            _leave_out_frozen(engine)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    # ------------------------------------------------------------------ saving

    def due(self, step: int, *, last: bool) -> bool:
        """Whether to save after ``step`` optimizer steps (``last``: training has ended)."""
        return last or step % self.cfg.every_steps == 0

    def save(self, step: int, *, loader_state: Any, client_state: dict[str, Any] | None = None) -> Path:
        """Save a complete, checksummed checkpoint of ``step``; all ranks must call it. Returns its folder."""
        final = self.folder / tag(step)
        partial = self.folder / (tag(step) + INCOMPLETE_SUFFIX)
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
        dist.barrier()
        state = {"step": step, "world_size": self.world_size, **(client_state or {})}
        try:
            self.engine.save_checkpoint(str(self.folder), tag=partial.name, client_state=state, save_latest=False,
                                        exclude_frozen_parameters=self.frozen)
            _save_file({"loader": loader_state, "rng": rng_state()}, partial / rank_file(self.rank))
        except dist.DistError:
            raise  # a failed collective is not a failed write
        except (OSError, RuntimeError) as err:
            raise _write_error(partial, err) from err
        dist.barrier()
        # Every rank's view of the folder: on a shared filesystem one node's listing may lag another's.
        seen = [None] * self.world_size
        dist.all_gather_object(seen, [str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file()])
        names = sorted(set().union(*seen))
        try:
            sums = {name: checksum(partial / name) for name in self._share(names)}
        except OSError as err:
            raise _write_error(partial, err) from err
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(sums, gathered, dst=0)
        if self.rank == 0:
            files = {name: found[name] for found in gathered for name in found}
            if missing := [rank_file(r) for r in range(self.world_size) if rank_file(r) not in files]:
                raise HataoriError(f"{partial}: {', '.join(missing)} written but not found; all ranks must see the "
                                   "same run folder (one machine, or a shared filesystem)")
            manifest = {"format": MANIFEST_FORMAT, "step": step, "world_size": self.world_size,
                        "identity": self.identity, "files": dict(sorted(files.items()))}
            manifest["crc32"] = crc_of(manifest)
            try:
                atomic_write_text(partial / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            except OSError as err:
                raise _write_error(partial, err) from err
            if final.exists():
                delete_checkpoint(final)
            os.replace(partial, final)
            fsync_dir(self.folder)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        # The newest checkpoint was checksummed as it was completed, so keep_last >= 1 always keeps one
        # verified checkpoint; set-aside (.damaged) folders are never touched.
        for step in self.complete_steps()[:-self.cfg.keep_last]:
            delete_checkpoint(self.folder / tag(step))

    # ------------------------------------------------------------------ finding and loading

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints in the folder, oldest first."""
        return complete_steps(self.folder)

    def remove_incomplete(self) -> list[Path]:
        """Delete what a save or a deletion killed part-way left (rank 0 only)."""
        return remove_incomplete(self.folder) if self.rank == 0 else []

    def latest(self) -> int | None:
        """The step of the latest complete checkpoint, as rank 0 sees it, on every rank."""
        steps = self.complete_steps() if self.rank == 0 else []
        return broadcast(steps[-1] if steps else None)

    def resume(self) -> Resumed | None:
        """Clean up interrupted saves, then load the latest checkpoint that verifies, setting damaged
        ones aside (all ranks). None if the folder holds no checkpoint."""
        self.remove_incomplete()
        dist.barrier()
        while (step := self.latest()) is not None:
            path = self.folder / tag(step)
            problems = self._verify(path)
            if not problems:
                return self.load(step)
            if self.rank == 0:
                aside = set_aside(path)
                print(f"checkpoint {path} is damaged and was set aside as {aside.name}:\n  "
                      + "\n  ".join(problems) + "\ntrying the previous checkpoint", flush=True)
            dist.barrier()
        damaged = broadcast(sorted(p.name for p in self.folder.glob(f"step_*{DAMAGED_SUFFIX}*"))
                                  if self.rank == 0 and self.folder.is_dir() else [])
        if damaged:
            raise CheckpointDamaged(f"{self.folder}: no checkpoint verifies; set aside as damaged: "
                                    f"{', '.join(damaged)}. "
                                    "Run `hataori checkpoint verify` on the run for details; to train again from "
                                    "step 0 in this folder set checkpoint.resume=false")
        return None

    def load(self, step: int) -> Resumed:
        """Restore engine, scheduler, RNG and this rank's loader state from checkpoint ``step``; a
        checkpoint of another world size is resharded (:mod:`hataori.checkpoint.reshard`)."""
        path = self.folder / tag(step)
        manifest = self._manifest(path)
        if isinstance(manifest, str):
            raise CheckpointDamaged(manifest)
        check_identity(path, manifest, self.identity)
        saved_world = manifest["world_size"]
        if saved_world == self.world_size:
            load_path, client_state = self.engine.load_checkpoint(str(self.folder), tag=path.name,
                                                                  load_optimizer_states=True,
                                                                  load_lr_scheduler_states=True,
                                                                  custom_load_fn=self.module_loader(path))
            if load_path is None:
                raise CheckpointDamaged(f"{path}: DeepSpeed found no checkpoint to load here")
        else:
            if self.rank == 0:
                print(f"{path} was saved by {saved_world} processes; resharding it onto {self.world_size}", flush=True)
            client_state = load_resharded(self.engine, path, saved_world, module_loader=self.module_loader(path))
        # The loader state is the same on every rank; a rank the saving run did not have takes rank 0's.
        rank_state = torch.load(path / rank_file(self.rank if self.rank < saved_world else 0), weights_only=False)
        set_rng_state(rank_state["rng"])
        return Resumed(step=step, path=path, client_state=client_state, loader_state=rank_state["loader"])

    def module_loader(self, path: Path):
        """None (DeepSpeed's strict load of the module's state) or, with ``frozen``, DeepSpeed's
        ``custom_load_fn`` that loads what the checkpoint holds and checks it is what trains."""
        if not self.frozen:
            return None

        def load(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
            trained = {name for name, p in dst.named_parameters() if p.requires_grad}
            missing, unexpected = dst.load_state_dict(src, strict=False)
            lacking = sorted(trained & set(missing))
            if lacking or unexpected:
                raise HataoriError(f"{path} does not hold what this run trains: "
                                   + (f"missing {', '.join(lacking[:4])}" if lacking else "")
                                   + (f" unexpected {', '.join(sorted(unexpected)[:4])}" if unexpected else "")
                                   + "; resume with the run's own lora settings")
        return load

    def _verify(self, path: Path) -> list[str]:
        """Problems of checkpoint ``path`` against its manifest, the ranks sharing the reading (all ranks)."""
        manifest = self._manifest(path)
        if isinstance(manifest, str):
            return [manifest]
        names = sorted(manifest["files"])
        problems = verify_files(path, manifest, self._share(names))
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, problems)
        return [problem for found in gathered for problem in found]

    def _manifest(self, path: Path) -> dict[str, Any] | str:
        """The manifest of ``path`` as rank 0 reads it, or why it cannot be read, on every rank."""
        if self.rank == 0:
            try:
                found: dict[str, Any] | str = read_manifest(path)
            except CheckpointDamaged as err:
                found = str(err)
        return broadcast(found if self.rank == 0 else None)

    def _share(self, names: list[str]) -> list[str]:
        return names[self.rank::self.world_size]



def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (all ranks call it)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _leave_out_frozen(engine: Any) -> None:
    """Make ``engine`` leave every frozen parameter out of the module state it saves. DeepSpeed's
    ``exclude_frozen_parameters`` drops the names ``named_parameters()`` gives, which names a tied
    parameter once: the other name (``lm_head.weight`` beside ``tok_embeddings.weight``) stayed and
    saved the whole frozen matrix."""
    module_state_dict = engine.module_state_dict

    def without_frozen(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        state = module_state_dict(*args, **kwargs)
        for name, param in engine.module.named_parameters(remove_duplicate=False):
            if not param.requires_grad:
                state.pop(name, None)
        return state

    engine.module_state_dict = without_frozen



def _write_error(partial: Path, err: Exception) -> HataoriError:
    """A failed save as a message naming the checkpoint and the free space (a full disk reaches
    torch.save as a bare ``basic_ios::clear`` RuntimeError)."""
    free = shutil.disk_usage(partial.parent).free if partial.parent.exists() else 0
    return HataoriError(f"{partial}: writing the checkpoint failed ({err}); {free:,} bytes free on that filesystem. "
                        "The incomplete folder is removed on the next start and earlier checkpoints are intact; "
                        "if the disk is full, free space (or set checkpoint.keep_last lower), then launch again to "
                        "resume")


# ----------------------------------------------------------------------------- RNG


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's generator states: python, numpy, torch CPU and (where present) its CUDA device's."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's device only: a resumed run may have fewer per machine
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- files


def _save_file(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

