"""``hataori plan``: will a training run fit in GPU memory, and with which ZeRO settings?

For a model (a model preset, or a train preset that also fixes micro batch, sequence length,
precision and LoRA adapters) on N GPUs of M GiB, the plan prints parameters, training FLOPs per
token, the size of a checkpoint and, per GPU, the memory of weights, gradients, optimizer states,
communication buffers and activations for ZeRO stages 0-3, with and without optimizer offload to
CPU and with and without activation checkpointing. It marks the configurations that fit and
recommends the cheapest one with room to spare.

    hataori plan PRESET.yaml [key=value ...] [--machine PROFILE.yaml ...] [plan.KEY=VALUE ...]
        [--gpus N] [--gpu-mem G] [--gpus-per-node K] [--overhead O] [--cpu-mem C]
        [--seq-len L] [--micro-batch B] [--precision P]

    hataori plan configs/train/30b.yaml --machine configs/plan/8xh100-80gb.yaml --gpus 64

Two configs meet here, as in ``hataori slurm submit``. The preset (a model preset from
``configs/model/`` or a train preset) takes ``key=value`` overrides as in ``hataori pretrain``.
The plan's own config (:class:`PlanConfig`: the GPUs, their memory and compute capability, GPUs per
node, the allowance, host memory and, for a model preset, the batch shape) comes from machine profiles (``--machine``,
presets in ``configs/plan/`` with ``base:`` chains like any other) and ``plan.KEY=VALUE``
overrides. Each flag is a shortcut for one key (``--gpus 64`` is ``plan.gpus=64``; :data:`FLAGS`),
and a key set both by its flag and by an override is refused. A train preset fixes its own batch
shape, so there ``--seq-len``, ``--micro-batch`` and ``--precision`` are shortcuts for its
``data.seq_len``, ``zero.micro_batch_size`` and ``zero.precision`` (:data:`TRAIN_KEYS`), checked
as pretraining checks them, and the plan's keys of the same meaning are refused. A precision the
GPUs of ``compute_capability`` cannot run is refused (:func:`hataori.precision.check_gpu`).

The formulas (model states, LoRA, activations, checkpoints) live in :mod:`hataori.model.memory` and
are written out, with what they were measured against, in docs/plan.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from hataori.config import build, check_keys, command_items, file_keys, load, merged, require
from hataori.errors import ConfigError, InputError
from hataori.model import ModelConfig
from hataori.model.memory import (GIB, ModelStates, Offload, Precision, Trainable, activation_bytes, bytes_per_param,
                                  checkpoint_bytes, largest_layer_params, states_of, trainable)
from hataori.precision import check_gpu
from hataori.train.config import load_train_config
from hataori.train.zero import DEFAULT_BUCKET_ELEMENTS

DEFAULT_OVERHEAD_GIB = 3.0
RECOMMEND_HEADROOM = 0.10
"""Share of GPU memory the recommendation leaves free where some setup can, beyond the allowance:
the estimate does not see fragmentation over a long run nor every workspace of every kernel."""


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True, slots=True)
class Setup:
    """One row of the plan: a ZeRO stage, what is offloaded, activation checkpointing."""

    stage: int
    offload: Offload
    checkpointing: bool

    @property
    def cost(self) -> tuple:
        """Sort key: lower is faster (see the module docstring)."""
        return (("none", "optimizer", "optimizer+params").index(self.offload), self.checkpointing,
                self.stage == 3, self.stage)

    def settings(self) -> str:
        """The config overrides that choose this setup."""
        items = [f"zero.stage={self.stage}"]
        if self.offload != "none":
            items.append("zero.offload_optimizer=cpu")
        if self.offload == "optimizer+params":
            items.append("zero.offload_params=cpu")
        return " ".join(items + [f"model.activation_checkpointing={str(self.checkpointing).lower()}"])

    def describe(self) -> str:
        offload = {"none": "no offload", "optimizer": "optimizer offload",
                   "optimizer+params": "optimizer and parameter offload"}[self.offload]
        return f"ZeRO-{self.stage}, {offload}, {'with' if self.checkpointing else 'no'} activation checkpointing"


SETUPS = tuple(Setup(stage, offload, ckpt)
               for stage, offload in [(0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"),
                                      (3, "none"), (3, "optimizer"), (3, "optimizer+params")]
               for ckpt in (False, True))


@dataclass(frozen=True, slots=True)
class Workload:
    """What is trained and on what: the model, the batch shape and the machines, as checked by the
    configs they come from (:func:`load_workload`)."""

    model: Any
    """A ModelConfig."""
    micro_batch: int
    seq_len: int
    precision: Precision
    num_gpus: int
    gpu_mem_gib: float
    gpus_per_node: int
    overhead_gib: float = DEFAULT_OVERHEAD_GIB
    bucket_elements: int = DEFAULT_BUCKET_ELEMENTS
    cpu_mem_gib: float | None = None
    """Host memory per node; None: not checked."""
    lora: Trainable | None = None
    """A LoRA run: what trains (:func:`trainable`); None: every weight trains."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """The memory of one setup for one workload, in bytes."""

    setup: Setup
    states: ModelStates
    buffers: float
    activations: float
    overhead: float
    gpu_mem: float
    cpu_mem: float | None

    @property
    def gpu_total(self) -> float:
        return self.states.gpu + self.buffers + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.gpu_total <= self.gpu_mem and (self.cpu_mem is None or self.states.cpu_states <= self.cpu_mem)

    @property
    def roomy(self) -> bool:
        """Fits with RECOMMEND_HEADROOM of the GPU's memory to spare."""
        return self.fits and self.gpu_total <= (1 - RECOMMEND_HEADROOM) * self.gpu_mem


def estimate(work: Workload, setup: Setup) -> Estimate:
    cfg, lora = work.model, work.lora
    states = states_of(cfg, lora, stage=setup.stage, offload=setup.offload, precision=work.precision,
                       num_gpus=work.num_gpus, gpus_per_node=work.gpus_per_node)
    trained = cfg.num_params() if lora is None else lora.params
    bucket = min(work.bucket_elements, trained)  # the buckets carry gradients and updated weights
    buffers = 2.0 * bucket * bytes_per_param(work.precision).params if setup.stage in (1, 2) else 0.0
    activations = activation_bytes(cfg, micro_batch=work.micro_batch, seq_len=work.seq_len,
                                   precision=work.precision, checkpointing=setup.checkpointing, lora=lora)
    return Estimate(setup=setup, states=states, buffers=buffers, activations=activations,
                    overhead=work.overhead_gib * GIB, gpu_mem=work.gpu_mem_gib * GIB,
                    cpu_mem=None if work.cpu_mem_gib is None else work.cpu_mem_gib * GIB)


def plan(work: Workload) -> list[Estimate]:
    """Every setup's estimate, in table order."""
    return [estimate(work, setup) for setup in SETUPS]


def recommend(estimates: Iterable[Estimate]) -> Estimate | None:
    """The cheapest setup that fits with RECOMMEND_HEADROOM to spare, else the cheapest that fits at
    all, or None."""
    fitting = [e for e in estimates if e.fits]
    roomy = [e for e in fitting if e.roomy]
    return min(roomy or fitting, key=lambda e: e.setup.cost) if fitting else None


def what_would_fit(work: Workload, estimates: list[Estimate]) -> list[str]:
    """Changes that would make a plan with no fitting setup fit, each as a sentence."""
    hints = []
    for gpus in (2**k for k in range(1, 17)):
        if gpus <= work.num_gpus:
            continue
        bigger = dataclasses.replace(work, num_gpus=gpus, gpus_per_node=min(gpus, max(work.gpus_per_node, 8)))
        best = recommend(plan(bigger))
        if best is not None:
            hints.append(f"{gpus} GPUs of {work.gpu_mem_gib:g} GiB: {best.setup.describe()} needs "
                         f"{best.gpu_total / GIB:.1f} GiB per GPU")
            break
    else:
        floor = min(e.activations + e.states.gathered + e.overhead for e in estimates)
        hints.append(f"no number of GPUs is enough at this micro batch and sequence length: activations, the "
                     f"gathered layer and the allowance alone need {floor / GIB:.1f} GiB per GPU")
    if work.micro_batch > 1:
        one = recommend(plan(dataclasses.replace(work, micro_batch=1)))
        if one is not None:
            hints.append(f"micro batch 1 (with more accumulation steps): {one.setup.describe()} needs "
                         f"{one.gpu_total / GIB:.1f} GiB per GPU")
    seq = work.seq_len // 2
    while seq >= 128:
        shorter = recommend(plan(dataclasses.replace(work, seq_len=seq)))
        if shorter is not None:
            hints.append(f"sequences of {seq} tokens: {shorter.setup.describe()} needs "
                         f"{shorter.gpu_total / GIB:.1f} GiB per GPU")
            break
        seq //= 2
    return hints


# ----------------------------------------------------------------------------- report


COLUMNS = ("ZeRO", "offload", "ckpt", "params", "grads", "optim", "buffers", "activ", "other", "GPU total",
           "CPU/node", "fits")


def format_report(work: Workload, estimates: list[Estimate], *, source: str = "") -> str:
    cfg = work.model
    n = cfg.num_params()
    tokens = work.micro_batch * work.seq_len
    best = recommend(estimates)
    lines = [
        f"model: {source or 'model'}: {n:,} parameters ({n / 1e9:.2f} B), largest layer "
        f"{largest_layer_params(cfg):,}",
        f"compute: {cfg.flops_per_token(work.seq_len):.3e} training FLOPs per token at seq_len {work.seq_len} "
        f"(6N + attention; activation checkpointing adds a forward pass, about a third more)",
        f"run: micro batch {work.micro_batch} x {work.seq_len} = {tokens:,} tokens per GPU, {work.precision}, "
        f"{work.num_gpus} GPU{'s' if work.num_gpus > 1 else ''} of {work.gpu_mem_gib:g} GiB "
        f"({work.gpus_per_node} per node), allowance {work.overhead_gib:g} GiB per GPU",
        *_training_lines(work, stage=best.setup.stage if best is not None else 3, recommended=best is not None),
        "memory in GiB per GPU (CPU per node); * fits",
        "",
    ]
    rows = [COLUMNS]
    for e in estimates:
        s = e.states
        offload = {"none": "-", "optimizer": "optim", "optimizer+params": "optim+param"}[e.setup.offload]
        mark = ("*" if e.fits else "") + ("  <- recommended" if e is best else "")
        rows.append((str(e.setup.stage), offload, "yes" if e.setup.checkpointing else "no",
                     *(f"{x / GIB:.1f}" for x in (s.params, s.grads, s.optimizer + s.gathered, e.buffers,
                                                  e.activations, e.overhead, e.gpu_total, s.cpu_states)), mark))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    for r in rows:
        lines.append("  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     + "  " + r[-1])
    lines.append("")
    lines.append("optim: Adam states and fp32 gradients (ZeRO-3: + the gathered largest layer); buffers: ZeRO-1/2 "
                 "reduce and all-gather buckets; other: the fixed allowance")
    if best is not None:
        lines.append(f"recommended: {best.setup.describe()}: {best.gpu_total / GIB:.1f} of {work.gpu_mem_gib:g} GiB "
                     f"per GPU" + (f", {best.states.cpu_states / GIB:.1f} GiB of offloaded states per node"
                                   if best.states.cpu_states else "")
                     + ("" if best.roomy else f" (tight: nothing that fits leaves {RECOMMEND_HEADROOM:.0%} free)"))
        lines.append(f"  set: {best.setup.settings()}")
    else:
        need = min(estimates, key=lambda e: e.gpu_total)
        cpu = (f" and {need.states.cpu_states / GIB:.1f} GiB of CPU memory per node (of {work.cpu_mem_gib:g})"
               if need.cpu_mem is not None and need.states.cpu_states > need.cpu_mem else "")
        lines.append(f"DOES NOT FIT: no configuration fits in {work.num_gpus} x "
                     f"{work.gpu_mem_gib:g} GiB; the smallest, {need.setup.describe()}, needs "
                     f"{need.gpu_total / GIB:.1f} GiB per GPU{cpu}. It would fit with:")
        lines.extend(f"  - {hint}" for hint in what_would_fit(work, estimates))
    return "\n".join(lines)


def _training_lines(work: Workload, *, stage: int, recommended: bool) -> list[str]:
    """What trains (with LoRA) and the size of one checkpoint at ``stage``, beside full training's."""
    n = work.model.num_params()
    full = checkpoint_bytes(n, stage=stage, precision=work.precision)
    where = f"at ZeRO-{stage}{' (recommended)' if recommended else ''}"
    lora = work.lora
    if lora is None:
        return [f"checkpoint: {full / GIB:.1f} GiB a save {where}, {full // n} bytes a parameter"]
    c = lora.lora
    ckpt = checkpoint_bytes(lora.params, stage=stage, precision=work.precision)
    also = f", train_also {', '.join(c.train_also)}" if c.train_also else ""
    return [f"LoRA: rank {c.rank} on {len(lora.adapted)} linear layers ({', '.join(c.targets)}{also}): "
            f"{lora.params:,} trainable parameters, {lora.params / lora.total:.2%} of {lora.total:,}",
            f"checkpoint: {ckpt / GIB:.2f} GiB a save {where}, {ckpt // lora.params} bytes a trained parameter; "
            f"full training {full / GIB:.1f} GiB"]


# ----------------------------------------------------------------------------- `hataori plan`


@dataclass(kw_only=True, slots=True)
class PlanConfig:
    """What a plan is for besides the model: the machines and, for a model preset, the batch shape
    (a train preset has its own: its data.seq_len, zero.micro_batch_size and zero.precision)."""

    gpus: int
    """GPUs of the run, one data-parallel rank each."""
    gpu_mem: float = 80.0
    """Memory of one GPU in GiB (2**30 bytes), as nvidia-smi reports it."""
    gpus_per_node: int | None = None
    """GPUs per node, whose host memory holds their offloaded states; a job of fewer GPUs runs on one node.
    None: all of them up to 8, else the largest count of at most 8 that divides gpus."""
    overhead: float = DEFAULT_OVERHEAD_GIB
    """Fixed GiB per GPU for the CUDA context, the allocator's fragmentation and kernels' workspaces."""
    cpu_mem: float | None = None
    """Host memory per node in GiB, checked against the offloaded states; None: not checked."""
    seq_len: int | None = None
    """Model presets: tokens per sequence; None: the model's max_seq_len."""
    micro_batch: int = 1
    """Model presets: sequences per GPU per forward pass."""
    precision: Precision = "bf16"
    """Model presets: the training precision."""
    compute_capability: float | None = None
    """The GPUs' CUDA compute capability as ``nvidia-smi --query-gpu=compute_cap`` prints it (9.0 for H100 and
    H200); a precision they cannot run (bf16 below 8.0) is refused. None: not checked."""

    def __post_init__(self) -> None:
        require(self.gpus >= 1, "gpus", f"must be a positive number of GPUs, got {self.gpus}")
        require(self.compute_capability is None or (math.isfinite(self.compute_capability)
                                                    and self.compute_capability >= 1), "compute_capability",
                f"must be a CUDA compute capability such as 9.0 or 8.6, got {self.compute_capability}")
        if self.gpus_per_node is not None:
            require(self.gpus_per_node >= 1 and self.gpus % self.node_gpus == 0, "gpus_per_node",
                    f"must divide the number of GPUs ({self.gpus}) and be >= 1, got {self.gpus_per_node}")
        for key, gib, zero_ok in (("gpu_mem", self.gpu_mem, False), ("overhead", self.overhead, True),
                                  ("cpu_mem", self.cpu_mem, False)):
            require(gib is None or (math.isfinite(gib) and (gib >= 0 if zero_ok else gib > 0)), key,
                    f"must be a finite number of GiB, {'>= 0' if zero_ok else '> 0'}, got {gib}")
        require(self.micro_batch >= 1, "micro_batch", f"must be >= 1, got {self.micro_batch}")

    @property
    def capability(self) -> tuple[int, int] | None:
        """compute_capability as (major, minor): 8.6 is (8, 6)."""
        if self.compute_capability is None:
            return None
        major = int(self.compute_capability)
        return major, round((self.compute_capability - major) * 10)

    @property
    def node_gpus(self) -> int:
        """GPUs per node as planned: gpus_per_node, or gpus where the job is smaller than a node."""
        if self.gpus_per_node is None:
            return default_gpus_per_node(self.gpus)
        return min(self.gpus, self.gpus_per_node)


PLAN_PREFIX = "plan."
"""The prefix of the plan's ``KEY=VALUE`` overrides among the preset's."""
FLAGS = {"--gpus": "gpus", "--gpu-mem": "gpu_mem", "--gpus-per-node": "gpus_per_node", "--overhead": "overhead",
         "--cpu-mem": "cpu_mem", "--seq-len": "seq_len", "--micro-batch": "micro_batch", "--precision": "precision"}
"""Each flag and the PlanConfig key it sets; with a train preset, those of TRAIN_KEYS set the train config's key."""
TRAIN_KEYS = {"seq_len": "data.seq_len", "micro_batch": "zero.micro_batch_size", "precision": "zero.precision"}
"""The plan's batch keys, for model presets, and the train config's keys that a train preset has for them."""


def load_workload(config: str | Path, items: Sequence[str] = (), *, machines: Sequence[str | Path] = (),
                  flags: dict[str, Any] | None = None) -> Workload:
    """A Workload from a model preset or a train preset (``config``), the command line's ``key=value``
    ``items`` for it and for the plan (``plan.KEY=VALUE``), machine profiles and ``flags`` (``{"--gpus": 8}``;
    a flag that is absent or None sets nothing)."""
    path = Path(config)
    if not path.is_file():
        raise InputError(path, "no such config; pass a model preset (configs/model/*.yaml) or a train preset")
    train, flags = _is_train_preset(path), flags or {}
    plan_flags, preset_flags = {}, {}
    for flag, key in FLAGS.items():
        value = flags.get(flag)
        if train and key in TRAIN_KEYS:
            preset_flags[flag] = (TRAIN_KEYS[key], value)
        else:
            plan_flags[flag] = (key, value)
    machine = load_plan_config(machines, [item for item in items if _is_plan_item(item)], plan_flags,
                               train_preset=train)
    files, overrides = command_items([item for item in items if not _is_plan_item(item)], preset_flags)
    bucket, lora = DEFAULT_BUCKET_ELEMENTS, None
    if train:
        # The plan reads no data and writes no run: placeholders for what a preset leaves to the command
        # line. An init source (init.from_hf=DIR) gives the model's shape, as in pretrain.
        placeholders = ["run_dir=unused-by-plan", "data.datasets=[{path: unused-by-plan}]"]
        try:
            cfg = load_train_config([path, *files], [*placeholders, *overrides])
        except ConfigError as err:
            raise _naming_flag(err, preset_flags) from None
        model, zero, seq_len, lora = cfg.model, cfg.zero, cfg.data.seq_len, cfg.lora
        micro_batch, precision, bucket = zero.micro_batch_size, zero.precision, zero.bucket_elements
        try:  # the run must be able to start on these GPUs, as pretrain checks before any rank starts
            zero.grad_accum_steps(seq_len=seq_len, world_size=machine.gpus)
        except ConfigError as err:
            raise ConfigError(err.key, f"{err.message} (planned on {machine.gpus} GPUs: plan.gpus, --gpus)") from None
    else:
        model = load(ModelConfig, [path, *files], overrides)
        micro_batch, precision = machine.micro_batch, machine.precision
        seq_len = model.max_seq_len if machine.seq_len is None else machine.seq_len
        require(1 <= seq_len <= model.max_seq_len, f"{PLAN_PREFIX}seq_len (--seq-len)",
                f"must be between 1 and the model's max_seq_len={model.max_seq_len}, got {seq_len}")
    if machine.capability is not None:  # as pretrain refuses it on GPUs that cannot run it
        key = "zero.precision" if train else f"{PLAN_PREFIX}precision (--precision)"
        try:
            check_gpu(precision, machine.capability, key)
        except ConfigError as err:
            raise ConfigError(err.key, f"{err.message} (the GPUs planned: {PLAN_PREFIX}compute_capability="
                              f"{machine.compute_capability})") from None
    return Workload(model=model, micro_batch=micro_batch, seq_len=seq_len, precision=precision,
                    num_gpus=machine.gpus, gpu_mem_gib=machine.gpu_mem, gpus_per_node=machine.node_gpus,
                    overhead_gib=machine.overhead, bucket_elements=bucket, cpu_mem_gib=machine.cpu_mem,
                    lora=None if lora is None else trainable(model, lora))


def load_plan_config(machines: Sequence[str | Path], items: Sequence[str], flags: dict[str, tuple[str, Any]], *,
                     train_preset: bool) -> PlanConfig:
    """The PlanConfig of machine profiles, ``plan.KEY=VALUE`` ``items`` and ``flags`` (flag: (key, value),
    as :func:`hataori.config.command_items` takes them). Errors name ``plan.KEY`` and the flag that sets it."""
    for item in items:  # an unknown key named as written, with the closest plan.KEY
        key = item.split("=", 1)[0].strip().removeprefix(PLAN_PREFIX).split(".")[0]
        check_keys(PlanConfig, {key: None}, f"override {item!r}", PLAN_PREFIX)
    files, overrides = command_items([item.removeprefix(PLAN_PREFIX) for item in items], flags, prefix=PLAN_PREFIX)
    try:
        data = merged(PlanConfig, [*machines, *files], overrides)
        if data.get("gpus") is None:
            raise ConfigError("gpus", "the number of GPUs is not set; pass --gpus N, plan.gpus=N or set gpus: in a "
                              "--machine profile")
        for key, train_key in TRAIN_KEYS.items():
            if train_preset and key in data:
                flag = next(flag for flag, name in FLAGS.items() if name == key)
                raise ConfigError(key, f"is a model preset's; a train preset has its own {train_key}: set that "
                                  f"(or {flag}) instead")
        return build(PlanConfig, data)
    except ConfigError as err:
        raise _naming_flag(ConfigError(f"{PLAN_PREFIX}{err.key}", err.message),
                           {flag: (f"{PLAN_PREFIX}{key}", value) for flag, (key, value) in flags.items()}) from None


def _naming_flag(err: ConfigError, flags: dict[str, tuple[str, Any]]) -> ConfigError:
    """``err`` with the flag that sets its key, if one does, after the key: ``plan.gpus (--gpus): ...``."""
    flag = next((flag for flag, (key, _) in flags.items() if key == err.key), None)
    return ConfigError(f"{err.key} ({flag})", err.message) if flag else err


def _is_plan_item(item: str) -> bool:
    """A ``plan.KEY=VALUE`` override (a file such as plan.yaml is the preset's)."""
    return "=" in item and item.startswith(PLAN_PREFIX)


def default_gpus_per_node(gpus: int) -> int:
    """GPUs per node when ``plan.gpus_per_node`` is not set: all of them up to 8 (one node), else the
    largest count of at most 8 that divides ``gpus`` (8 for 64, 5 for 10, 6 for 12)."""
    return max(n for n in range(1, min(gpus, 8) + 1) if gpus % n == 0) if gpus >= 1 else gpus


def _is_train_preset(path: Path) -> bool:
    """A train preset has a ``model`` or ``zero`` section (itself or through its ``base:`` chain)."""
    return bool({"model", "zero"} & file_keys(path))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = {f.name: f.default for f in dataclasses.fields(PlanConfig)}
    parser.add_argument("config", metavar="CONFIG", help="a model preset (configs/model/*.yaml) or a train preset")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of the preset, e.g. n_layers=40 or lora.rank=16 (more YAML files layer on it "
                             "in order); plan.KEY=VALUE sets the plan's own keys, e.g. plan.gpus=64")
    parser.add_argument("--machine", action="append", default=[], metavar="PROFILE.yaml",
                        help="a machine profile (configs/plan/): plan keys such as gpu_mem and gpus_per_node "
                             "(repeatable, applied in order; plan.KEY=VALUE and the flags override it)")
    parser.add_argument("--gpus", type=int, help="number of GPUs, one data-parallel rank each (shortcut for plan.gpus, "
                                                 "which has no default: set it one way or another)")
    parser.add_argument("--gpu-mem", type=float, help=f"memory of one GPU in GiB (default {default['gpu_mem']:g}; "
                                                      "shortcut for plan.gpu_mem)")
    parser.add_argument("--gpus-per-node", type=int,
                        help="GPUs per node, for CPU memory (default: 8, or the largest divisor of the GPUs up to 8; "
                             "a job of fewer GPUs runs on one node; shortcut for plan.gpus_per_node)")
    parser.add_argument("--overhead", type=float,
                        help="fixed GiB per GPU for the CUDA context and fragmentation (default "
                             f"{default['overhead']:g}; shortcut for plan.overhead)")
    parser.add_argument("--cpu-mem", type=float,
                        help="host memory per node in GiB; checked when set (shortcut for plan.cpu_mem)")
    batch = "shortcut for plan.{} with a model preset, for a train preset's {}"
    parser.add_argument("--seq-len", type=int,
                        help="tokens per sequence (a model preset's default: its max_seq_len; "
                             f"{batch.format('seq_len', TRAIN_KEYS['seq_len'])})")
    parser.add_argument("--micro-batch", type=int,
                        help=f"sequences per GPU per forward pass (a model preset's default: {default['micro_batch']}; "
                             f"{batch.format('micro_batch', TRAIN_KEYS['micro_batch'])})")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                        help=f"the training precision (a model preset's default: {default['precision']}; "
                             f"{batch.format('precision', TRAIN_KEYS['precision'])})")


def main(args: argparse.Namespace) -> int:
    flags = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in FLAGS}
    work = load_workload(args.config, args.overrides, machines=args.machine, flags=flags)
    print(format_report(work, plan(work), source=args.config))
    return 0
