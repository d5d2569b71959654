"""FlashAttention-2 style attention in Triton: forward and backward, causal, grouped-query, varlen.

What it computes: ``softmax(q k^T * scale + mask) v`` per query head, where query head ``h`` reads
key/value head ``h // (H / H_kv)`` (grouped-query attention; the kernels index that head directly,
K and V are never repeated in memory). The mask is causal (or absent with ``causal=False``) and,
for packed batches, confines each token to its own document. Scores never reach memory: each query
block streams over key blocks with an online softmax, and the forward saves only the output and
the log-sum-exp of every row's scores, from which the backward recomputes the probabilities.

Layouts:

- padded batch: q (B, T, H, Dh), k and v (B, T, H_kv, Dh);
- packed (varlen): q (total_tokens, H, Dh), k and v (total_tokens, H_kv, Dh), with ``cu_seqlens``
  the int32 cumulative lengths ``[0, len_0, len_0 + len_1, ..., total_tokens]`` (flash-attn's
  varlen layout). Documents of any length >= 0 work, length 1 included.

Backward, without atomics: a preprocess kernel computes ``delta = rowsum(dO * O)``; a dK/dV kernel
runs one program per key block and key/value head, iterating over the query blocks of every query
head of the group (so the group's sum lands in registers, not in repeated tensors); a dQ kernel runs
one program per query block and query head, iterating over key blocks.

Dtypes: fp16 and bf16 (fp32 accumulation), and fp32 (exact fp32 dots, meant for tests).
Head dims: 16, 32, 64, 128. Any sequence length: loads and stores are masked at the ends.

Devices: a CUDA GPU, where block sizes are autotuned per head dim, group size, dtype and causality. On CPU the
kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set before this module is
imported (the choice is made when the kernels are decorated), with small fixed blocks; it is slow
and is meant for tests (its bf16 is unreliable: test bf16 on a GPU).

Limits: no dropout, no attention bias, no sliding window; q, k, v must share one sequence layout
(self-attention: the same ``cu_seqlens`` for queries and keys). At head dim 128 every kernel uses
all 255 registers on sm_90 and most block configs spill (ptxas's report); each stage keeps at least
one config that does not, for the autotuner to weigh against larger blocks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hataori.kernels import runtime

INTERPRET = bool(triton.knobs.runtime.interpret)
"""True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""

HEAD_DIMS = (16, 32, 64, 128)
"""Head dims the kernels support (powers of two, at least the 16 that ``tl.dot`` needs)."""

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * LN2


def unavailable_reason() -> str | None:
    """Why these kernels cannot run here, or None if they can."""
    return runtime.unavailable_reason(__name__, INTERPRET)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, lo, hi, seqlen,
               scale_log2, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold key blocks [lo, hi) into the running softmax (max m_i, sum l_i, unnormalised acc).

    Scores are kept in log2 units (already multiplied by scale * log2 e). Without MASK every key
    of every block is valid and visible to every row; with MASK keys past the document end are
    dropped and, if CAUSAL, keys after the row."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + offs_n  # (BLOCK_N,) key positions within the document
        kt_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None]  # (HEAD_DIM, BLOCK_N)
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, HEAD_DIM)
        if MASK:
            kt = tl.load(kt_ptrs, mask=cols[None, :] < seqlen, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < seqlen, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        if MASK:
            keep = cols[None, :] < seqlen
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_SEQLENS,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_ot, stride_oh, stride_lse_h, scale_log2,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one document and one query head. Grid (query blocks, docs, H)."""
    m_start = tl.program_id(0) * BLOCK_M
    doc = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(CU_SEQLENS + doc).to(tl.int64)  # first token of the document
    seqlen = (tl.load(CU_SEQLENS + doc + 1) - start).to(tl.int32)
    if m_start >= seqlen:
        return
    kv_head = head // GROUP

    rows = m_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions within the document
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < seqlen
    q_ptrs = Q + (start + rows)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        # Keys left of this query block are visible to all its rows: no mask. BLOCK_M is a
        # multiple of BLOCK_N, so these blocks end exactly at m_start.
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows,
                                   0, m_start, seqlen, scale_log2, HEAD_DIM, BLOCK_N, CAUSAL, False,
                                   DOT_PRECISION)
        # The diagonal: keys in [m_start, m_start + BLOCK_M), masked.
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows,
                                   m_start, tl.minimum(m_start + BLOCK_M, seqlen), seqlen, scale_log2,
                                   HEAD_DIM, BLOCK_N, CAUSAL, True, DOT_PRECISION)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows,
                                   0, seqlen, seqlen, scale_log2, HEAD_DIM, BLOCK_N, CAUSAL, True,
                                   DOT_PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = O + (start + rows)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * LN2  # natural log-sum-exp of the scaled scores
    tl.store(LSE + head * stride_lse_h + start + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h,
                      total, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32. Grid (token blocks, H)."""
    tokens = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    head = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = tokens < total
    o = tl.load(O + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + tokens[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                 mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + head * stride_delta_h + tokens, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    cols, lo, hi, seqlen, scale_log2, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add query blocks [lo, hi) of one query head to dK, dV of the key block ``cols``.

    Works on transposed scores (keys along rows). Query rows past the document end load a
    log-sum-exp of +inf, so their probabilities are exactly 0 and need no mask; MASK applies
    the causal mask, for query blocks that overlap the key block."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for m_start in range(lo, hi, BLOCK_M):
        rows = m_start + offs_m  # (BLOCK_M,)
        row_ok = rows < seqlen
        qt = tl.load(q_base + rows[None, :] * stride_qt + offs_d[:, None], mask=row_ok[None, :],
                     other=0.0)  # (HEAD_DIM, BLOCK_M)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None],
                     other=0.0)  # (BLOCK_M, HEAD_DIM)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M) scores, transposed
        pt = tl.math.exp2(st * scale_log2 - lse[None, :] * LOG2E)  # probabilities, transposed
        if MASK:
            pt = tl.where(cols[:, None] <= rows[None, :], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        dst = pt * (dpt - delta[None, :])  # softmax backward, transposed; scale applied at the end
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     stride_lse_h, scale, scale_log2,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dK, dV of BLOCK_N keys of one document and one key/value head, summed over
    the GROUP query heads that read it. Grid (key blocks, docs, H_kv)."""
    n_start = tl.program_id(0) * BLOCK_N
    doc = tl.program_id(1)
    kv_head = tl.program_id(2)
    start = tl.load(CU_SEQLENS + doc).to(tl.int64)
    seqlen = (tl.load(CU_SEQLENS + doc + 1) - start).to(tl.int32)
    if n_start >= seqlen:
        return

    cols = n_start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions within the document
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < seqlen
    k = tl.load(K + (start + cols)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
    v = tl.load(V + (start + cols)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g  # the query heads of this key/value head
        q_base = Q + start * stride_qt + head * stride_qh
        do_base = DO + start * stride_dot + head * stride_doh
        lse_base = LSE + head * stride_lse_h + start
        delta_base = DELTA + head * stride_lse_h + start
        if CAUSAL:
            # Query blocks overlapping this key block (BLOCK_N is a multiple of BLOCK_M): masked.
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                     stride_dot, cols, n_start, tl.minimum(n_start + BLOCK_N, seqlen),
                                     seqlen, scale_log2, HEAD_DIM, BLOCK_M, True, DOT_PRECISION)
            # Query blocks below it see all of its keys.
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                     stride_dot, cols, n_start + BLOCK_N, seqlen, seqlen, scale_log2,
                                     HEAD_DIM, BLOCK_M, False, DOT_PRECISION)
        else:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                                     stride_dot, cols, 0, seqlen, seqlen, scale_log2, HEAD_DIM, BLOCK_M,
                                     False, DOT_PRECISION)

    dk = dk * scale
    tl.store(DK + (start + cols)[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + (start + cols)[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, lo, hi, seqlen,
                  scale_log2, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                  MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add key blocks [lo, hi) to dQ of one query block. With MASK, keys past the document end are
    dropped and, if CAUSAL, keys after the row."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + offs_n
        kt_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None]  # (HEAD_DIM, BLOCK_N)
        vt_ptrs = v_base + cols[None, :] * stride_vt + offs_d[:, None]  # (HEAD_DIM, BLOCK_N)
        if MASK:
            kt = tl.load(kt_ptrs, mask=cols[None, :] < seqlen, other=0.0)
            vt = tl.load(vt_ptrs, mask=cols[None, :] < seqlen, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * scale_log2 - lse[:, None] * LOG2E)
        if MASK:
            keep = cols[None, :] < seqlen
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lse_h, scale, scale_log2,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dQ of BLOCK_M queries of one document and one query head. Grid (query blocks, docs, H)."""
    m_start = tl.program_id(0) * BLOCK_M
    doc = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(CU_SEQLENS + doc).to(tl.int64)
    seqlen = (tl.load(CU_SEQLENS + doc + 1) - start).to(tl.int32)
    if m_start >= seqlen:
        return
    kv_head = head // GROUP

    rows = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < seqlen
    q = tl.load(Q + (start + rows)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    do = tl.load(DO + (start + rows)[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    lse = tl.load(LSE + head * stride_lse_h + start + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + head * stride_lse_h + start + rows, mask=row_ok, other=0.0)
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows,
                           0, m_start, seqlen, scale_log2, HEAD_DIM, BLOCK_N, CAUSAL, False,
                           DOT_PRECISION)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows,
                           m_start, tl.minimum(m_start + BLOCK_M, seqlen), seqlen, scale_log2,
                           HEAD_DIM, BLOCK_N, CAUSAL, True, DOT_PRECISION)
    else:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows,
                           0, seqlen, seqlen, scale_log2, HEAD_DIM, BLOCK_N, CAUSAL, True,
                           DOT_PRECISION)

    dq = dq * scale
    tl.store(DQ + (start + rows)[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- block sizes

# Under the interpreter: fixed small blocks, unequal so that the split of the causal loops into a
# masked diagonal and unmasked rest is exercised the way the GPU configs use it.
_INTERPRET_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def _configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


def _tuned(kernel, pairs):
    """``kernel`` autotuned over ``pairs`` on GPU; under the interpreter the bare kernel."""
    if INTERPRET:
        return kernel
    return triton.autotune(_configs(pairs), key=["HEAD_DIM", "GROUP", "CAUSAL"])(kernel)


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen from ptxas's register report for sm_90 (fp16/bf16,
# head dims 64 and 128): configs that spill heavily at both head dims are left out, and each stage
# has one that does not spill at head dim 128 (forward 64x32, dK/dV 16x32, dQ 64x32 with 8 warps;
# tests/test_kernel_attention.py checks it); timing picks among the rest. The causal loops split at
# block edges, so query blocks must tile key blocks (forward, dQ: BLOCK_M % BLOCK_N == 0) and key
# blocks query blocks (dK/dV: BLOCK_N % BLOCK_M == 0).
FWD_CONFIGS = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
DKDV_CONFIGS = [(32, 128, 8, 3), (32, 64, 8, 3), (32, 64, 4, 3), (16, 64, 4, 3), (16, 32, 4, 1)]
DQ_CONFIGS = [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 8, 3), (64, 32, 4, 3)]
assert all(m % n == 0 for m, n, *_ in FWD_CONFIGS + DQ_CONFIGS + [_INTERPRET_BLOCKS["fwd"], _INTERPRET_BLOCKS["dq"]])
assert all(n % m == 0 for m, n, *_ in DKDV_CONFIGS + [_INTERPRET_BLOCKS["dkdv"]])

_fwd = _tuned(_fwd_kernel, FWD_CONFIGS)
_bwd_dkdv = _tuned(_bwd_dkdv_kernel, DKDV_CONFIGS)
_bwd_dq = _tuned(_bwd_dq_kernel, DQ_CONFIGS)


def _blocks(stage: str) -> dict[str, int]:
    """Explicit block sizes under the interpreter; autotuned (none passed) on GPU."""
    if INTERPRET:
        m, n = _INTERPRET_BLOCKS[stage]
        return {"BLOCK_M": m, "BLOCK_N": n}
    return {}


# ----------------------------------------------------------------------------- launchers


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"flash_attention expects q (total, H, Dh) and k, v (total, H_kv, Dh) of equal "
                         f"shapes; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    total, n_heads, head_dim = q.shape
    if k.shape[0] != total or k.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} need the same tokens and head_dim")
    if n_heads % k.shape[1] != 0:
        raise ValueError(f"the number of query heads ({n_heads}) must be a multiple of the number of "
                         f"key/value heads ({k.shape[1]})")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported; use one of {HEAD_DIMS}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise TypeError(f"q, k, v must share one dtype among fp16, bf16, fp32; "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(f"q, k, v and cu_seqlens must be on one device; got {q.device}, {k.device}, "
                         f"{v.device}, {cu_seqlens.device}")
    runtime.check_device(q.device, "attention", __name__, INTERPRET)
    if cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [0, ..., total_tokens] of at least 2 "
                         f"entries; got shape {tuple(cu_seqlens.shape)}, dtype {cu_seqlens.dtype}")


def _max_seqlen(cu_seqlens: torch.Tensor, total: int) -> int:
    """Longest document; checks the cumulative lengths (one device sync)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    first, last, shortest, longest = torch.stack(
        [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()
    if first != 0 or last != total or shortest < 0:
        raise ValueError(f"cu_seqlens must rise from 0 to total_tokens={total} without decreasing; "
                         f"got first {first}, last {last}, shortest document {shortest}")
    return longest


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs get exact fp32 dots, not tf32


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int | None = None, causal: bool = True,
                            softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed forward without autograd: (out (total, H, Dh), lse (H, total) fp32 natural log-sum-exp)."""
    _check_inputs(q, k, v, cu_seqlens)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    total, n_heads, head_dim = q.shape
    if max_seqlen is None:
        max_seqlen = _max_seqlen(cu_seqlens, total)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty_like(q)
    lse = torch.empty(n_heads, total, dtype=torch.float32, device=q.device)
    n_docs = cu_seqlens.numel() - 1
    if total == 0 or max_seqlen == 0:
        return out, lse.fill_(float("-inf"))

    def grid(meta):
        return triton.cdiv(max_seqlen, meta["BLOCK_M"]), n_docs, n_heads

    _fwd[grid](q, k, v, out, lse, cu_seqlens,
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               out.stride(0), out.stride(1), lse.stride(0), scale * math.log2(math.e),
               GROUP=n_heads // k.shape[1], HEAD_DIM=head_dim, CAUSAL=causal,
               DOT_PRECISION=_dot_precision(q.dtype), **_blocks("fwd"))
    return out, lse


def flash_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                             causal: bool, softmax_scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed backward: (dq, dk, dv) from the forward's inputs, output and log-sum-exp."""
    do = _last_dim_contiguous(do)
    total, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if total == 0 or max_seqlen == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)  # (H, total) fp32
    delta_block = 64
    _bwd_delta_kernel[(triton.cdiv(total, delta_block), n_heads)](
        out, do, delta, out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0), total,
        HEAD_DIM=head_dim, BLOCK_M=delta_block)

    n_docs = cu_seqlens.numel() - 1
    scale_log2 = softmax_scale * math.log2(math.e)
    common = dict(GROUP=n_heads // n_kv_heads, HEAD_DIM=head_dim, CAUSAL=causal,
                  DOT_PRECISION=_dot_precision(q.dtype))

    def dkdv_grid(meta):
        return triton.cdiv(max_seqlen, meta["BLOCK_N"]), n_docs, n_kv_heads

    _bwd_dkdv[dkdv_grid](q, k, v, do, lse, delta, dk, dv, cu_seqlens,
                         q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                         do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                         lse.stride(0), softmax_scale, scale_log2, **common, **_blocks("dkdv"))

    def dq_grid(meta):
        return triton.cdiv(max_seqlen, meta["BLOCK_M"]), n_docs, n_heads

    _bwd_dq[dq_grid](q, k, v, do, lse, delta, dq, cu_seqlens,
                     q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                     do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
                     softmax_scale, scale_log2, **common, **_blocks("dq"))
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Packed attention with the Triton forward and backward; saves q, k, v, out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
        _check_inputs(q, k, v, cu_seqlens)
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        if max_seqlen is None:
            max_seqlen = _max_seqlen(cu_seqlens, q.shape[0])
        out, lse = flash_attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen,
                                              ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------- public functions


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                    causal: bool = True, softmax_scale: float | None = None, *,
                    max_seqlen: int | None = None) -> torch.Tensor:
    """Attention of q over k, v with the Triton kernels; differentiable in q, k, v.

    Without ``cu_seqlens``: q (B, T, H, Dh), k and v (B, T, H_kv, Dh), each row one sequence;
    returns (B, T, H, Dh). With ``cu_seqlens`` (int32, ``[0, ..., total_tokens]``): q
    (total_tokens, H, Dh), k and v (total_tokens, H_kv, Dh), each document attending only within
    itself; returns (total_tokens, H, Dh). ``max_seqlen`` (the longest document, or any upper
    bound) spares a device sync and the check of ``cu_seqlens``. ``softmax_scale`` defaults to
    ``1 / sqrt(Dh)``. H must be a multiple of H_kv.
    """
    if cu_seqlens is not None:
        return FlashAttentionFunction.apply(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"without cu_seqlens, flash_attention expects q (B, T, H, Dh) and k, v "
                         f"(B, T, H_kv, Dh); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, Dh = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} need the same B and T")
    cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=q.device) * T  # (B + 1,)
    q, k, v = (x.reshape(B * T, *x.shape[2:]) for x in (q, k, v))  # (B * T, heads, Dh)
    out = FlashAttentionFunction.apply(q, k, v, cu_seqlens, T, causal, softmax_scale)  # (B * T, H, Dh)
    return out.view(B, T, H, Dh)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                  causal: bool = True, softmax_scale: float | None = None, upcast: bool = True
                  ) -> torch.Tensor:
    """What :func:`flash_attention` computes, in plain PyTorch: an explicit softmax over masked scores.

    Same layouts and arguments. ``upcast`` computes in fp32 (or in the inputs' dtype if wider,
    e.g. fp64) and returns that dtype; ``upcast=False`` computes and returns the inputs' dtype.
    Materialises (H, tokens, tokens) scores and repeats K, V per query head: for tests only.
    """
    shape = q.shape
    if cu_seqlens is None:
        B, T = q.shape[:2]
        q, k, v = (x.reshape(B * T, *x.shape[2:]) for x in (q, k, v))  # (B * T, heads, Dh)
        cu_seqlens = torch.arange(B + 1, device=q.device) * T  # (B + 1,)
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    total, n_heads, head_dim = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    group = n_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (total, H, Dh)
    v = v.repeat_interleave(group, dim=1)  # (total, H, Dh)

    token = torch.arange(total, device=q.device)
    doc = torch.searchsorted(cu_seqlens[1:].long(), token, right=True)  # (total,) document of each token
    allowed = doc[:, None] == doc[None, :]  # (total, total)
    if causal:
        allowed &= token[None, :] <= token[:, None]
    scores = torch.einsum("thd,shd->hts", q, k) * scale  # (H, total, total)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (H, total, total); every row sees at least itself
    out = torch.einsum("hts,shd->thd", probs, v)  # (total, H, Dh)
    return out.reshape(*shape[:-2], n_heads, head_dim)
