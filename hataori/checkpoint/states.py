"""The model weights of a training checkpoint, read one tensor at a time, from any ZeRO stage.

Used by ``hataori export hf``, ``hataori generate``, ``hataori eval`` and ``init.from_run`` (through
:func:`hataori.interop.load.run_weights`, which also serves a LoRA run's weights merged). What DeepSpeed writes
into a checkpoint folder, and where each weight is read from:

* ZeRO stage 0 (and bf16 stage 0, which keeps no fp32 copy): ``mp_rank_00_model_states.pt``
  holds the module's state dict, each weight whole in the training precision.
* ZeRO stages 1 and 2: each rank's ``*_optim_states.pt`` holds its slice of the fp32 master weights
  as one flat tensor per parameter group (``single_partition_of_fp32_groups``), and
  ``param_slice_mappings`` says where in it each parameter's piece lies. A parameter's pieces in
  rank order make the parameter.
* ZeRO stage 3: each rank's ``*_optim_states.pt`` holds ``fp32_flat_groups``, read as one flat
  tensor: every parameter, in the order of ``param_shapes``, owns ``ceil(numel / world_size)``
  consecutive elements of each rank's (the last rank's padded).

Where fp32 master weights exist they are what is read (a bf16 run's weights are their rounding).
Every file is opened with ``torch.load(mmap=True)``: nothing is read until a tensor is asked for,
and then only that tensor's bytes. Tied weights appear once, under the name the module registered
first (``tok_embeddings.weight``); :attr:`CheckpointWeights.tied` maps the others to it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from hataori.checkpoint.layout import CHECKPOINTS, COMPLETE, complete_steps, tag
from hataori.checkpoint.manifest import verify
from hataori.errors import InputError

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
FP32 = "fp32"
"""The key under which :meth:`CheckpointWeights.tensor` serves the fp32 master weights."""


def resolve_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) of a run folder (its latest complete checkpoint, or ``step``)
    or of one ``checkpoints/step_N`` folder; the checkpoint is verified against its manifest."""
    path = Path(path)
    if COMPLETE.match(path.name) and path.is_dir():
        found = path.parent.parent, path
    else:
        steps = complete_steps(path / CHECKPOINTS)
        if not steps:
            raise InputError(path, "no complete checkpoint here; pass a run folder with checkpoints/step_N "
                                   "or a checkpoints/step_N folder")
        if step is not None and step not in steps:
            raise InputError(path / CHECKPOINTS, f"no complete checkpoint of step {step}; it has steps "
                                                   f"{', '.join(map(str, steps))}")
        found = path, path / CHECKPOINTS / tag(steps[-1] if step is None else step)
    if problems := verify(found[1]):
        raise InputError(found[1], "is damaged:\n  " + "\n  ".join(problems) + "\nuse an earlier checkpoint "
                         "(see `hataori checkpoint verify`)")
    return found


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which
        raise InputError(path, f"cannot be read as a DeepSpeed checkpoint file: {err}") from None


def _ranked(folder: Path, pattern: re.Pattern) -> list[Path]:
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name)))
    return [p for _, p in found]


class CheckpointWeights:
    """The weights of one DeepSpeed checkpoint folder (see the module docstring).

    ``shapes`` maps each stored weight's name to its shape, in the module's order; ``tied`` maps a
    tied weight's other names to the stored one; :meth:`tensor` reads one weight as fp32, or under
    ZeRO 1-3 one of its optimizer states (``exp_avg``...), from the same flat layout.
    """

    def __init__(self, checkpoint: str | Path):
        self.path = Path(checkpoint)
        if not self.path.is_dir():
            raise InputError(self.path, "no such checkpoint folder")
        optim_files = _ranked(self.path, OPTIM_STATES)
        states_file = self.path / MODEL_STATES
        zero3_files = _ranked(self.path, ZERO3_MODEL_STATES)
        if states_file.is_file():
            states = _load(states_file)
        elif zero3_files:
            states = _load(zero3_files[0])
        else:
            raise InputError(self.path, f"neither {MODEL_STATES} nor ZeRO-3 model states; not a DeepSpeed checkpoint")
        if states.get("frozen_param_shapes"):
            raise InputError(self.path, "holds frozen parameters, which this reader does not gather yet")
        self.states = states
        """The model-states file's dict: module (stage 0), param_shapes, LR scheduler, counters, client state."""
        self.tied: dict[str, str] = dict(states.get("shared_params") or {})
        self.client_state = {key: states[key] for key in ("step", "tokens_seen", "world_size") if key in states}
        """What the trainer saved with the checkpoint: step, tokens_seen, world_size."""
        self._module = states.get("module") or {}
        self.optim = [_load(path)["optimizer_state_dict"] for path in optim_files]
        """Each rank's ZeRO optimizer state (empty for stage 0)."""
        self._flats: list[dict[str, list[torch.Tensor]]] = []  # [rank][key] one flat tensor per (sub-)group
        self._pieces: dict[str, list[tuple[int, int, int, int]]] = {}  # name -> (rank, group, start, numel)
        if not self.optim:  # stage 0: the module's own weights
            self.shapes = {name: tuple(t.shape) for name, t in self._module.items() if name not in self.tied}
            self.stage, self.master = 0, False
            return
        self.master = True
        groups = states.get("param_shapes") or []
        self.shapes = {name: tuple(shape) for group in groups for name, shape in group.items()}
        if "fp32_flat_groups" in self.optim[0]:
            self.stage = 3
            self._flats = [{FP32: list(state["fp32_flat_groups"])} for state in self.optim]
            self._locate_zero3()
        else:
            self.stage = int(self.optim[0].get("zero_stage", 1))
            self._flats = [{FP32: list(state["single_partition_of_fp32_groups"])} for state in self.optim]
            self._locate_zero12()

    def _locate_zero12(self) -> None:
        for rank, state in enumerate(self.optim):
            mappings = state.get("param_slice_mappings")
            if mappings is None:
                raise InputError(self.path, "its optimizer states carry no param_slice_mappings (DeepSpeed before "
                                 "0.10 wrote none); convert it with DeepSpeed's zero_to_fp32.py")
            for group, fragments in enumerate(mappings):
                for name, fragment in fragments.items():
                    self._pieces.setdefault(name, []).append((rank, group, fragment.start, fragment.numel))

    def _locate_zero3(self) -> None:
        ends = [0]
        for flat in self._flats[0][FP32]:
            ends.append(ends[-1] + flat.numel())
        offset, group, ranks = 0, 0, len(self.optim)
        for name, shape in self.shapes.items():
            part = math.ceil(math.prod(shape) / ranks)
            while group < len(ends) - 1 and offset >= ends[group + 1]:
                group += 1
            if group == len(ends) - 1 or offset + part > ends[group + 1]:
                raise InputError(self.path, f"ZeRO-3 partitions end before {name}: the checkpoint does not match "
                                 "its own parameter list")
            self._pieces[name] = [(rank, group, offset - ends[group], part) for rank in range(ranks)]
            offset += part
        if offset != ends[-1]:
            raise InputError(self.path, f"ZeRO-3 partitions hold {ends[-1]} elements a rank, the parameters {offset}: "
                             "the checkpoint does not match its own parameter list")

    def optimizer_states(self) -> list[dict]:
        """Each rank's torch optimizer state dict over its flat partitions (ZeRO 1-3): ``state`` by
        (sub-)group index (``exp_avg``... in the flat layout, ``step``) and ``param_groups``."""
        return [state["optimizer_state_dict" if self.stage == 3 else "base_optimizer_state"] for state in self.optim]

    def tensor(self, name: str, key: str = FP32) -> torch.Tensor:
        """The weight ``name`` (or a name tied to it), or its optimizer state ``key``, as a new fp32 tensor."""
        name = self.tied.get(name, name)
        if name not in self.shapes:
            raise KeyError(f"{self.path} holds no weight {name!r}")
        shape = self.shapes[name]
        if not self.master:
            if key != FP32:
                raise KeyError(f"{self.path} is a ZeRO-0 checkpoint: its optimizer state is not partitioned")
            return self._module[name].float().clone()
        if key not in self._flats[0]:
            for rank, state in enumerate(self.optimizer_states()):
                self._flats[rank][key] = [state["state"][index][key] for index in sorted(state["state"])]
        pieces = [self._flats[rank][key][group][start:start + numel]
                  for rank, group, start, numel in self._pieces[name]]
        return torch.cat(pieces)[:math.prod(shape)].float().view(shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight as fp32, tied names included (all in memory: for small models)."""
        state = {name: self.tensor(name) for name in self.shapes}
        state.update({alias: state[target] for alias, target in self.tied.items() if target in state})
        return state
