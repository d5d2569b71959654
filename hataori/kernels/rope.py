"""Fused rotary position embedding (RoPE) in Triton, forward and backward, for q and k in one launch.

What it computes, for each token at position p (``positions[b, t]``, or ``t`` without positions) and
each head, with ``half = Dh / 2``, ``c = cos[p, i]`` and ``s = sin[p, i]`` for the channel pair
``(i, i + half)`` (the "rotate half" layout of ``hataori.model.model.rope_tables``)::

    out[i]        = x[i] * c - x[i + half] * s
    out[i + half] = x[i + half] * c + x[i] * s

that is ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[half:], x[:half])``,
computed in fp32 from the inputs and rounded once to the input's dtype. Only the first ``Dh / 2``
columns of the tables are read: the rotate-half tables repeat them in the second half.

The backward is the rotation by the negative angle (``s`` replaced by ``-s``), by the same kernel:
``dx[i] = dy[i] * c + dy[i + half] * s`` and ``dx[i + half] = dy[i + half] * c - dy[i] * s``, in
fp32, rounded once. It needs only the tables and positions, so q and k are not saved.

Layout of the launch: one kernel launch rotates both q (B, T, H, Dh) and k (B, T, H_kv, Dh). The grid
is (B * T, q head-blocks + k head-blocks): program (row, j) handles token ``row`` and the j-th block of
q heads, or, for j past q's blocks, a block of k heads. A program loads its token's position and the
``Dh / 2`` table entries once and applies them to a (heads, Dh / 2) tile of each half of the heads.
Block sizes follow the head count and width (powers of two, masked), nothing is autotuned, so the
interpreter and the GPU run the same launch.

Dtypes: q and k fp16, bf16 or fp32 (each keeps its own); the tables fp16, bf16 or fp32 (usually fp32;
loaded and used in fp32); positions int32 or int64. Head dims: any even Dh from 2 to MAX_HEAD_DIM; any
T and head counts (H_kv may differ from H, as in grouped-query attention). Strides of the batch, time
and head dims are followed (e.g. ``.view()``s of a fused projection, transposed (B, H, T, Dh) tensors);
a strided last dim is copied first. Outputs are contiguous.

Limits: positions are not bounds-checked against the tables' length (that would synchronise with the
device); each must lie in ``[0, max_seq_len)``. Without positions, T may not exceed max_seq_len.

Devices: a CUDA GPU; on CPU the kernel runs under Triton's interpreter when ``TRITON_INTERPRET=1`` is
set before this module is imported. It is slow and for tests; its bf16 is unreliable (test bf16 on a
GPU).

``rope_ref`` beside it computes the same in plain PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hataori.kernels import runtime

INTERPRET = bool(triton.knobs.runtime.interpret)
"""True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
POSITION_DTYPES = (torch.int32, torch.int64)

MAX_HEAD_DIM = 1024
"""Widest head: a program holds at least one head's two halves in registers."""

_TILE = 2048
"""Most elements in a program's tile of each half (heads x Dh/2); num_warps gives each thread about 8
of them, about 40-50 registers on sm_90 with no spills."""


def unavailable_reason() -> str | None:
    """Why these kernels cannot run here, or None if they can."""
    return runtime.unavailable_reason(__name__, INTERPRET)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _rotate_heads(X, Y, c, s, x_row, y_row, head_start, n_heads, stride_xh, head_dim, half,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate heads [head_start, head_start + BLOCK_H) of one token; X, Y point at the token's row."""
    heads = head_start + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < half)
    x_lo = (X + x_row) + (heads[:, None] * stride_xh + cols[None, :])  # (BLOCK_H, BLOCK_HALF)
    y_lo = (Y + y_row) + (heads[:, None] * head_dim + cols[None, :])  # outputs are contiguous
    x1 = tl.load(x_lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_lo + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_lo, (x1 * c[None, :] - x2 * s[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_lo + half, (x2 * c[None, :] + x1 * s[None, :]).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, POS,
                 stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                 stride_cos, stride_sin, stride_pb, stride_pt,
                 seq_len, n_q_heads, n_k_heads, head_dim, n_q_blocks,
                 HAS_POSITIONS: tl.constexpr, BACKWARD: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Token ``program_id(0)``: a block of q heads, or (past q's blocks) of k heads, rotated by its angle."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    b = row // seq_len
    t = row % seq_len
    if HAS_POSITIONS:
        pos = tl.load(POS + b * stride_pb + t * stride_pt).to(tl.int64)
    else:
        pos = t
    half = head_dim // 2
    cols = tl.arange(0, BLOCK_HALF)
    c = tl.load(COS + pos * stride_cos + cols, mask=cols < half, other=0.0).to(tl.float32)
    s = tl.load(SIN + pos * stride_sin + cols, mask=cols < half, other=0.0).to(tl.float32)
    if BACKWARD:
        s = -s  # the transpose of a rotation is the rotation by the negative angle
    if block < n_q_blocks:
        _rotate_heads(Q, QO, c, s, b * stride_qb + t * stride_qt, row * n_q_heads * head_dim,
                      block * BLOCK_HQ, n_q_heads, stride_qh, head_dim, half,
                      BLOCK_H=BLOCK_HQ, BLOCK_HALF=BLOCK_HALF)
    else:
        _rotate_heads(K, KO, c, s, b * stride_kb + t * stride_kt, row * n_k_heads * head_dim,
                      (block - n_q_blocks) * BLOCK_HK, n_k_heads, stride_kh, head_dim, half,
                      BLOCK_H=BLOCK_HK, BLOCK_HALF=BLOCK_HALF)


# ----------------------------------------------------------------------------- launchers


def _block_sizes(n_q_heads: int, n_k_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_HQ, BLOCK_HK, BLOCK_HALF, num_warps): head blocks of at most _TILE elements per half."""
    block_half = triton.next_power_of_2(head_dim // 2)
    cap = max(_TILE // block_half, 1)
    block_hq = min(triton.next_power_of_2(max(n_q_heads, 1)), cap)
    block_hk = min(triton.next_power_of_2(max(n_k_heads, 1)), cap)
    num_warps = min(max(max(block_hq, block_hk) * block_half // 256, 1), 8)
    return block_hq, block_hk, block_half, num_warps


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor | None) -> None:
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"rope expects q (B, T, H, Dh) and k (B, T, H_kv, Dh) with the same B, T and Dh; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, _, head_dim = q.shape
    if head_dim % 2 or not 2 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is not supported; it must be even, from 2 to {MAX_HEAD_DIM}")
    if q.dtype not in DTYPES or k.dtype not in DTYPES:
        raise TypeError(f"q and k must be fp16, bf16 or fp32; got {q.dtype} and {k.dtype}")
    if cos.dtype not in DTYPES or sin.dtype not in DTYPES:
        raise TypeError(f"cos and sin tables must be fp16, bf16 or fp32; got {cos.dtype} and {sin.dtype}")
    if cos.ndim != 2 or cos.shape != sin.shape or cos.shape[1] < head_dim:
        raise ValueError(f"cos and sin must both be (max_seq_len, Dh) with Dh >= the head dim {head_dim}; "
                         f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if positions is None:
        if T > cos.shape[0]:
            raise ValueError(f"sequence length {T} exceeds the tables' max_seq_len {cos.shape[0]}")
    else:
        if positions.shape != (B, T):
            raise ValueError(f"positions must be (B, T) = {(B, T)}; got {tuple(positions.shape)}")
        if positions.dtype not in POSITION_DTYPES:
            raise TypeError(f"positions must be int32 or int64; got {positions.dtype}")
    tensors = (q, k, cos, sin) + ((positions,) if positions is not None else ())
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"q, k, cos, sin and positions must be on one device; got {sorted(map(str, devices))}")
    runtime.check_device(q.device, "RoPE", __name__, INTERPRET)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            positions: torch.Tensor | None, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (contiguous) copies of q and k by the tables' angles, or by their negatives if backward."""
    q, k, cos, sin = map(_last_dim_contiguous, (q, k, cos, sin))
    B, T, H, head_dim = q.shape
    H_kv = k.shape[2]
    q_out = torch.empty((B, T, H, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, T, H_kv, head_dim), dtype=k.dtype, device=k.device)
    block_hq, block_hk, block_half, num_warps = _block_sizes(H, H_kv, head_dim)
    n_q_blocks, n_k_blocks = triton.cdiv(H, block_hq), triton.cdiv(H_kv, block_hk)
    if B * T == 0 or n_q_blocks + n_k_blocks == 0:
        return q_out, k_out
    pos = positions if positions is not None else q  # unused without positions
    _rope_kernel[(B * T, n_q_blocks + n_k_blocks)](
        q, k, q_out, k_out, cos, sin, pos,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cos.stride(0), sin.stride(0),
        positions.stride(0) if positions is not None else 0, positions.stride(1) if positions is not None else 0,
        T, H, H_kv, head_dim, n_q_blocks,
        HAS_POSITIONS=positions is not None, BACKWARD=backward,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, num_warps=num_warps)
    return q_out, k_out


def rope_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward without autograd: (q_rot like q, k_rot like k), both contiguous."""
    _check_inputs(q, k, cos, sin, positions)
    return _launch(q, k, cos, sin, positions, backward=False)


def rope_backward(dq_rot: torch.Tensor, dk_rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk) from the gradients of the rotated q and k: their rotation by the negative angles."""
    return _launch(dq_rot, dk_rot, cos, sin, positions, backward=True)


class RoPEFunction(torch.autograd.Function):
    """Rotary embedding of q and k; saves only the tables and positions (the backward is linear)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, positions):
        q_rot, k_rot = rope_forward(q, k, cos, sin, positions)
        ctx.save_for_backward(cos, sin, positions)
        return q_rot, k_rot

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq_rot, dk_rot):
        cos, sin, positions = ctx.saved_tensors
        dq, dk = rope_backward(dq_rot, dk_rot, cos, sin, positions)
        return dq, dk, None, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (B, T, H, Dh) and k (B, T, H_kv, Dh); differentiable in q and k.

    ``cos``, ``sin``: (max_seq_len, Dh) rotate-half tables (``hataori.model.model.rope_tables``).
    ``positions``: (B, T) integer positions into the tables (restarting at each packed document), or
    None for 0..T-1 in every row. Returns ``(q_rot, k_rot)`` in q's and k's dtypes.
    """
    return RoPEFunction.apply(q, k, cos, sin, positions)


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, upcast: bool) -> torch.Tensor:
    """x (B, T, heads, Dh) rotated by cos, sin (B or 1, T, Dh / 2)."""
    half = x.shape[-1] // 2
    dtype = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    xw = x.to(dtype)
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(2).to(dtype)  # (B or 1, T, 1, Dh), broadcast over heads
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(2).to(dtype)
    rotated = torch.cat([-xw[..., half:], xw[..., :half]], dim=-1)  # (B, T, heads, Dh)
    return (xw * cos + rotated * sin).to(x.dtype)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             positions: torch.Tensor | None = None, upcast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`rope` computes, in plain PyTorch (the first Dh/2 table columns, repeated).

    ``upcast``: the rotation in fp32 (or in the inputs' dtype if wider, e.g. fp64), the result cast
    to each input's dtype, as ``hataori.model.model.apply_rope``; ``upcast=False``: every operation
    in the inputs' own dtype (the tables cast to it).
    """
    T, half = q.shape[1], q.shape[-1] // 2
    cos, sin = cos[:, :half], sin[:, :half]  # (max_seq_len, Dh / 2)
    if positions is None:
        cos, sin = cos[None, :T], sin[None, :T]  # (1, T, Dh / 2)
    else:
        cos, sin = cos[positions], sin[positions]  # (B, T, Dh / 2)
    return _rotate_ref(q, cos, sin, upcast), _rotate_ref(k, cos, sin, upcast)
