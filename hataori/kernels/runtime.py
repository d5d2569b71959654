"""Where our Triton kernels can run: on a CUDA device, or on CPU through Triton's interpreter.

Triton decides between compiling and interpreting when a kernel is decorated, so each kernel module
reads ``triton.knobs.runtime.interpret`` once at its import and passes that flag here.
"""

from __future__ import annotations

import torch


def unavailable_reason(module: str, interpret: bool) -> str | None:
    """Why the kernels of ``module`` (e.g. ``hataori.kernels.attention``) cannot run here, or None."""
    if interpret or torch.cuda.is_available():
        return None
    return (f"needs a CUDA device, or TRITON_INTERPRET=1 set before {module} is imported to run on CPU "
            "through Triton's interpreter")


def check_device(device: torch.device, what: str, module: str, interpret: bool) -> None:
    """Refuse tensors the kernels cannot reach: without the interpreter they must be on CUDA."""
    if not interpret and device.type != "cuda":
        raise ValueError(f"the Triton {what} kernels run on a CUDA device, got tensors on {device} "
                         f"(set TRITON_INTERPRET=1 before importing {module} to run on CPU)")
