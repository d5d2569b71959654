"""The DeepSpeed ZeRO engine: process group, generated DeepSpeed config, ``deepspeed.initialize``.

The DeepSpeed JSON is never written by hand: :func:`deepspeed_config` derives it from
:class:`ZeroConfig`, the sequence length, the world size and the gradient clipping of the optimizer
config, and :meth:`ZeroConfig.build` records it as ``deepspeed.json`` in the run folder.

The optimizer is always the client's torch AdamW (see :mod:`hataori.train.optim`), also with
optimizer offload (``zero_force_ds_cpu_optimizer: false``), so no DeepSpeed Adam extension is
compiled on any machine. Activation checkpointing is the model's business
(``ModelConfig.activation_checkpointing``), not DeepSpeed's.

Building the model. :meth:`ZeroConfig.build_model` builds it where it trains, so no process holds
a whole fp32 copy in CPU memory (4 bytes a parameter per process: 200 GiB a node for 7b on 8 GPUs):
on the process's device for stages 0-2, and for ZeRO-3 partitioned over the processes as it is
built (``deepspeed.zero.Init``), then initialised one module at a time with that module's
parameters gathered, so no process ever holds all of them. The weights are those
``ModelConfig.build()`` gives on the same device with the same seed (tests/test_zero_resume.py).

Process groups. :func:`init_distributed` starts one process or N processes on one or more
machines from the variables torchrun and DeepSpeed's launcher set (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or from Slurm's (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``, with ``MASTER_ADDR``/``MASTER_PORT`` exported by the job).
With none of them set it is a single process. NCCL on GPUs, gloo on CPUs.

The shared-memory op on CPU. DeepSpeed wraps every process group in its ``TorchBackend``, whose
constructor calls ``build_shm_op()`` (deepspeed/comm/torch.py). On the CPU accelerator that
JIT-compiles the ``deepspeed_shm_comm`` C++ extension (ops/op_builder/cpu/comm.py), about 70 s on
two cores, the first time on each machine (the result is cached under ``TORCH_EXTENSIONS_DIR``).
It happens whether or not torch.distributed was initialised beforehand (``init_distributed``
builds the backend in both paths), and no environment variable or config key turns it off;
``DS_BUILD_SHM_COMM=1`` only pre-builds it when DeepSpeed itself is installed from source.
The op serves exactly one collective, ``inference_all_reduce`` (tensor-parallel inference), which
falls back to ``torch.distributed.all_reduce`` when the op is absent; training never calls it.
``build_shm_op`` returns ``None`` without compiling when DeepSpeed's probed op table
``deepspeed.ops.__compatible_ops__`` marks the op incompatible, and that table is a module-level
dict kept for edits. So on the CPU accelerator :func:`init_distributed` marks the op incompatible
before DeepSpeed wraps the process group: nothing is compiled, and gloo carries all collectives.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
import torch.nn as nn

from hataori.config import require
from hataori.errors import ConfigError
from hataori.fsutil import atomic_write_text
from hataori.model.model import Transformer
from hataori.precision import DTYPES
from hataori.precision import check as check_precision

DEFAULT_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default reduce and all-gather bucket, in elements."""
SHM_COMM_OP = "deepspeed_shm_comm"
"""DeepSpeed's name of the CPU shared-memory communication extension."""


# ----------------------------------------------------------------------------- config


@dataclass(kw_only=True, slots=True)
class ZeroConfig:
    """How DeepSpeed shards and runs training: ZeRO stage, precision, offload and batch shape."""

    stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 and gradients, 3 and parameters."""
    precision: Literal["bf16", "fp32", "fp16"] = "bf16"
    """Training precision; fp16 uses dynamic loss scaling. fp32 master weights in every case."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer state (and the update) in CPU memory; needs stage >= 1."""
    offload_params: Literal["none", "cpu"] = "none"
    """Keep the ZeRO-3 parameter partitions in CPU memory too, each layer gathered to the GPU when it
    runs (DeepSpeed's offload_param); needs stage 3 and offload_optimizer: cpu."""
    micro_batch_size: int = 1
    """Sequences per process per forward/backward pass."""
    global_batch_tokens: int
    """Tokens per optimizer step over all processes; a multiple of micro_batch_size * seq_len * world size."""
    bucket_elements: int = DEFAULT_BUCKET_ELEMENTS
    """Elements per gradient-reduce and parameter-allgather bucket (DeepSpeed's default), capped at the
    model's size: ZeRO 1/2 allocate whole buckets, and 5e8 fp32 elements cost seconds a step on a CPU."""

    def __post_init__(self) -> None:
        require(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        require(self.bucket_elements >= 1, "bucket_elements", f"must be >= 1, got {self.bucket_elements}")
        require(self.global_batch_tokens >= 1, "global_batch_tokens",
                f"must be a positive number of tokens, got {self.global_batch_tokens}")
        require(self.offload_optimizer == "none" or self.stage >= 1, "offload_optimizer",
                f"optimizer offload needs ZeRO stage 1, 2 or 3; got stage {self.stage}")
        require(self.offload_params == "none" or (self.stage == 3 and self.offload_optimizer == "cpu"),
                "offload_params", f"parameter offload needs ZeRO stage 3 with offload_optimizer: cpu; got stage "
                f"{self.stage} with offload_optimizer: {self.offload_optimizer}")

    @property
    def dtype(self) -> torch.dtype:
        """The working precision as a torch dtype (the parameters' dtype in training)."""
        return DTYPES[self.precision]

    def check_device(self, device: torch.device | str) -> None:
        """Refuse a precision ``device`` cannot run (:mod:`hataori.precision`), with the key, what the
        device runs and what to use, instead of DeepSpeed's error in every rank."""
        check_precision(self.precision, device, "zero.precision")

    def grad_accum_steps(self, *, seq_len: int, world_size: int) -> int:
        """Micro-batches each process accumulates per optimizer step; raises if the batch does not divide."""
        return grad_accum_steps(self.global_batch_tokens, micro_batch_size=self.micro_batch_size,
                                seq_len=seq_len, world_size=world_size)

    def build_model(self, model: Any, device: torch.device, *, seq_len: int, grad_clip: float) -> nn.Module:
        """``model`` (a ModelConfig) built on ``device`` in the training precision, partitioned as it
        is built for ZeRO-3 (see the module docstring); the same weights as ``model.build(device,
        dtype)`` with the same seed. Call :func:`init_distributed` and seed the generators first."""
        self.check_device(device)
        if self.stage != 3:
            return model.build(device, self.dtype)
        import deepspeed

        model.check_kernels()
        config = deepspeed_config(self, world_size=torch.distributed.get_world_size(), seq_len=seq_len,
                                  grad_clip=grad_clip)
        generators = _rng_states(device)
        with deepspeed.zero.Init(config_dict_or_path=config):  # parameters in the training precision
            built = Transformer(model)  # what construction and its initialisation drew is drawn again:
        _set_rng_states(device, generators)  # the weights come from the same state as model.build's

        def whole(params):
            return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

        return built.initialize(whole)  # also the rotary tables, which zero.Init made in 16 bits

    def build(self, model: nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler | None, *, seq_len: int, grad_clip: float,
              run_dir: str | os.PathLike | None = None) -> Any:
        """The DeepSpeed engine over ``model`` with the client ``optimizer`` and ``scheduler``.

        Call :func:`init_distributed` first. On rank 0 the generated DeepSpeed config is written to
        ``run_dir/deepspeed.json``.
        """
        import deepspeed

        world_size = torch.distributed.get_world_size()
        # The buckets carry what trains (ds_numel: a ZeRO-3 parameter's whole size).
        num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        config = deepspeed_config(self, world_size=world_size, seq_len=seq_len, grad_clip=grad_clip,
                                  num_params=num_params)
        if run_dir is not None and torch.distributed.get_rank() == 0:
            atomic_write_text(Path(run_dir) / "deepspeed.json", json.dumps(config, indent=2) + "\n")
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config)
        return engine


def _rng_states(device: torch.device) -> list[torch.Tensor]:
    """The CPU generator's state, and ``device``'s if it is a GPU."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_rng_states(device: torch.device, states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def grad_accum_steps(global_batch_tokens: int, *, micro_batch_size: int, seq_len: int, world_size: int) -> int:
    """``global_batch_tokens / (micro_batch_size * seq_len * world_size)``, which must be a whole number."""
    unit = micro_batch_size * seq_len * world_size
    steps, remainder = divmod(global_batch_tokens, unit)
    if remainder == 0 and steps >= 1:
        return steps
    options = sorted({max(1, steps), steps + 1})
    nearest = " or ".join(f"{n * unit} ({n} accumulation step{'s' if n > 1 else ''})" for n in options)
    raise ConfigError("zero.global_batch_tokens",
                      f"{global_batch_tokens} tokens is not a whole number of micro-batches: one micro-batch "
                      f"on every process is micro_batch_size * seq_len * world_size = {micro_batch_size} * "
                      f"{seq_len} * {world_size} = {unit} tokens. Nearest valid values: {nearest}; or change "
                      f"zero.micro_batch_size or the sequence length")


def deepspeed_config(cfg: ZeroConfig, *, world_size: int, seq_len: int, grad_clip: float,
                     num_params: int | None = None) -> dict:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` processes at ``seq_len`` tokens a sequence.

    With ``num_params`` (the model's size) the communication buckets are capped at the model's size.
    """
    accum = cfg.grad_accum_steps(seq_len=seq_len, world_size=world_size)
    bucket = cfg.bucket_elements if num_params is None else max(1, min(cfg.bucket_elements, num_params))
    zero: dict[str, Any] = {"stage": cfg.stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if cfg.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params == "cpu":  # zero.Init then builds the partitions in CPU memory as well
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_batch_size": cfg.micro_batch_size * accum * world_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        # The client's torch AdamW also under offload, instead of a compiled DeepSpeedCPUAdam.
        "zero_force_ds_cpu_optimizer": False,
        # Logging is ours; DeepSpeed's per-step prints stay off.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "fp16":
        config["fp16"].update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                               "hysteresis": 2, "min_loss_scale": 1})
    return config


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True, slots=True)
class DistEnv:
    """Where this process sits: its ranks, the world size and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout: timedelta = timedelta(minutes=10)) -> DistEnv:
    """Join (or start) the process group described by the environment and hand it to DeepSpeed.

    A missing peer makes the collectives fail after ``timeout`` instead of waiting for ever.
    """
    import deepspeed
    import deepspeed.comm
    from deepspeed.accelerator import get_accelerator

    rank, world_size, local_rank = ranks_from_env()
    if world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not set for a world of {world_size} processes; launch with "
                           "torchrun or deepspeed, or export MASTER_ADDR (an address every node resolves, e.g. "
                           "the first node's IP) and MASTER_PORT")
    # DeepSpeed's helpers read these back.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))

    device = rank_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    if get_accelerator().device_name() == "cpu":
        skip_shm_comm_build()
    deepspeed.comm.init_distributed(dist_backend=backend, timeout=timeout, dist_init_required=False)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def rank_device(local_rank: int = 0) -> torch.device:
    """The device of the rank with ``local_rank`` on its machine: its GPU where there are GPUs, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def shutdown_distributed(timeout_s: float = 60.0) -> None:
    """End the process group once every rank is done with it, and leave only when every rank has
    torn it down. A rank that exits while another is still closing its gloo connections makes that
    one abort ("terminate called without an active exception"); a barrier before the teardown does
    not prevent it (the teardown itself is not synchronised), so the ranks also meet afterwards on
    the group's key-value store, rank 0 last. A rank that never arrives (it died) is waited for at
    most ``timeout_s``. The process should then end with :func:`leave_process` (``hataori``'s command
    line does)."""
    import time

    from torch.distributed import distributed_c10d

    global _GROUP_ENDED
    if not torch.distributed.is_initialized():
        return
    _GROUP_ENDED = True
    store = distributed_c10d._get_default_store()
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if world_size == 1:
        return
    deadline = time.monotonic() + timeout_s
    for key in ("hataori/torn-down", "hataori/left"):
        store.add(key, 1)
        if key == "hataori/torn-down" or rank == 0:
            while store.add(key, 0) < world_size and time.monotonic() < deadline:
                time.sleep(0.005)


_GROUP_ENDED = False


def group_ended() -> bool:
    """Whether this process ran a process group and ended it (:func:`shutdown_distributed`)."""
    return _GROUP_ENDED


def leave_process(status: int) -> NoReturn:
    """End a process whose process group has ended with exit code ``status``, without the interpreter's
    finalization. What DeepSpeed and torch still hold (gloo's contexts and worker threads, the async work
    of ZeRO's collectives and its tensors) is otherwise torn down by finalization, in no set order, and
    a worker thread that needs the interpreter then makes the process abort ("terminate called without
    an active exception", exit -6) after all its work was done and saved, now and then under load.
    Everything the run writes is closed and flushed before the group ends; this flushes the standard
    streams and logging, then exits."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing more can be written there
            pass
    os._exit(status)


def skip_shm_comm_build() -> None:
    """Mark DeepSpeed's CPU shared-memory op incompatible so that it is not JIT-compiled (see above)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def ranks_from_env() -> tuple[int, int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return 0, 1, 0


def free_port() -> int:
    """A TCP port that was free a moment ago on this machine (for single-machine process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
