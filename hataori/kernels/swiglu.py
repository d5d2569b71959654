"""Fused SwiGLU activation in Triton, forward and backward.

What it computes, elementwise over gate and up of one shape (..., N), in fp32:

- forward: ``y = silu(gate) * up = gate * s * up`` with ``s = sigmoid(gate)``, rounded once to the
  inputs' dtype (eager ``F.silu(gate) * up`` rounds twice in fp16/bf16);
- backward: ``s`` is recomputed from the saved gate, so only gate and up are kept for it (eager
  PyTorch keeps gate, silu(gate) and up), and ``dgate = dy * up * s * (1 + gate * (1 - s))``,
  ``dup = dy * gate * s``, each rounded once.

Both kernels are memory-bound: a 1-D grid of programs, each on a tile of BLOCK_M rows x BLOCK_N
columns (about TILE elements; BLOCK_N the width's next power of two up to MAX_BLOCK_N). Tile sizes
follow the width only and nothing is autotuned, so the interpreter and the GPU run the same launch.
Row offsets are int64, so tensors past 2^31 elements are addressed correctly.

Dtypes: gate and up fp16, bf16 or fp32, both the same; the output and gradients take that dtype.
Shapes: any width N (loads and stores are masked), any number of rows, zero included; leading
dimensions are flattened. The last dimension must be contiguous (otherwise a copy is made); row
strides are followed, so gate and up may be the two halves ``x.chunk(2, -1)`` of one merged
projection output without a copy. The gradients are two new contiguous tensors: autograd's chunk
backward concatenates whatever it is given, so writing them into one shared buffer would save nothing.

Devices: a CUDA GPU; on CPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1``
is set before this module is imported. It is slow and for tests; its bf16 is unreliable (test bf16
on a GPU).

``swiglu_ref`` beside it computes the same in plain PyTorch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hataori.kernels import runtime

INTERPRET = bool(triton.knobs.runtime.interpret)
"""True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

TILE = 2048
"""Elements per program: 16 a thread at 4 warps, enough to keep loads vectorised and in flight."""

MAX_BLOCK_N = 1024
"""Widest tile; wider rows are split across programs."""

NUM_WARPS = 4


def unavailable_reason() -> str | None:
    """Why these kernels cannot run here, or None if they can."""
    return runtime.unavailable_reason(__name__, INTERPRET)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows (int64, (BLOCK_M, 1)), columns ((1, BLOCK_N)) and in-bounds mask."""
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(n_cols, BLOCK_N)
    rows = (pid // col_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return rows[:, None], cols[None, :], mask


@triton.jit
def _fwd_kernel(G, U, Y, stride_g, stride_u, stride_y, n_rows, n_cols,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile: y = gate * sigmoid(gate) * up in fp32, rounded once."""
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(Y + rows * stride_y + cols, (g * s * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(G, U, DY, DG, DU, stride_g, stride_u, stride_dy, stride_dg, stride_du, n_rows, n_cols,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile: sigmoid recomputed from gate, then dgate and dup in fp32, each rounded once."""
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    tl.store(DG + rows * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _blocks(n_cols: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for rows of n_cols: a tile of TILE elements, as wide as the row allows."""
    block_n = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK_N)
    return TILE // block_n, block_n


def _grid(n_rows: int, n_cols: int) -> tuple[int]:
    block_m, block_n = _blocks(n_cols)
    return (triton.cdiv(n_rows, block_m) * triton.cdiv(n_cols, block_n),)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(rows, N) view (or copy, if the last dim is strided or the rows cannot be flattened) of x (..., N)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: ambiguous when N is 0


def _check_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.ndim < 1 or gate.shape != up.shape:
        raise ValueError(f"swiglu expects gate and up of one shape (..., N); got gate {tuple(gate.shape)}, "
                         f"up {tuple(up.shape)}")
    if gate.dtype not in DTYPES or gate.dtype != up.dtype:
        raise TypeError(f"gate and up must both be fp16, both bf16 or both fp32; got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"gate and up must be on one device; got {gate.device} and {up.device}")
    runtime.check_device(gate.device, "SwiGLU", __name__, INTERPRET)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Forward without autograd: silu(gate) * up, a new contiguous tensor like gate."""
    _check_inputs(gate, up)
    shape, n_cols = gate.shape, gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    n_rows = g2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if y.numel() > 0:
        block_m, block_n = _blocks(n_cols)
        _fwd_kernel[_grid(n_rows, n_cols)](
            g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), n_rows, n_cols,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS)
    return y.view(shape)


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup), new contiguous tensors like gate, from the upstream gradient dy and the inputs."""
    shape, n_cols = gate.shape, gate.shape[-1]
    g2, u2, dy2 = _rows(gate), _rows(up), _rows(dy.to(gate.dtype))
    n_rows = g2.shape[0]
    dg = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    du = torch.empty_like(dg)
    if dg.numel() > 0:
        block_m, block_n = _blocks(n_cols)
        _bwd_kernel[_grid(n_rows, n_cols)](
            g2, u2, dy2, dg, du, g2.stride(0), u2.stride(0), dy2.stride(0), dg.stride(0), du.stride(0),
            n_rows, n_cols, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS)
    return dg.view(shape), du.view(shape)


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up; saves gate and up only, and recomputes sigmoid(gate) in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        y = swiglu_forward(gate, up)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = swiglu_backward(dy, gate, up)
        return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for gate and up of one shape (..., N) and dtype; differentiable in both.

    Computed in fp32 and rounded once; returns a new contiguous tensor (..., N). gate and up may be
    the halves of one merged projection output (``.chunk(2, -1)``): their row strides are followed.
    """
    return SwiGLUFunction.apply(gate, up)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """What :func:`swiglu` computes, in plain PyTorch.

    ``upcast``: in fp32 (or in the inputs' dtype if wider, e.g. fp64), the result cast once to
    gate's dtype; ``upcast=False``: ``F.silu(gate) * up`` in the inputs' own dtype, as the model's MLP.
    """
    if not upcast:
        return F.silu(gate) * up
    wide = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(wide)) * up.to(wide)).to(gate.dtype)
