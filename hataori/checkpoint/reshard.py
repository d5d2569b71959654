"""Resume a checkpoint written by N processes on M processes: ZeRO stages 0-3, exactly.

DeepSpeed refuses to load ZeRO optimizer state into a different data-parallel world size
(``engine._load_zero_checkpoint`` raises ``ZeRORuntimeException``) unless the checkpoint is first
converted to its universal format. :func:`load_resharded` instead reads the N ranks' files as they
are and writes every value into an engine already built on M ranks, through DeepSpeed's own
fragment API (``deepspeed.utils.safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``),
which puts each rank's share of a whole tensor where that rank's partition keeps it.

What the N ranks' files hold, and where each value is read from:

* ZeRO stage 0: nothing is partitioned. ``mp_rank_00_model_states.pt`` holds the module, the whole
  optimizer state (the torch optimizer's, or for bf16/fp16 DeepSpeed's wrapper with its unsharded
  fp32 copy), the LR scheduler and the counters, so DeepSpeed's own ``load_checkpoint`` reads it on
  any number of processes and is what is used.
* ZeRO stages 1 and 2: each rank's ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` holds, for each
  parameter group, the rank's slice of the fp32 master weights as one flat tensor
  (``single_partition_of_fp32_groups``) and the torch optimizer's state dict over those flat tensors
  (``base_optimizer_state``: ``exp_avg`` and ``exp_avg_sq`` in the same flat layout, ``step`` a
  scalar, the param groups with their current ``lr``). ``param_slice_mappings`` says where in a
  rank's flat tensor each parameter's piece lies; a parameter's pieces in rank order make it whole.
* ZeRO stage 3: each rank's optim-states file holds ``fp32_flat_groups`` (one flat tensor per
  sub-group) and ``optimizer_state_dict`` (the torch state dict over them, same layout). Read as
  one flat tensor per rank, every parameter in the order of ``param_shapes`` owns
  ``ceil(numel / N)`` consecutive elements of each rank's (the last rank's padded).
* The model-states file (``mp_rank_00_model_states.pt``, or rank 0's
  ``zero_pp_rank_0_mp_rank_00_model_states.pt`` under ZeRO-3) holds ``param_shapes``, the LR
  scheduler's state, the engine's counters (``global_steps``, ``global_samples``,
  ``skipped_steps``) and the client state (step, tokens seen, world size).

For stages 1-3 the engine on M ranks gets, for every parameter: the fp32 master weight, every
partitioned optimizer state (``exp_avg``, ``exp_avg_sq``; any optimizer's, by shape), the
low-precision copy the module computes with (cast from the fp32 weight as DeepSpeed's own step
does); then the optimizer's scalar state (``step``) and param-group hyperparameters (``lr``...),
the fp16 loss scaler, the LR scheduler and the engine's counters. Values are read one parameter
at a time from memory-mapped files: each rank reads every parameter once (about 12 bytes a
parameter for fp32 weights and Adam's two moments, shared through the page cache by the ranks of a
machine) and holds one parameter whole at a time.

Why not DeepSpeed's universal checkpoint (``ds_to_universal``, then ``load_checkpoint`` with
``checkpoint.load_universal``): it works on the CPU with the client's torch AdamW for stages 1-3,
but it first rewrites the whole state as one folder per parameter (a second copy of the fp32
weights and moments, written by one process, outside the checksummed checkpoint folder), the
loading engine needs another DeepSpeed config, and in 0.19.8 its ZeRO-3 loader gives every param
group the first group's hyperparameters (``stage3._load_universal_checkpoint``): our ``no_decay``
group would resume with weight decay. This reads the checkpoint in place, converts nothing, and
restores each param group as saved.

Not covered: NVMe offload (the optimizer state lives in swap files), pipeline
or tensor parallelism (one model-parallel rank is assumed), and ZeRO's legacy
``elastic_checkpoint`` layout. Frozen parameters (a LoRA run's base) are not in the checkpoint
and keep the values the engine holds. CPU offload of the optimizer (and of ZeRO-3 parameters) reads and
writes through the same API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hataori.checkpoint.states import FP32, OPTIM_STATES, CheckpointWeights
from hataori.errors import HataoriError, InputError

ENGINE_KEYS = frozenset({"module", "optimizer", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
                         "global_steps", "dp_world_size", "mp_world_size"})
"""What ``engine.load_checkpoint`` keeps for itself; the rest of the saved dict is the client state."""
LOSS_SCALING = ("loss_scaler", "dynamic_loss_scale", "overflow")
"""The ZeRO optimizers' fp16 loss-scaling state, the same on every rank."""


def load_resharded(engine: Any, checkpoint_dir: str | Path, saved_world_size: int,
                   module_loader: Any = None) -> dict[str, Any]:
    """Load checkpoint folder ``checkpoint_dir``, written by ``saved_world_size`` processes, into
    ``engine`` (built as usual on any number of processes); all ranks must call it.

    Afterwards training continues as if it had run on this many processes all along: fp32 master
    weights, optimizer states and step, param-group hyperparameters, LR scheduler, loss scaler and
    the engine's step and sample counters are the saved ones. Returns the client state saved with
    the checkpoint (``step``, ``tokens_seen``... as ``engine.load_checkpoint`` returns it).
    ``module_loader`` is DeepSpeed's ``custom_load_fn`` for the stage-0 module state (stages 1-3
    set only the parameters that train: frozen ones keep the values they have).
    """
    folder = Path(checkpoint_dir)
    stage = engine.zero_optimization_stage()
    if stage == 0:
        if any(OPTIM_STATES.match(p.name) for p in folder.iterdir()):
            raise InputError(folder, "was saved with ZeRO stage 1-3 and this run uses stage 0; resume with the "
                             "checkpoint's ZeRO stage")
        return _load_unsharded(engine, folder, module_loader)
    if engine.zero_nvme_offload_optimizer():
        raise HataoriError(f"{folder}: resharding reads optimizer state into memory; NVMe offload keeps it in "
                           "swap files. Resume on the checkpoint's own world size, or offload to cpu")
    saved = _SavedState(folder, saved_world_size)
    _create_optimizer_state(engine, saved)
    _set_parameters(engine, saved, stage)
    for key in LOSS_SCALING:
        if key in saved.optim[0]:
            setattr(engine.optimizer, key, saved.optim[0][key])
    return _set_engine_state(engine, saved.states)


# ----------------------------------------------------------------------------- reading the N ranks' files


class _SavedState:
    """The ZeRO 1-3 state of a checkpoint folder written by ``world_size`` ranks (module docstring),
    read through :class:`~hataori.checkpoint.states.CheckpointWeights`: :attr:`keys` lists the partitioned
    optimizer states, :attr:`scalars` the optimizer's other per-group state (``step``),
    :attr:`param_groups` the saved param groups."""

    def __init__(self, folder: Path, world_size: int):
        self.path = folder
        self.weights = CheckpointWeights(folder)
        if len(self.weights.optim) != world_size:
            raise InputError(folder, f"expected the ZeRO optimizer states of {world_size} ranks, found "
                             f"{len(self.weights.optim)}; is it a ZeRO stage 1-3 checkpoint of {world_size} processes?")
        self.optim = self.weights.optim
        self.states = self.weights.states
        self.shapes = {name: torch.Size(shape) for name, shape in self.weights.shapes.items()}
        torch_states = self.weights.optimizer_states()
        if not isinstance(torch_states[0], dict):
            raise InputError(folder, "holds ZeRO's legacy elastic_checkpoint layout, which resharding does not "
                             "read; resume on the checkpoint's own world size")
        self.param_groups = torch_states[0]["param_groups"]
        first = torch_states[0]["state"]  # empty if saved before the first update
        template = next(iter(first.values()), {})
        self.keys = sorted(key for key, value in template.items() if torch.is_tensor(value) and value.dim() == 1)
        self.scalars = {key: value for key, value in template.items() if key not in self.keys}
        for state in first.values():
            if any(not _same(state[key], value) for key, value in self.scalars.items()):
                raise InputError(folder, f"its optimizer groups differ in {sorted(self.scalars)}; resharding "
                                 "needs them equal")

    def tensor(self, name: str, key: str = FP32) -> torch.Tensor:
        """Parameter ``name``'s whole fp32 master weight (``FP32``) or optimizer state ``key``."""
        return self.weights.tensor(name, key)


def _same(a: Any, b: Any) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) and torch.is_tensor(b) else a == b


# ----------------------------------------------------------------------------- writing into the M-rank engine


def _flat_partitions(engine: Any) -> list[torch.Tensor]:
    """The flat fp32 tensors the torch optimizer steps on this rank, one per (sub-)group."""
    if engine.zero_optimization_partition_weights():
        return list(engine.optimizer.fp32_partitioned_groups_flat)
    return [group["params"][0] for group in engine.optimizer.optimizer.param_groups]


def _create_optimizer_state(engine: Any, saved: _SavedState) -> None:
    """Give the torch optimizer the state its first step would have created (zeros, to be filled),
    the saved scalars (``step``) and the saved param-group hyperparameters."""
    base = engine.optimizer.optimizer
    if len(base.param_groups) != len(saved.param_groups):
        raise InputError(saved.path, f"has {len(saved.param_groups)} optimizer param groups, this run "
                         f"{len(base.param_groups)}: the checkpoint is of another model or optimizer config")
    for group, old in zip(base.param_groups, saved.param_groups):
        group.update({key: value for key, value in old.items() if key != "params"})
    for flat in _flat_partitions(engine):
        state = {key: torch.zeros_like(flat) for key in saved.keys}
        state.update({key: value.clone() if torch.is_tensor(value) else value for key, value in saved.scalars.items()})
        base.state[flat] = state
    if not engine.zero_optimization_partition_weights():
        _link_optimizer_state(engine)


def _link_optimizer_state(engine: Any) -> None:
    """Point each parameter's ZeRO 1/2 fragment at its share of the optimizer state, through which
    ``safe_{get,set}_full_optimizer_state`` read and write. DeepSpeed links them once, after the first
    param group's first update, when the other groups have no state yet (0.19.8): their parameters
    stay unlinked until linked again."""
    flats = _flat_partitions(engine)
    state = engine.optimizer.optimizer.state
    for param in engine.module.parameters():
        if (fragment := getattr(param, "_hp_mapping", None)) is not None:
            flat = flats[fragment.param_group_index]
            fragment.set_optim_state_fragment(flat, state[flat])


def _set_parameters(engine: Any, saved: _SavedState, stage: int) -> None:
    """Every parameter's fp32 master weight, optimizer states and low-precision copy."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    names = dict(engine.module.named_parameters())
    missing = sorted(set(saved.shapes) - set(names))
    if missing:
        raise InputError(saved.path, f"holds parameters this model lacks: {', '.join(missing)}")
    for name, param in names.items():
        if not param.requires_grad:
            continue
        shape = param.ds_shape if stage == 3 else param.shape
        if name not in saved.shapes:
            raise InputError(saved.path, f"holds no parameter {name!r}: the checkpoint is of another model")
        if saved.shapes[name] != shape:
            raise InputError(saved.path, f"{name} has shape {tuple(saved.shapes[name])}, this model "
                             f"{tuple(shape)}: the checkpoint is of another model")
        weight = saved.tensor(name)
        safe_set_full_fp32_param(param, weight)
        for key in saved.keys:
            safe_set_full_optimizer_state(param, saved.tensor(name, key), key)
        if stage == 3:  # each rank keeps its partition of the low-precision weight
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(weight)
        else:  # every rank keeps the whole low-precision weight
            param.data.copy_(weight)


def _set_engine_state(engine: Any, states: dict[str, Any]) -> dict[str, Any]:
    """Restore the LR scheduler and the engine's counters; return the client state."""
    if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    engine.global_steps = states["global_steps"]
    engine.global_samples = states.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = states["skipped_steps"]
    return {key: value for key, value in states.items() if key not in ENGINE_KEYS}


def _load_unsharded(engine: Any, folder: Path, module_loader: Any) -> dict[str, Any]:
    """Stage 0: DeepSpeed's own loader, which has nothing partitioned to refuse."""
    load_path, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True, custom_load_fn=module_loader)
    if load_path is None:
        raise InputError(folder, "DeepSpeed found no checkpoint to load here")
    return client_state
