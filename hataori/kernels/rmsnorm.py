"""Fused RMSNorm in Triton, forward and backward, with an optional residual add before the norm.

What it computes, per row of width N (the last dimension), in fp32:

- without a residual: ``y = x / sqrt(mean(x^2) + eps) * weight``;
- with one: ``s = x + residual`` (rounded to the residual's dtype, as the residual stream is kept),
  ``y = s / sqrt(mean(s^2) + eps) * weight``; returns ``(y, s)``, so a pre-norm block reads and
  writes its residual stream once.

The forward runs one program per row, keeps the row in registers, and saves the per-row
``rstd = 1 / sqrt(mean(s^2) + eps)`` (fp32) for the backward. The backward computes
``dx = rstd * (g - xhat * mean(g * xhat))`` with ``g = dy * weight`` and ``xhat = s * rstd``, plus the
incoming gradient of ``s`` when there is a residual (then ``dresidual = dx``). Each backward program
walks a contiguous range of rows and accumulates its partial ``dweight`` in fp32 registers; the
partials (programs x N, fp32) are summed in PyTorch and cast once to the weight's dtype.

Dtypes: x (and residual) fp16, bf16 or fp32, accumulated in fp32; weight fp16, bf16 or fp32 (the
output takes x's dtype, dweight the weight's). Widths: any N up to MAX_WIDTH, not only powers of two
(loads and stores are masked); leading dimensions are flattened, the last must be contiguous
(otherwise a copy is made). Block sizes follow the width (the next power of two), with num_warps
from the block size; nothing is autotuned, so the interpreter and the GPU run the same launch.

Devices: a CUDA GPU; on CPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1``
is set before this module is imported. It is slow and for tests; its bf16 is unreliable (test bf16
on a GPU).

``rmsnorm_ref`` beside it computes the same in plain PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hataori.kernels import runtime

INTERPRET = bool(triton.knobs.runtime.interpret)
"""True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

MAX_WIDTH = 16384
"""Widest row: one row lives in registers (16k fp32 values across up to 16 warps)."""

_INTERPRET_BWD_PROGRAMS = 3
"""Backward programs under the interpreter: few, so that each walks several rows."""


def unavailable_reason() -> str | None:
    """Why these kernels cannot run here, or None if they can."""
    return runtime.unavailable_reason(__name__, INTERPRET)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _fwd_kernel(X, RES, W, Y, RES_OUT, RSTD, stride_x, stride_res, stride_y, stride_res_out, n_cols, eps,
                HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """One row: optional residual add (stored rounded), rstd, and the scaled output."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(RES + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        s_rounded = s.to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * stride_res_out + cols, s_rounded, mask=mask)
        s = s_rounded.to(tl.float32)  # normalise the residual stream as stored
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (s * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(DY, DRES_OUT, S, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_dres_out, stride_s, stride_dx,
                n_rows, n_cols, rows_per_program,
                HAS_DRES_OUT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [pid * rows_per_program, ...): dx per row, and this program's fp32 partial of dweight."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = s * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        if HAS_DRES_OUT:
            dx += tl.load(DRES_OUT + row * stride_dres_out + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


# ----------------------------------------------------------------------------- launchers


def _num_warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(rows, N) view (or copy, if the last dim is strided) of x (..., N)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.ndim < 1 or weight.ndim != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm expects x (..., N) and weight (N,); got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if not 1 <= weight.shape[0] <= MAX_WIDTH:
        raise ValueError(f"row width {weight.shape[0]} is not supported; rows of 1 to {MAX_WIDTH} elements")
    if x.dtype not in DTYPES or weight.dtype not in DTYPES:
        raise TypeError(f"x and weight must be fp16, bf16 or fp32; got {x.dtype} and {weight.dtype}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
        if residual.dtype not in DTYPES:
            raise TypeError(f"residual must be fp16, bf16 or fp32; got {residual.dtype}")
    devices = {x.device, weight.device} | ({residual.device} if residual is not None else set())
    if len(devices) != 1:
        raise ValueError(f"x, weight and residual must be on one device; got {sorted(map(str, devices))}")
    runtime.check_device(x.device, "RMSNorm", __name__, INTERPRET)


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Forward without autograd: (y like x, the sum s like residual or None, rstd (rows,) fp32)."""
    _check_inputs(x, weight, residual)
    shape, n_cols = x.shape, x.shape[-1]
    x2 = _rows(x)
    res2 = _rows(residual) if residual is not None else None
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    res_out = torch.empty((n_rows, n_cols), dtype=residual.dtype, device=x.device) if residual is not None else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        block_n = triton.next_power_of_2(n_cols)
        _fwd_kernel[(n_rows,)](
            x2, res2 if res2 is not None else x2, weight, y, res_out if res_out is not None else y, rstd,
            x2.stride(0), res2.stride(0) if res2 is not None else 0, y.stride(0),
            res_out.stride(0) if res_out is not None else 0, n_cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, num_warps=_num_warps(block_n))
    return y.view(shape), (res_out.view(shape) if res_out is not None else None), rstd


def rmsnorm_backward(dy: torch.Tensor, dres_out: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor,
                     rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like s, dweight like weight) from the normalised input s (x, or x + residual) and rstd."""
    shape, n_cols = s.shape, s.shape[-1]
    s2, dy2 = _rows(s), _rows(dy)
    dres2 = _rows(dres_out) if dres_out is not None else None
    n_rows = s2.shape[0]
    dx = torch.empty((n_rows, n_cols), dtype=s.dtype, device=s.device)
    if n_rows == 0:
        return dx.view(shape), torch.zeros_like(weight)
    if INTERPRET:
        n_programs = min(n_rows, _INTERPRET_BWD_PROGRAMS)
    else:
        n_programs = min(n_rows, 4 * torch.cuda.get_device_properties(s.device).multi_processor_count)
    rows_per_program = triton.cdiv(n_rows, n_programs)
    n_programs = triton.cdiv(n_rows, rows_per_program)
    dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=s.device)
    block_n = triton.next_power_of_2(n_cols)
    _bwd_kernel[(n_programs,)](
        dy2, dres2 if dres2 is not None else dy2, s2, weight, rstd, dx, dw_partial,
        dy2.stride(0), dres2.stride(0) if dres2 is not None else 0, s2.stride(0), dx.stride(0),
        n_rows, n_cols, rows_per_program,
        HAS_DRES_OUT=dres_out is not None, BLOCK_N=block_n, num_warps=_num_warps(block_n))
    return dx.view(shape), dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with optional residual add; saves s (x or the sum), weight and rstd."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        y, res_out, rstd = rmsnorm_forward(x, weight, residual, eps)
        ctx.has_residual = residual is not None
        ctx.residual_dtype = residual.dtype if residual is not None else None
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(res_out if res_out is not None else x, weight, rstd)
        if res_out is not None:
            return y, res_out
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dres_out=None):
        s, weight, rstd = ctx.saved_tensors
        dx, dweight = rmsnorm_backward(dy, dres_out, s, weight, rstd)
        if not ctx.has_residual:
            return dx, dweight, None, None
        dresidual = dx.to(ctx.residual_dtype, copy=True)
        return dx.to(ctx.x_dtype), dweight, dresidual, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None):
    """RMSNorm of x (..., N) with gain weight (N,) over the last dimension; differentiable in all tensors.

    Without ``residual``: returns y like x. With ``residual`` (shape of x): returns ``(y, s)`` where
    ``s = x + residual`` (in the residual's dtype) is what was normalised, the new residual stream.
    """
    return RMSNormFunction.apply(x, weight, residual, eps)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None,
                upcast: bool = True):
    """What :func:`rmsnorm` computes, in plain PyTorch.

    ``upcast``: the norm in fp32 (or in the inputs' dtype if wider, e.g. fp64), the result cast to
    x's dtype; ``upcast=False``: every operation in the inputs' own dtypes.
    """
    s, out_dtype = None, x.dtype
    if residual is not None:
        s = x.to(residual.dtype) + residual
        x = s
    if upcast:
        wide = torch.promote_types(x.dtype, torch.float32)
        xw = x.to(wide)
        y = (xw * torch.rsqrt(xw.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(wide)).to(out_dtype)
    else:
        y = (x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(x.dtype)).to(out_dtype)
    return y if s is None else (y, s)
