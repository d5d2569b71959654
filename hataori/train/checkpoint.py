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
checkpoint is damaged stops rather than start again from step 0. ``hataori checkpoint verify RUN``
checks a run's checkpoints without loading them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hataori.config import require
from hataori.errors import HataoriError, InputError
from hataori.fsutil import atomic_path, atomic_write_text, fsync_dir
from hataori.train.layout import CHECKPOINTS, COMPLETE, complete_steps, tag

INCOMPLETE_SUFFIX = ".incomplete"
DAMAGED_SUFFIX = ".damaged"
DELETING_PREFIX = ".deleting-"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
CHUNK_BYTES = 16 << 20
LORA_BASE = "lora.base"
"""The manifest identity's key of a LoRA run's base fingerprint (the base its checkpoints leave out)."""


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


class CheckpointDamaged(HataoriError):
    """A checkpoint whose files do not match its manifest."""


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
            _save_file({"loader": loader_state, "rng": rng_state()}, partial / _rank_file(self.rank))
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
            if missing := [_rank_file(r) for r in range(self.world_size) if _rank_file(r) not in files]:
                raise HataoriError(f"{partial}: {', '.join(missing)} written but not found; all ranks must see the "
                                   "same run folder (one machine, or a shared filesystem)")
            manifest = {"format": MANIFEST_FORMAT, "step": step, "world_size": self.world_size,
                        "identity": self.identity, "files": dict(sorted(files.items()))}
            manifest["crc32"] = _crc_of(manifest)
            try:
                atomic_write_text(partial / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            except OSError as err:
                raise _write_error(partial, err) from err
            if final.exists():
                _delete(final)
            os.replace(partial, final)
            fsync_dir(self.folder)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        # The newest checkpoint was checksummed as it was completed, so keep_last >= 1 always keeps one
        # verified checkpoint; set-aside (.damaged) folders are never touched.
        for step in self.complete_steps()[:-self.cfg.keep_last]:
            _delete(self.folder / tag(step))

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
            raise CheckpointDamaged(f"{self.folder}: no checkpoint verifies; set aside as damaged: {', '.join(damaged)}. "
                                    "Run `hataori checkpoint verify` on the run for details; to train again from "
                                    "step 0 in this folder set checkpoint.resume=false")
        return None

    def load(self, step: int) -> Resumed:
        """Restore engine, scheduler, RNG and this rank's loader state from checkpoint ``step``; a
        checkpoint of another world size is resharded (:mod:`hataori.train.reshard`)."""
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
            from hataori.train.reshard import load_resharded  # cycle: reshard imports weights, which imports this

            if self.rank == 0:
                print(f"{path} was saved by {saved_world} processes; resharding it onto {self.world_size}", flush=True)
            client_state = load_resharded(self.engine, path, saved_world, module_loader=self.module_loader(path))
        # The loader state is the same on every rank; a rank the saving run did not have takes rank 0's.
        rank_state = torch.load(path / _rank_file(self.rank if self.rank < saved_world else 0), weights_only=False)
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


# ----------------------------------------------------------------------------- manifests


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (all ranks call it)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def remove_incomplete(folder: Path) -> list[Path]:
    """Delete the folders and files that saves or deletions killed part-way left in ``folder``."""
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            # .incomplete saves, .deleting- folders and temporary files all end up here.
            if not (path.name.endswith(INCOMPLETE_SUFFIX) or path.name.startswith(".")):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_identity(path: Path, manifest: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse to resume checkpoint ``path`` (its ``manifest``) in a run whose ``identity`` differs, saying how."""
    saved = manifest.get("identity", {})
    differences = [f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}"
                   for key, value in identity.items() if saved.get(key, value) != value]
    if differences:
        raise HataoriError(f"{path} was saved by a run that differs from this one:\n  " + "\n  ".join(differences)
                           + "\nresume with the run's own config, or start a new run in another run_dir")


def checksum(path: Path, *, sync: bool = True) -> dict[str, Any]:
    """Size and CRC-32 of a file as read back, after an fsync of it unless not ``sync`` (its data
    reaches the disk, or the shared filesystem, before the checkpoint is marked complete)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while chunk := f.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint folder ``path``; :class:`CheckpointDamaged` if missing or unreadable."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointDamaged(f"{path / MANIFEST}: missing (a checkpoint is complete only with its manifest; one "
                                "saved before checkpoints had manifests is adopted by `hataori checkpoint verify RUN "
                                "--adopt`)") from None
    except (OSError, ValueError) as err:
        raise CheckpointDamaged(f"{path / MANIFEST}: damaged, unreadable ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointDamaged(f"{path / MANIFEST}: damaged, or not a checkpoint manifest of format {MANIFEST_FORMAT}")
    if manifest.get("crc32") != _crc_of(manifest):
        raise CheckpointDamaged(f"{path / MANIFEST}: damaged, its own checksum does not match")
    return manifest


def _crc_of(manifest: dict[str, Any]) -> str:
    """The checksum a manifest carries of itself: of its canonical JSON without that field."""
    body = json.dumps({k: v for k, v in manifest.items() if k != "crc32"}, sort_keys=True)
    return f"{zlib.crc32(body.encode()):08x}"


def verify_files(path: Path, manifest: dict[str, Any], names: list[str]) -> list[str]:
    """Problems of the files ``names`` of checkpoint ``path`` against ``manifest`` (sizes first, then checksums)."""
    problems = []
    for name in names:
        expected, file = manifest["files"][name], path / name
        try:
            size = file.stat().st_size
            if size != expected["bytes"]:
                problems.append(f"{file}: {size:,} bytes, the manifest says {expected['bytes']:,}")
            elif (found := checksum(file, sync=False))["crc32"] != expected["crc32"]:
                problems.append(f"{file}: checksum {found['crc32']}, the manifest says {expected['crc32']} "
                                "(the file was changed after it was written)")
        except FileNotFoundError:
            problems.append(f"{file}: missing")
        except OSError as err:
            problems.append(f"{file}: unreadable ({err})")
    return problems


def verify(path: str | os.PathLike) -> list[str]:
    """Problems of one checkpoint folder (an empty list: every file matches its manifest). One process."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except CheckpointDamaged as err:
        return [str(err)]
    return verify_files(path, manifest, sorted(manifest["files"]))


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the complete namespace, keeping every byte; the new path."""
    aside = path.with_name(path.name + DAMAGED_SUFFIX)
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{n}")
    os.replace(path, aside)
    return aside


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


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


RANKED_FILES = (re.compile(r"^rank_(?P<rank>\d{5})\.pt$"),
                re.compile(r"^(?P<bf16>bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_00_optim_states\.pt$"),
                re.compile(r"^(?P<bf16>bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_00_model_states\.pt$"))
"""The files a checkpoint holds one of per process: hataori's loader and RNG state, and DeepSpeed's ZeRO
optimizer and ZeRO-3 model states."""


def missing_rank_files(path: Path, world_size: int) -> list[str]:
    """The per-process files that ``path``, a checkpoint of ``world_size`` processes, lacks: each rank's of
    every kind it holds one of."""
    missing = []
    for pattern in RANKED_FILES:
        found = {int(m["rank"]): m for p in path.iterdir() if (m := pattern.match(p.name))}
        if not found:
            continue
        example = next(iter(found.values()))
        for rank in sorted(set(range(world_size)) - set(found)):
            digits = f"{rank:05d}" if len(example["rank"]) == 5 and pattern is RANKED_FILES[0] else str(rank)
            missing.append(example.string[:example.start("rank")] + digits + example.string[example.end("rank"):])
    return missing


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


# ----------------------------------------------------------------------------- hataori checkpoint verify


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run folder (its checkpoints/ are checked) or one step_N folder")
    parser.add_argument("--adopt", action="store_true",
                        help="write a manifest for complete checkpoints that have none (saved before checkpoints had "
                             "manifests), trusting their files as they are now")


def adopt(path: Path) -> None:
    """Write the manifest of a checkpoint saved without one, from its files as they are now."""
    from hataori.train.weights import CheckpointWeights  # cycle: weights imports checkpoint

    world_size = CheckpointWeights(path).client_state.get("world_size")
    if world_size is None:
        raise InputError(path, "records no world size; it is not a checkpoint hataori saved")
    missing = missing_rank_files(path, world_size)
    if missing:
        raise InputError(path, f"was saved by {world_size} processes but has no {', '.join(missing[:4])}"
                         f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}: a manifest would vouch for a "
                         "checkpoint that cannot be resumed; restore the files, or move the folder away so that "
                         "resuming falls back to the checkpoint before it")
    files = {str(p.relative_to(path)): checksum(p) for p in sorted(path.rglob("*")) if p.is_file()}
    manifest = {"format": MANIFEST_FORMAT, "step": int(COMPLETE.match(path.name).group(1)), "world_size": world_size,
                "identity": {}, "files": files}
    manifest["crc32"] = _crc_of(manifest)
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def main(args: argparse.Namespace) -> int:
    import time

    run = Path(args.run)
    if run.name.startswith("step_"):
        paths = [run]
    else:
        folder = run / CHECKPOINTS
        if not folder.is_dir():
            raise InputError(run, "no checkpoints/ folder here; pass a run folder or a checkpoints/step_N folder")
        # Complete and set-aside checkpoints; not a save in progress (.incomplete).
        paths = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_")
                       and not p.name.endswith(INCOMPLETE_SUFFIX))
        if not paths:
            raise InputError(folder, "holds no checkpoint")
    bad = aside = 0
    for path in paths:
        complete = bool(COMPLETE.match(path.name))
        if args.adopt and complete and not (path / MANIFEST).exists():
            adopt(path)
            print(f"{path}: had no manifest; one was written from its files as they are now")
        began = time.perf_counter()
        problems = verify(path)
        seconds = time.perf_counter() - began
        if problems:
            bad += complete
            aside += not complete
            print(f"{path}: DAMAGED" + ("" if complete else " (set aside)")
                  + "".join(f"\n  {problem}" for problem in problems))
            continue
        files = read_manifest(path)["files"]
        size = sum(entry["bytes"] for entry in files.values())
        note = "" if complete else " (set aside; rename it to step_N to use it again)"
        print(f"{path}: verified, {len(files)} files, {size / 1e6:,.1f} MB in {seconds:.2f} s{note}")
    checked = sum(bool(COMPLETE.match(p.name)) for p in paths)
    print(f"{checked - bad} of {checked} checkpoints verified" + (f"; {aside} set aside as damaged" if aside else ""))
    return 1 if bad else 0
