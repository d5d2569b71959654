"""A Llama-style decoder-only transformer and its config.

Pre-norm blocks of grouped-query attention with rotary position embeddings and a SwiGLU MLP,
RMSNorm everywhere, no biases. Optional: RMSNorm on queries and keys per head (qk-norm), tied
input and output embeddings, document masking of packed sequences, activation checkpointing.

Kernels. Attention runs on the backend ``attention_backend`` names (hataori.model.attention); the
RMSNorms, the rotary embedding and the SwiGLU activation run as plain PyTorch ops or as the fused
Triton kernels of hataori.kernels (``fused_kernels``), where the norm before each MLP also adds the
attention output to the residual stream in the same pass. Both choices default to ``auto``: the
fastest implementation that can run on the device the model's tensors are on, plain PyTorch and
SDPA on a CPU. The loss can be computed in chunks with the output projection (``chunked_loss``).

Shapes: B batch, T sequence length, D d_model, H n_heads, H_kv n_kv_heads, Dh head_dim, V vocab.

Packed sequences and positions. With ``doc_masking`` the model takes ``doc_ids`` (B, T) from the
packed loader: a token attends only to earlier tokens of its own document, and its rotary position
restarts at 0 where its document starts. A packed row then computes what the documents would
compute one by one, so packing changes throughput but not the model (tests/test_model.py checks
this). The mask is what makes them equal: rotary scores depend only on position differences, so
within one document absolute positions would give the same result up to rounding. Restarting
makes the rounding match too, as an unpacked document's positions (in training and at inference)
also start at 0. Without ``doc_masking`` (or without ``doc_ids``)
positions are 0..T-1 across the row and attention is plainly causal, as in Hugging Face's Llama.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hataori.config import require
from hataori.errors import ConfigError
from hataori.kernels.cross_entropy import chunked_cross_entropy, chunked_token_losses
from hataori.model.attention import (BACKENDS, Documents, attention, document_positions, get_backend, resolve_backend,
                                     triton_installed)
from hataori.model.cache import KVCache

IGNORE_INDEX = -100
"""Target value of tokens that do not count in the loss (padding)."""

FUSED_KERNELS = ("torch", "triton", "auto")
"""Choices of ``ModelConfig.fused_kernels``."""

FUSED_KERNEL_MODULES = ("rmsnorm", "rope", "swiglu")
"""The hataori.kernels modules ``fused_kernels: triton`` uses."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Shape and options of a :class:`Transformer`.

    ``None`` fields (n_kv_heads, head_dim, ffn_hidden) are derived in ``__post_init__`` and stored,
    so a recorded config shows the shape that was built. When changing a shape field with
    ``dataclasses.replace``, set the derived ones back to None to have them derived again.
    """

    vocab_size: int
    """Tokens the tokenizer produces; ids are 0..vocab_size-1."""
    pad_vocab_multiple: int = 128
    """Embedding and output rows are padded to a multiple of this for fast matmuls (see padded_vocab_size)."""
    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Query heads per attention layer."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); must divide n_heads. None: n_heads (multi-head)."""
    head_dim: int | None = None
    """Width of one head; even (rotary). None: d_model // n_heads."""
    ffn_hidden: int | None = None
    """Hidden width of the SwiGLU MLP. None: 8/3 * d_model rounded up to a multiple of ffn_multiple_of."""
    ffn_multiple_of: int = 256
    """Rounding of the derived ffn_hidden (Llama's multiple_of)."""
    rope_base: float = 10000.0
    """Base (theta) of the rotary frequencies; larger for longer contexts."""
    max_seq_len: int
    """Longest sequence (and rotary table); longer inputs are an error."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    qk_norm: bool = False
    """RMSNorm on queries and keys per head, before the rotary embedding (not in HF Llama)."""
    tie_embeddings: bool = False
    """Share one matrix between the input embedding and the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight matrix."""
    scaled_init: bool = True
    """Scale the init of the residual output projections (attention out, MLP down) by 1/sqrt(2 * n_layers)."""
    attention_backend: str = "auto"
    """Name of the attention implementation, one of hataori.model.attention.BACKENDS: sdpa, triton,
    flash_attn, or auto (flash-attn, else the Triton kernel on CUDA; SDPA on CPU)."""
    fused_kernels: str = "auto"
    """RMSNorm (with the residual add before the MLP norm), RoPE and SwiGLU: ``torch`` (plain PyTorch
    ops), ``triton`` (the fused kernels of hataori.kernels; an error where they cannot run) or
    ``auto`` (the Triton kernels for CUDA tensors when triton is installed, torch otherwise)."""
    doc_masking: bool = True
    """With doc_ids, attend within documents only and restart positions at each document."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass instead of storing its activations (training memory)."""
    chunked_loss: bool = False
    """With targets, compute the loss in row chunks with the output projection fused in
    (hataori.kernels.cross_entropy), never holding the full logits; same loss and gradients."""

    def __post_init__(self) -> None:
        for key in ("vocab_size", "pad_vocab_multiple", "d_model", "n_layers", "n_heads",
                    "ffn_multiple_of", "max_seq_len"):
            value = getattr(self, key)
            require(value >= 1, key, f"must be a positive integer, got {value}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        require(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
                f"must divide n_heads={self.n_heads} (each key/value head serves a group of query heads); "
                f"got {self.n_kv_heads}")
        if self.head_dim is None:
            require(self.d_model % self.n_heads == 0, "n_heads",
                    f"must divide d_model={self.d_model} to derive head_dim; got {self.n_heads} "
                    f"(or set head_dim explicitly)")
            self.head_dim = self.d_model // self.n_heads
        require(self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim",
                f"must be even for the rotary embedding, got {self.head_dim}")
        if self.ffn_hidden is None:
            self.ffn_hidden = _round_up(int(8 * self.d_model / 3), self.ffn_multiple_of)
        require(self.ffn_hidden >= 1, "ffn_hidden", f"must be a positive integer, got {self.ffn_hidden}")
        for key in ("rope_base", "norm_eps", "init_std"):
            value = getattr(self, key)
            require(value > 0, key, f"must be positive, got {value}")
        require(self.attention_backend in BACKENDS, "attention_backend",
                f"unknown attention backend {self.attention_backend!r}; "
                f"choose one of {', '.join(sorted(BACKENDS))}")
        require(self.fused_kernels in FUSED_KERNELS, "fused_kernels",
                f"must be one of {', '.join(FUSED_KERNELS)}; got {self.fused_kernels!r}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output matrices: vocab_size rounded up to pad_vocab_multiple."""
        return _round_up(self.vocab_size, self.pad_vocab_multiple)

    def build(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
        """A freshly initialised model with its parameters in ``dtype`` on ``device``, allocated there
        once: it is constructed without storage (PyTorch's meta device), then given memory and
        initialised in place, so a bf16 model on a GPU never passes through an fp32 or CPU copy.

        The initial weights depend on the seed and the device's generator only (not on how the model
        was constructed): :meth:`Transformer.initialize` draws them in a fixed order. Fails with a
        ConfigError if the chosen attention backend or kernels cannot run here.
        """
        self.check_kernels()
        with torch.device("meta"):
            model = Transformer(self)
        return model.to(dtype=dtype).to_empty(device=device).initialize()

    def check_kernels(self) -> None:
        """A ConfigError if the chosen attention backend or fused kernels cannot run here."""
        get_backend(self.attention_backend)
        if self.fused_kernels == "triton":
            reason = fused_kernels_unavailable()
            if reason is not None:
                raise ConfigError("fused_kernels", f"the Triton kernels cannot run here: {reason}; "
                                  f"choose fused_kernels: auto or torch")

    def kernels_on(self, device: torch.device, dtype: torch.dtype) -> str:
        """Which attention backend and norm/RoPE/SwiGLU kernels run for ``dtype`` tensors on ``device``,
        ``auto`` resolved, e.g. ``"attention flash_attn (auto), RMSNorm/RoPE/SwiGLU triton (auto)"``."""
        attention_backend = resolve_backend(self.attention_backend, device, dtype, self.head_dim)
        fused = use_triton(self.fused_kernels, device)
        return (f"attention {attention_backend} ({self.attention_backend}), "
                f"RMSNorm/RoPE/SwiGLU {'triton' if fused else 'torch'} ({self.fused_kernels})")

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name and shape of every entry of the built model's state dict, found without allocating
        (the model constructed on PyTorch's meta device)."""
        with torch.device("meta"):
            return {name: tuple(t.shape) for name, t in Transformer(self).state_dict().items()}

    def num_params(self) -> int:
        """Parameters of the built model (padded vocabulary rows included), counted from the shape alone."""
        d, v = self.d_model, self.padded_vocab_size
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = d * q_width + 2 * d * kv_width + q_width * d + (2 * self.head_dim if self.qk_norm else 0)
        mlp = 3 * d * self.ffn_hidden
        block = attn + mlp + 2 * d  # + attention and MLP norms
        embeddings = v * d if self.tie_embeddings else 2 * v * d
        return embeddings + self.n_layers * block + d  # + final norm

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at ``seq_len``, for throughput and MFU.

        ``6 * N + 12 * n_layers * n_heads * head_dim * seq_len``. N counts the weights that take part
        in matmuls: the blocks' projections and the (padded) output matrix, not the embedding lookup
        nor the norms. A matmul costs 2 FLOPs per weight per token forward and 4 backward, hence 6N.
        Attention scores and the weighted sum cost 2 * 2 * head_dim * seq_len per head and token
        forward, hence the second term. That is the full T x T matrix, as in the PaLM paper's MFU;
        causal kernels skip about half of it, and document masking more.
        """
        d = self.d_model
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        block_matmul = d * q_width + 2 * d * kv_width + q_width * d + 3 * d * self.ffn_hidden
        matmul_params = self.n_layers * block_matmul + self.padded_vocab_size * d
        return 6 * matmul_params + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def fused_kernels_unavailable() -> str | None:
    """Why the fused Triton kernels (RMSNorm, RoPE, SwiGLU) cannot run here, or None if they can."""
    if not triton_installed():
        return "triton is not installed (pip install triton)"
    for name in FUSED_KERNEL_MODULES:
        # imports triton (optional, found above): only when the fused kernels are asked for
        reason = importlib.import_module(f"hataori.kernels.{name}").unavailable_reason()
        if reason is not None:
            return reason
    return None


def use_triton(choice: str, device: torch.device) -> bool:
    """Whether ``fused_kernels: choice`` runs the Triton kernels for tensors on ``device``."""
    return choice == "triton" or (choice == "auto" and device.type == "cuda" and triton_installed())


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dimension, computed in fp32 and cast back.

    With ``residual``, first ``s = x + residual`` and returns ``(norm(s), s)``: the Triton kernel does
    the add and the norm in one pass over the residual stream.
    """

    def __init__(self, dim: int, eps: float, kernels: str = "torch"):
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if use_triton(self.kernels, x.device):
            from hataori.kernels.rmsnorm import rmsnorm  # imports triton (optional): only for the fused kernels

            return rmsnorm(x, self.weight, self.eps, residual=residual)
        if residual is not None:
            s = x + residual
            return self._norm(s), s
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (max_seq_len, head_dim), of the rotary angles ``pos * base^(-2i / head_dim)``.

    Frequency i applies to the channel pair (i, i + head_dim/2) (the "rotate half" layout of HF Llama),
    so each frequency appears twice along the last dimension.
    """
    inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (Dh/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T_max, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T_max, Dh)
    return angles.cos().float(), angles.sin().float()


@dataclass(frozen=True, slots=True)
class Context:
    """What every block needs to know about the batch, prepared once per forward pass.

    Rotary: for the Triton kernel (``fused_rope``), cos and sin are the (max_seq_len, Dh) tables and
    positions the (B, T) position of each token, or None for 0..T-1; for PyTorch, cos and sin are
    already gathered per position, (B or 1, T, 1, Dh), and positions is None.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor | None
    fused_rope: bool
    docs: Documents | None
    """The packed documents (with doc_masking and doc_ids), shared by every layer's attention."""
    attention_backend: str
    """The backend every layer runs (``auto`` already resolved for this device and dtype)."""

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, T, H, Dh) and k (B, T, H_kv, Dh) rotated."""
        if self.fused_rope:
            from hataori.kernels.rope import rope  # imports triton (optional): only for the fused kernels

            return rope(q, k, self.cos, self.sin, self.positions)
        return apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, Dh) by angles whose cos/sin are (B or 1, T, 1, Dh).

    The rotation runs in fp32 and the result takes x's dtype, whatever dtype the tables hold
    (DeepSpeed casts parameters to bf16 but leaves buffers in fp32)."""
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)  # (B, T, heads, Dh)
    return (x32 * cos.float() + rotated * sin.float()).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and optional qk-norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.fused_kernels) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.fused_kernels) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, ctx: Context, cache: tuple[KVCache, int] | None = None) -> torch.Tensor:
        """x (B, T, D); with ``cache`` (the cache and this layer's index) the new tokens' keys and values are
        stored and attention reads every cached position (:mod:`hataori.model.cache`)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, Dh)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, Dh)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ctx.rotate(q, k)
        if cache is not None:
            y = cache[0].attend(cache[1], q, k, v)  # (B, T, H, Dh)
        else:
            y = attention(q, k, v, doc_ids=ctx.docs, backend=ctx.attention_backend)  # (B, T, H, Dh)
        return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))  # (B, T, D)


class MLP(nn.Module):
    """SwiGLU: ``w_down(silu(w_gate x) * w_up x)``; the activation is one Triton kernel when fused."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kernels = cfg.fused_kernels
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate(x), self.w_up(x)  # (B, T, F) each
        if use_triton(self.kernels, x.device):
            from hataori.kernels.swiglu import swiglu  # imports triton (optional): only for the fused kernels

            return self.w_down(swiglu(gate, up))
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm transformer block::

        x
        |--------------------.
        |                attn_norm
        |                attention (GQA, RoPE, optional qk-norm)
        |                    |
       (+) <-----------------'     (the add and mlp_norm: one fused kernel)
        |--------------------.
        |                mlp_norm
        |                SwiGLU MLP
        |                    |
       (+) <-----------------'
        |
       out
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.fused_kernels)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.fused_kernels)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ctx: Context, cache: tuple[KVCache, int] | None = None) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), ctx, cache)
        normed, x = self.mlp_norm(h, residual=x)  # x + h, and its norm
        return x + self.mlp(normed)


# ----------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """The decoder-only language model described by a :class:`ModelConfig`; build it with ``cfg.build()``.

    The rotary tables are buffers outside the state dict. They are computed in fp32; casting the
    model to bf16 casts them too, which rounds the (already exact) cos/sin values like any bf16 input.
    Construction allocates the modules; :meth:`initialize` sets every weight and the tables.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.fused_kernels)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.register_buffer("rope_cos", None, persistent=False)  # (max_seq_len, Dh)
        self.register_buffer("rope_sin", None, persistent=False)  # (max_seq_len, Dh)
        self.initialize()

    def initialize(self, whole: Callable[[list[nn.Parameter]], ContextManager] | None = None) -> Transformer:
        """Tie the embeddings (if configured), draw every weight (:meth:`reset_parameters`) and compute
        the rotary tables; ``whole`` as in reset_parameters. Returns the model."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight  # again after to_empty, which may untie
        self.reset_parameters(whole)
        self.reset_rope_tables()
        return self

    def reset_rope_tables(self) -> None:
        """Compute the rotary tables (fp32, on the embedding's device). Also after a construction that
        rounded every new float tensor to 16 bits (deepspeed.zero.Init in bf16 does): positions past
        256 are not even integers in bf16."""
        device = self.tok_embeddings.weight.device
        cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_base)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def reset_parameters(self, whole: Callable[[list[nn.Parameter]], ContextManager] | None = None) -> None:
        """Normal(0, init_std) weights, residual output projections scaled down, norms at one.

        Module by module in a fixed order, each parameter once (a tied matrix takes the embedding's
        draw). ``whole(params)``: a context inside which a module's own parameters are whole, for
        parameters partitioned over processes (ZeRO-3 gathers them there); by default they are.
        """
        cfg = self.config
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_init else cfg.init_std
        done: set[int] = set()
        for name, module in self.named_modules():
            params = [p for p in module.parameters(recurse=False) if id(p) not in done]
            if not params:
                continue
            done.update(map(id, params))
            with (whole(params) if whole is not None else contextlib.nullcontext()):
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    scaled = name.endswith(("attn.wo", "mlp.w_down"))
                    nn.init.normal_(module.weight, mean=0.0, std=out_std if scaled else cfg.init_std)
                elif isinstance(module, RMSNorm):
                    nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, reduction: str = "mean", *, cache: KVCache | None = None,
                valid: torch.Tensor | None = None, last: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab_size) of the next token, or with ``targets`` the mean cross-entropy, or with
        ``reduction="none"`` each position's (B, T), 0 where the target does not count (minus the target's
        log-probability: what per-sequence objectives sum).

        input_ids: (B, T) token ids. doc_ids: (B, T) document of each token (a new document starts
        where the id changes); used only with ``config.doc_masking``. targets: (B, T) next-token ids,
        IGNORE_INDEX where a token does not count. The padded vocabulary rows never reach the
        logits or the loss; the loss is computed in fp32.

        Generation (:mod:`hataori.model.cache`): with ``cache`` the tokens continue the cached ones, their
        keys and values are added to it and the logits are returned; ``valid`` (B, T) marks the real tokens
        (False for left padding; default all); ``last``: only the last this many positions' logits (0: all;
        a prompt's prefill needs only its last).
        """
        cfg = self.config
        B, T = input_ids.shape
        if cache is not None:
            return self._cached(input_ids, cache, valid, last)
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
        x = self.tok_embeddings(input_ids)  # (B, T, D)
        ctx = self.context(x, doc_ids if cfg.doc_masking else None)
        for block in self.blocks:
            if cfg.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        x = self.norm(x)
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if targets is not None and cfg.chunked_loss:
            loss = chunked_cross_entropy if reduction == "mean" else chunked_token_losses
            found = loss(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), vocab_size=cfg.vocab_size,
                         ignore_index=IGNORE_INDEX)
            return found if reduction == "mean" else found.view(B, T)
        logits = self.lm_head(x)[..., :cfg.vocab_size]  # (B, T, V): padded rows dropped
        if targets is None:
            return logits
        found = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                reduction=reduction)
        return found if reduction == "mean" else found.view(B, T)

    def _cached(self, input_ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None, last: int) -> torch.Tensor:
        """Logits (B, T or ``last``, vocab_size) of tokens that continue ``cache``'s rows (module docstring of
        :mod:`hataori.model.cache`)."""
        cfg = self.config
        if valid is None:
            valid = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        positions = cache.advance(valid)  # (B, T)
        x = self.tok_embeddings(input_ids)  # (B, T, D)
        if use_triton(cfg.fused_kernels, x.device):  # the kernel reads the tables at each token's position
            ctx = Context(self.rope_cos, self.rope_sin, positions, True, None, "cache")
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, Dh)
            ctx = Context(cos.unsqueeze(2), sin.unsqueeze(2), None, False, None, "cache")
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, (cache, i))
        cache.done(input_ids.shape[1])
        if last:
            x = x[:, -last:]
        return self.lm_head(self.norm(x))[..., :cfg.vocab_size]

    def context(self, x: torch.Tensor, doc_ids: torch.Tensor | None) -> Context:
        """The blocks' :class:`Context` for embeddings x (B, T, D): rotary positions 0..T-1, or
        restarting at each document of ``doc_ids``, and the attention backend for x's device and dtype."""
        cfg = self.config
        docs = Documents(doc_ids) if doc_ids is not None else None
        backend = resolve_backend(cfg.attention_backend, x.device, x.dtype, cfg.head_dim)
        if use_triton(cfg.fused_kernels, x.device):  # the kernel reads the tables at each token's position
            positions = docs.positions if docs is not None else None  # (B, T) or None
            return Context(self.rope_cos, self.rope_sin, positions, True, docs, backend)
        if docs is not None:
            positions = document_positions(doc_ids)  # (B, T), freed once cos and sin are gathered
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, Dh)
        else:
            T = x.shape[1]
            cos, sin = self.rope_cos[None, :T], self.rope_sin[None, :T]  # (1, T, Dh)
        return Context(cos.unsqueeze(2), sin.unsqueeze(2), None, False, docs, backend)  # (B or 1, T, 1, Dh)
