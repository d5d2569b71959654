"""Which precisions a device runs, asked before any work starts.

A precision a device cannot run fails late and far from its cause: DeepSpeed's CPU accelerator raises
``Type fp16 is not supported on your device`` in every rank, a GPU without bf16 fails in its first kernel.
``pretrain``, ``plan``, ``eval`` and ``generate`` ask :func:`check` first and refuse with the key, what
the device runs and what to use instead.

- **GPU**: fp32 everywhere; fp16 from compute capability 5.3; bf16 from 8.0 (Ampere), the capability
  PyTorch's own ``torch.cuda.is_bf16_supported(including_emulation=False)`` asks for.
- **CPU**: fp32 everywhere; bf16 and fp16 where PyTorch's oneDNN has kernels for them, as
  ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` and ``_is_mkldnn_fp16_supported()`` say. bf16 needs
  AVX512 (AVX512-BF16 or AMX runs it natively); without it PyTorch converts every bf16 matmul through
  fp32, slower than fp32 itself. fp16 needs AVX512-FP16 or AMX-FP16 (Sapphire Rapids and newer): an AMD
  EPYC with AVX512-BF16 has no fp16, and DeepSpeed's CPU accelerator asks oneDNN the same question.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hataori.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_CAPABILITY = {"fp32": (0, 0), "fp16": (5, 3), "bf16": (8, 0)}
"""The lowest CUDA compute capability that runs each precision."""
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")
"""The /proc/cpuinfo flags that decide a CPU's bf16 and fp16 (printed with the test suite's header)."""


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or ``this CPU`` where there is none to read."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "this CPU"


def cpu_flags() -> dict[str, bool]:
    """Each of :data:`CPU_FLAGS`: whether /proc/cpuinfo lists it (all False where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    listed = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            listed = set(line.partition(":")[2].split())
            break
    return {flag: flag in listed for flag in CPU_FLAGS}


def cpu_precisions() -> tuple[str, ...]:
    """The precisions this CPU runs (see the module docstring)."""

    def asks(name: str) -> bool:
        try:
            return bool(getattr(torch.ops.mkldnn, name)())
        except (AttributeError, RuntimeError):  # a torch built without oneDNN
            return False

    return ("fp32", *(["bf16"] if asks("_is_mkldnn_bf16_supported") else []),
            *(["fp16"] if asks("_is_mkldnn_fp16_supported") else []))


def gpu_precisions(capability: tuple[int, int]) -> tuple[str, ...]:
    """The precisions a GPU of CUDA compute capability ``capability`` (major, minor) runs."""
    return tuple(p for p in PRECISIONS if tuple(capability) >= GPU_CAPABILITY[p])


def supported(device: torch.device | str) -> tuple[str, ...]:
    """The precisions ``device`` runs, fp32 first."""
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_precisions(torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        return cpu_precisions()
    return ("fp32",)


def device_description(device: torch.device | str) -> str:
    """``GPU NAME (compute capability M.N)`` or ``this CPU (NAME)``, for messages."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"the GPU {torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return f"this CPU ({cpu_name()})" if device.type == "cpu" else str(device)


def why_not(precision: str, where: str, runs: tuple[str, ...], *, gpu: bool) -> str:
    """The message for ``precision`` refused on a device described as ``where`` that runs ``runs``."""
    if gpu:
        major, minor = GPU_CAPABILITY[precision]
        reason = f"{precision} needs compute capability {major}.{minor} or newer"
    elif precision == "bf16":
        reason = ("PyTorch's oneDNN has no bf16 kernels for it (they need AVX512; without them every bf16 matmul "
                  "is converted through fp32, slower than fp32)")
    else:
        reason = ("PyTorch's oneDNN has no fp16 kernels for it (they need AVX512-FP16 or AMX-FP16), and DeepSpeed "
                  "refuses fp16 there")
    instead = next(p for p in ("bf16", "fp32") if p in runs)
    listed = " and ".join(runs) if len(runs) <= 2 else f"{', '.join(runs[:-1])} and {runs[-1]}"
    return f"{precision} cannot run on {where}: {reason}; it runs {listed}: use {instead}"


def check(precision: str, device: torch.device | str, key: str) -> None:
    """Raise a :class:`ConfigError` for ``key`` when ``device`` cannot run ``precision``."""
    device = torch.device(device)
    runs = supported(device)
    if precision not in runs:
        raise ConfigError(key, why_not(precision, device_description(device), runs, gpu=device.type == "cuda"))


def check_gpu(precision: str, capability: tuple[int, int], key: str) -> None:
    """Raise a :class:`ConfigError` for ``key`` when GPUs of ``capability`` cannot run ``precision``."""
    runs = gpu_precisions(capability)
    if precision not in runs:
        major, minor = capability
        raise ConfigError(key, why_not(precision, f"GPUs of compute capability {major}.{minor}", runs, gpu=True))


def torch_device(text: str) -> torch.device:
    """The device ``--device`` names, refused unless this build of torch can run on it."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError("--device", f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("--device", f"{text}: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            cuda = torch.version.cuda
            built = f"built for CUDA {cuda} but finds no GPU" if cuda else "built without CUDA"
            raise ConfigError("--device", f"{text}: this torch {torch.__version__} is {built} "
                                          "(torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise ConfigError("--device", f"{text}: this machine has {count} CUDA device(s), "
                                          f"cuda:0 to cuda:{count - 1}")
    return device
