"""Importing our Triton kernels for tests: compiled on a GPU, through Triton's interpreter on the CPU.

Triton decides how to run a function when it is decorated, its own library included, so on the
CPU triton itself must first be imported with ``TRITON_INTERPRET=1``. The variable is set only
while a kernel module is imported and while its test module runs (``interpreter_env`` in a
module-scoped fixture), so other test modules and their subprocesses see the environment unchanged.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

BF16_ON_CPU = ("Triton's interpreter mishandles bf16 (tl.dot on bf16 operands gives garbage, "
               "fp32->bf16 casts truncate): bf16 is tested on a GPU")
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not ON_GPU, reason=BF16_ON_CPU))]
"""The dtypes every kernel is tested in: bf16 only on a GPU."""

SLACK = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}
"""Absolute slack on top of twice PyTorch's error (flash-attention's rule), a few ulps of values near
1. It matters where PyTorch's error is exactly 0: e.g. a one-token document has dQ = dK = 0, which
PyTorch's softmax backward gets exactly while the attention kernel's ``p * (dp - delta)`` leaves
rounding."""


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the reference a kernel's error is measured against: fp64 for fp32 inputs."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item()


@contextlib.contextmanager
def interpreter_env():
    """TRITON_INTERPRET=1 inside (on CPU), the environment as it was outside."""
    if ON_GPU:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


def _triton_built_for_interpreter() -> bool:
    """Whether the imported triton decorated its own library for the interpreter (another kernel test
    module may have imported it that way, with the variable set only meanwhile)."""
    standard = sys.modules.get("triton.language.standard")
    return standard is not None and type(standard.sum).__name__ == "InterpretedFunction"


def import_kernel(name: str):
    """``hataori.kernels.<name>`` built for this machine (skips the module where triton is absent)."""
    if not ON_GPU and "triton" in sys.modules and not _triton_built_for_interpreter():
        raise RuntimeError("triton was imported without TRITON_INTERPRET=1 before this test module; "
                           "run the kernel tests with TRITON_INTERPRET=1 set")
    with interpreter_env():
        pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
        module = importlib.import_module(f"hataori.kernels.{name}")
    assert ON_GPU or module.INTERPRET, f"hataori.kernels.{name} was imported without TRITON_INTERPRET=1"
    return module


def run_without_interpreter(script: str, *args: str, timeout: float = 300) -> list[str]:
    """Run ``python -c script args`` in a fresh process without TRITON_INTERPRET (so triton compiles
    for a GPU, or refuses to run without one) and return its output lines; fails with its stderr."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))  # triton_tests too
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def compile_for_hopper(script: str, *args: str) -> list:
    """The JSON rows a script prints as it compiles kernels for sm_90 (see run_without_interpreter)."""
    return [json.loads(line) for line in run_without_interpreter(script, *args)]


def ptxas_spills(kernel) -> int:
    """Bytes of registers a kernel compiled for sm_90 spills (stores plus loads), from ``ptxas -v``
    (the ptxas bundled with triton) on its PTX."""
    import triton

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        log = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", ptx.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    counts = re.findall(r"(\d+) bytes spill (?:stores|loads)", log)
    assert len(counts) == 2, log
    return sum(map(int, counts))


def compile_for_sm90(fn, dtype: str, constants: dict, *, types: dict[str, str] | None = None,
                     attrs: dict | None = None, **options):
    """``fn`` (a ``@triton.jit`` function) compiled by Triton's compiler for an sm_90 GPU, which needs no
    GPU: for scripts run by :func:`compile_for_hopper`. The signature gives constexpr parameters the
    values in ``constants``, upper-case (tensor) parameters pointers to ``dtype`` (e.g. "bf16") and the
    others i32, unless ``types`` names their type; ``options`` are num_warps, num_stages."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = types or {}
    signature = {param.name: "constexpr" if param.is_constexpr else
                 types.get(param.name, "*" + dtype if param.name.isupper() else "i32") for param in fn.params}
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)
