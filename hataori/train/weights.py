"""The model weights of a training checkpoint, read one tensor at a time, from any ZeRO stage.

Used by ``hataori export hf``, ``hataori generate`` and ``init.from_run``. What DeepSpeed writes
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

from hataori.config import build
from hataori.errors import InputError
from hataori.model.lora import LoRAConfig, apply_lora
from hataori.model.model import ModelConfig, Transformer
from hataori.train.checkpoint import LORA_BASE, read_manifest, verify
from hataori.train.init import SHAPE_FIELDS, InitConfig, open_source, target_rows
from hataori.train.layout import CHECKPOINTS, COMPLETE, CONFIG_FILE, complete_steps, tag
from hataori.train.run import model_config, run_tokenizer

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
        pieces = [self._flats[rank][key][group][start:start + numel] for rank, group, start, numel in self._pieces[name]]
        return torch.cat(pieces)[:math.prod(shape)].float().view(shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight as fp32, tied names included (all in memory: for small models)."""
        state = {name: self.tensor(name) for name in self.shapes}
        state.update({alias: state[target] for alias, target in self.tied.items() if target in state})
        return state


# ----------------------------------------------------------------------------- LoRA runs


def run_weights(run_dir: str | Path, checkpoint: str | Path, config: dict, tokenizer=None):
    """The plain model's weights of ``checkpoint`` of the run whose recorded config is ``config``: the
    checkpoint's own (:class:`CheckpointWeights`), or for a LoRA run its base's with the adapters
    folded in (:class:`LoRAWeights`). ``tokenizer``: the run's, where the caller has it already. A config
    whose model differs from the one the checkpoint's manifest records is refused (the manifest is what
    trained)."""
    check_recorded_model(Path(run_dir), Path(checkpoint), config)
    weights = LoRAWeights(run_dir, checkpoint, config, tokenizer) if config.get("lora") else CheckpointWeights(checkpoint)
    check_weight_shapes(weights, model_config(config), Path(run_dir), Path(checkpoint))
    return weights


def check_weight_shapes(weights: CheckpointWeights | LoRAWeights, cfg: ModelConfig, run_dir: Path,
                        checkpoint: Path) -> None:
    """Refuse weights that are not those of the model ``cfg`` builds: a missing, unexpected or
    differently shaped one (a config.yaml from another run, or edited where the manifest records nothing)."""
    expected = cfg.weight_shapes()
    found = {name: weights.shapes.get(weights.tied.get(name, name)) for name in expected}
    problems = [f"weight {name} is missing" if shape is None else f"weight {name} has shape {shape}, the "
                f"config makes {expected[name]}" for name, shape in found.items() if shape != expected[name]]
    problems += [f"it holds a weight {name} the config's model has not" for name in weights.shapes
                 if name not in expected]
    if problems:
        raise InputError(checkpoint, f"{problems[0]}{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}"
                         f": the checkpoint and {run_dir / CONFIG_FILE} do not belong together; restore the "
                         "config.yaml the run trained with")


def check_recorded_model(run_dir: Path, checkpoint: Path, config: dict) -> None:
    """Refuse a run's config.yaml whose model fields differ from those ``checkpoint``'s manifest recorded."""
    saved = read_manifest(checkpoint).get("identity", {})
    cfg = model_config(config)
    differences = [f"model.{key}: config.yaml {getattr(cfg, key)!r}, the checkpoint {saved[f'model.{key}']!r}"
                   for key in ("vocab_size", *SHAPE_FIELDS)
                   if f"model.{key}" in saved and saved[f"model.{key}"] != getattr(cfg, key)]
    if differences:
        raise InputError(run_dir / CONFIG_FILE, f"does not describe the model that {checkpoint.name} was trained as "
                         f"({'; '.join(differences)}): it was edited after training; restore it (the checkpoint's "
                         "manifest.json records what trained)")


class LoRAWeights:
    """The weights of a LoRA run's checkpoint, served like :class:`CheckpointWeights` under the plain
    model's names.

    A LoRA checkpoint holds the adapters (``blocks.0.attn.wq.lora_A``...) and the ``train_also``
    modules; the frozen base is the run's init source (its ``config.yaml``'s ``init`` section, with
    the vocabulary growth pretraining applied), whose fingerprint must still be the one the checkpoint's
    manifest recorded. :meth:`tensor` gives an adapted weight merged, ``W + scaling * B A`` in fp32; a
    trained module's weight from the checkpoint; any other weight from the base. :meth:`base_tensor`
    and :meth:`adapter` give the unmerged parts (``hataori export hf --adapter``).
    """

    def __init__(self, run_dir: str | Path, checkpoint: str | Path, config: dict, tokenizer=None):
        self.path = Path(checkpoint)
        self.trained = CheckpointWeights(checkpoint)
        self.config = model_config(config)
        self.lora = build(LoRAConfig, config["lora"], "lora.")
        recorded = Path(run_dir) / CONFIG_FILE
        tokenizer = tokenizer or run_tokenizer(Path(run_dir), config, None, self.config.vocab_size)
        self.base = open_source(build(InitConfig, config.get("init") or {}, "init."), self.config, tokenizer)
        if self.base is None:
            raise InputError(recorded, "has a lora section but no init source: the run's base is unknown")
        expected = read_manifest(self.path).get("identity", {}).get(LORA_BASE)
        found = self.base.fingerprint()
        if expected != found:
            raise InputError(self.path, f"was trained on the base {self.base.source.key}={self.base.source.path} with "
                             f"fingerprint {expected}, but that base now has fingerprint {found}: its weights "
                             "changed. Put the original base back there (or set init in "
                             f"{recorded} to where it is now)")
        with torch.device("meta"):  # names and shapes only
            self.model = Transformer(self.config)
            self.adapted = set(apply_lora(self.model, self.lora))
        self.shapes = {name: tuple(p.shape) for name, p in self.model.named_parameters()
                       if not name.endswith((".lora_A", ".lora_B"))}
        self.tied = {"lm_head.weight": "tok_embeddings.weight"} if self.config.tie_embeddings else {}
        self.client_state = self.trained.client_state
        self.states = self.trained.states

    def base_tensor(self, name: str) -> torch.Tensor:
        """The frozen base's weight ``name`` (grown to the run's vocabulary) as fp32."""
        name = self.tied.get(name, name)
        shape = self.shapes[name]
        return target_rows(self.base, name, 0, shape[0], shape).reshape(shape)

    def adapter(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The trained (A, B) of the adapted linear layer ``module`` (``blocks.0.attn.wq``), fp32."""
        return self.trained.tensor(f"{module}.lora_A"), self.trained.tensor(f"{module}.lora_B")

    def tensor(self, name: str, key: str = FP32) -> torch.Tensor:
        """Weight ``name`` (or a name tied to it) of the merged model, as a new fp32 tensor."""
        if key != FP32:
            raise KeyError(f"{self.path}: a LoRA run's merged weights have no optimizer state {key!r}")
        name = self.tied.get(name, name)
        if name not in self.shapes:
            raise KeyError(f"{self.path} holds no weight {name!r}")
        module = name.removesuffix(".weight")
        if module in self.adapted:
            a, b = self.adapter(module)
            return self.base_tensor(name) + self.lora.scaling * (b @ a)  # (out, r) @ (r, in)
        if name in self.trained.shapes:
            return self.trained.tensor(name)
        return self.base_tensor(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every merged weight as fp32, tied names included (all in memory: for small models)."""
        state = {name: self.tensor(name) for name in self.shapes}
        state.update({alias: state[target] for alias, target in self.tied.items() if target in state})
        return state
