"""Cross-entropy of the output projection, computed in row chunks so the logits never exist in full.

What it computes: the mean over non-ignored rows of ``logsumexp(z) - z[target]`` where
``z = hidden @ weight[:vocab_size].T`` are the next-token logits, exactly what
``F.cross_entropy((hidden @ weight[:vocab_size].T).float(), targets, ignore_index=...)`` returns.

Why: for N tokens and a vocabulary of V, the plain path keeps an (N, V) logits tensor in the input
dtype, its fp32 copy and the fp32 gradient, several GB at N=8k and V=100k. Here the forward walks
over chunks of ``chunk_size`` rows: each chunk's logits are a matmul in the input dtype, upcast to
fp32, reduced to a per-row log-sum-exp and target logit, and dropped. Autograd keeps only hidden,
weight, targets and the N fp32 log-sum-exps. The backward recomputes each chunk's logits, forms
``(softmax - onehot) / num_valid`` (times the incoming gradient) in fp32, casts it to the input
dtype as the plain path's ``.float()`` backward would, and multiplies it back: into its rows of
grad_hidden, and summed into grad_weight. Peak extra memory is one chunk of logits (in fp32 and the
input dtype) plus, for fp16/bf16 weights, an fp32 accumulator of grad_weight's shape (chunk
partial products are summed in fp32 and rounded once at the end).

Dtypes: hidden and weight share one of fp16, bf16, fp32; the loss is fp32. Weight rows at and
beyond ``vocab_size`` (vocabulary padding) take no part and get a zero gradient. Pure PyTorch: it
runs wherever torch does, CPU included; the cost is recomputing the logits matmul in the backward
(one extra ``2 * N * V * D`` FLOPs, a third more than the plain forward + backward).

Like ``F.cross_entropy``, the loss is NaN when every target is ``ignore_index``. Targets outside
``[0, vocab_size)`` (other than ``ignore_index``) are an error, which costs one host sync per call.

``chunked_token_losses`` is the same computation without the mean: each row's loss (0 on ignored rows),
what a per-sequence objective sums (the log-probabilities of preference optimisation); its backward
takes a gradient per row.

``cross_entropy_ref`` beside it materialises the fp32 logits and calls ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

DEFAULT_CHUNK_SIZE = 2048
"""Rows per chunk: at V=100k one chunk's fp32 logits take 0.8 GB."""


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                  chunk_size: int, ignore_index: int) -> None:
    if hidden.ndim != 2 or weight.ndim != 2 or targets.ndim != 1:
        raise ValueError(f"chunked_cross_entropy expects hidden (N, D), weight (V_padded, D) and targets (N,); "
                         f"got {tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} need the same width D")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} need one entry per hidden row ({hidden.shape[0]})")
    if not 1 <= vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size must be in [1, {weight.shape[0]}] (the rows of weight), got {vocab_size}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if hidden.dtype not in DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one dtype among fp16, bf16, fp32; "
                        f"got {hidden.dtype} and {weight.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
    if not hidden.device == weight.device == targets.device:
        raise ValueError(f"hidden, weight and targets must be on one device; got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        raise ValueError(f"targets must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
                         f"got {targets[bad][:5].tolist()}")


def _chunk_logits(hidden_chunk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(rows, V) fp32 logits of one chunk: the matmul in the input dtype, then the upcast."""
    return F.linear(hidden_chunk, weight).float()


def _forward_rows(hidden, weight, targets, vocab_size, chunk_size, ignore_index):
    """(per-row losses (N,) fp32, 0 on ignored rows; per-row log-sum-exp (N,) fp32), chunk by chunk."""
    n_rows = hidden.shape[0]
    w = weight[:vocab_size]  # (V, D), a view
    valid = targets != ignore_index  # (N,)
    lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)  # (N,)
    rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)  # (N,)
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        logits = _chunk_logits(hidden[start:stop], w)  # (C, V) fp32
        lse[start:stop] = torch.logsumexp(logits, dim=-1)
        rows_valid = valid[start:stop]
        safe_targets = targets[start:stop].masked_fill(~rows_valid, 0).long()
        target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1)  # (C,)
        rows[start:stop] = torch.where(rows_valid, lse[start:stop] - target_logit, 0.0)
        del logits
    return rows, lse


def _backward_rows(ctx, row_grad: torch.Tensor):
    """The gradients of ``sum(row_grad * row losses)`` for hidden and weight (row_grad (N,) fp32, 0 on ignored
    rows): per chunk ``(softmax - onehot) * row_grad``, cast to the input dtype and multiplied back."""
    hidden, weight, targets, lse = ctx.saved_tensors
    vocab_size, chunk_size = ctx.vocab_size, ctx.chunk_size
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    n_rows = hidden.shape[0]
    w = weight[:vocab_size]  # (V, D)
    valid = targets != ctx.ignore_index  # (N,)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = grad_w32 = None
    if need_weight:
        grad_weight = torch.zeros_like(weight)  # (V_padded, D), padded rows stay zero
        grad_w32 = grad_weight[:vocab_size]
        if weight.dtype != torch.float32:
            grad_w32 = torch.zeros(vocab_size, weight.shape[1], dtype=torch.float32, device=weight.device)
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        h = hidden[start:stop]
        rows_valid = valid[start:stop]
        logits = _chunk_logits(h, w)  # (C, V) fp32
        grad_logits = torch.exp_(logits.sub_(lse[start:stop, None]))  # softmax, in place
        safe_targets = targets[start:stop].masked_fill(~rows_valid, 0).long()
        grad_logits.scatter_add_(1, safe_targets[:, None],
                                 torch.full_like(grad_logits[:, :1], -1.0))  # minus onehot
        grad_logits.mul_(row_grad[start:stop, None])
        grad_logits = grad_logits.to(hidden.dtype)  # (C, V), as the plain path's .float() backward
        if need_hidden:
            grad_hidden[start:stop] = grad_logits @ w  # (C, D)
        if need_weight:
            grad_w32 += (grad_logits.t() @ h).float()  # (V, D)
        del logits, grad_logits
    if need_weight and grad_w32.dtype != weight.dtype:
        grad_weight[:vocab_size] = grad_w32
    return grad_hidden, grad_weight, None, None, None, None


class ChunkedCrossEntropyFunction(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight[:vocab_size].T``; saves the per-row log-sum-exp only."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, chunk_size, ignore_index):
        rows, lse = _forward_rows(hidden, weight, targets, vocab_size, chunk_size, ignore_index)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.vocab_size, ctx.chunk_size, ctx.ignore_index = vocab_size, chunk_size, ignore_index
        return rows.sum() / (targets != ignore_index).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        targets = ctx.saved_tensors[2]
        valid = targets != ctx.ignore_index
        scale = grad_loss.float() / valid.sum()  # d loss / d (sum of row losses)
        return _backward_rows(ctx, torch.where(valid, scale, 0.0))


class ChunkedTokenLossFunction(torch.autograd.Function):
    """Each row's cross-entropy (N,) of ``hidden @ weight[:vocab_size].T`` (0 on ignored rows), chunked alike."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, chunk_size, ignore_index):
        rows, lse = _forward_rows(hidden, weight, targets, vocab_size, chunk_size, ignore_index)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.vocab_size, ctx.chunk_size, ctx.ignore_index = vocab_size, chunk_size, ignore_index
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        valid = ctx.saved_tensors[2] != ctx.ignore_index
        return _backward_rows(ctx, torch.where(valid, grad_rows.float(), 0.0))


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          vocab_size: int, chunk_size: int | None = None,
                          ignore_index: int = -100) -> torch.Tensor:
    """Mean (fp32) cross-entropy of the logits ``hidden @ weight[:vocab_size].T`` against ``targets``.

    hidden: (N, D); weight: (V_padded, D), the output projection (rows past vocab_size are padding);
    targets: (N,) ids in [0, vocab_size) or ignore_index. Rows with ignore_index do not count.
    chunk_size: rows per chunk; None: DEFAULT_CHUNK_SIZE.
    """
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    _check_inputs(hidden, weight, targets, vocab_size, chunk_size, ignore_index)
    return ChunkedCrossEntropyFunction.apply(hidden, weight, targets, vocab_size, chunk_size, ignore_index)


def chunked_token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         vocab_size: int, chunk_size: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Each row's (fp32) cross-entropy, ``F.cross_entropy(..., reduction="none")`` of the same logits: (N,),
    0 on rows whose target is ``ignore_index``. Arguments as :func:`chunked_cross_entropy`'s."""
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    _check_inputs(hidden, weight, targets, vocab_size, chunk_size, ignore_index)
    return ChunkedTokenLossFunction.apply(hidden, weight, targets, vocab_size, chunk_size, ignore_index)


def cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                      vocab_size: int, ignore_index: int = -100) -> torch.Tensor:
    """The plain path: the full (N, vocab_size) logits in the input dtype, upcast, ``F.cross_entropy``.

    fp16/bf16/fp32 logits are upcast to fp32; fp64 inputs stay fp64 (a high-precision reference)."""
    logits = F.linear(hidden, weight[:vocab_size])  # (N, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index)
