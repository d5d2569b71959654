"""``hataori plan``: will a training run fit in GPU memory, and with which ZeRO settings?

For a model (a model preset, or a train preset that also fixes micro batch, sequence length,
precision and LoRA adapters) on N GPUs of M GiB, the plan prints parameters, training FLOPs per
token, the size of a checkpoint and, per GPU, the memory of weights, gradients, optimizer states,
communication buffers and activations for ZeRO stages 0-3, with and without optimizer offload to
CPU and with and without activation checkpointing. It marks the configurations that fit and
recommends the cheapest one with room to spare.

    hataori plan PRESET.yaml [key=value ...] [--machine PROFILE.yaml ...] [plan.KEY=VALUE ...]
        [--gpus N] [--gpu-mem G] [--gpus-per-node K] [--overhead O] [--cpu-mem C]
        [--seq-len L] [--micro-batch B] [--precision P]

    hataori plan configs/train/30b.yaml --machine configs/plan/8xh100-80gb.yaml --gpus 64

Two configs meet here, as in ``hataori slurm submit``. The preset (a model preset from
``configs/model/`` or a train preset) takes ``key=value`` overrides as in ``hataori pretrain``.
The plan's own config (:class:`PlanConfig`: the GPUs, their memory and compute capability, GPUs per
node, the allowance, host memory and, for a model preset, the batch shape) comes from machine profiles (``--machine``,
presets in ``configs/plan/`` with ``base:`` chains like any other) and ``plan.KEY=VALUE``
overrides. Each flag is a shortcut for one key (``--gpus 64`` is ``plan.gpus=64``; :data:`FLAGS`),
and a key set both by its flag and by an override is refused. A train preset fixes its own batch
shape, so there ``--seq-len``, ``--micro-batch`` and ``--precision`` are shortcuts for its
``data.seq_len``, ``zero.micro_batch_size`` and ``zero.precision`` (:data:`TRAIN_KEYS`), checked
as pretraining checks them, and the plan's keys of the same meaning are refused. A precision the
GPUs of ``compute_capability`` cannot run is refused (:func:`hataori.precision.check_gpu`).

Model states (bytes per parameter, P parameters, N GPUs; after the ZeRO paper and DeepSpeed's
``estimate_zero{2,3}_model_states_mem_needs``)

    precision        params p  grads g  optimizer K  fp32 grad f
    bf16 / fp16      2         2        12           4
    fp32             4         4        8            0

K is Adam's state: for mixed precision an fp32 master copy of the weights and the moments m and
v (4 + 4 + 4), for fp32 training only m and v (the weights are the master copy). f is the fp32
copy of the gradient partition that DeepSpeed's mixed-precision optimizer makes for the update;
DeepSpeed's estimators count it (their "18 = 2 grads 16-bit + 4 grads 32-bit + 4 params 32-bit +
8 optimizer states"). ZeRO partitions over the N GPUs::

    stage 0:  p + g + K + f                   (plain data parallel)
    stage 1:  p + g + (K + f) / N             (optimizer states)
    stage 2:  p + (g + K + f) / N             (and gradients)
    stage 3:  (p + g + K + f) / N             (and parameters)
              + (p + g) * largest layer       (one layer gathered at a time, DeepSpeed's 4 x largest layer)

DeepSpeed's ZeRO-3 estimator counts 18 bytes per parameter partitioned where its ZeRO-2 estimator
counts the same states as 2 + 18; this plan keeps the full p + g + K + f for ZeRO-3 as well.

Optimizer offload keeps the optimizer states and fp32 gradients, K + f per parameter, on the CPU,
partitioned as above; with stages 2 and 3 the reduced gradient partition goes straight to the CPU,
so only stage 1 still holds gradients on the GPU. Offloading the parameters too (ZeRO-3 only) moves
the 16-bit parameter partition there as well, leaving the gathered layer. CPU memory is reported
per node of G GPUs: the offloaded states of its G partitions. No process builds the model in CPU
memory (``ZeroConfig.build_model``): stages 0-2 build it on each GPU in the working precision,
which is what they hold anyway, and ZeRO-3 builds it partitioned (``deepspeed.zero.Init``), one
module gathered at a time for its initialisation. DeepSpeed's estimators multiply CPU memory by an
"additional buffer factor" of 1.5 and count a model loaded in CPU memory; this plan does neither.

LoRA (a train preset's ``lora`` section, e.g. the override ``lora.rank=16``; hataori.model.lora).
The base weights are frozen: no gradients, no optimizer states; they stay in the working precision
and ZeRO-3 partitions them like the rest. Of P parameters (the adapters included) T train: the
adapters, rank x (in + out) a wrapped layer, and the ``train_also`` modules, a tied matrix once.
:func:`trainable` counts them exactly on the model built on PyTorch's meta device with the
adapters applied (no memory is allocated)::

    stage 0:  P p + T (g + K + f)
    stage 1:  P p + T g + T (K + f) / N
    stage 2:  P p + T (g + K + f) / N
    stage 3:  (P p + T (g + K + f)) / N
              + p * largest layer + g * largest trainable layer

Full training is T = P. ZeRO-3 gathers one module's parameters at a time (a wrapped layer's
adapters with its weight, as DeepSpeed counts a module's own parameters) and a gradient only for
what trains, so its "4 x largest layer" becomes p x the largest module's parameters + g x the
most trainable parameters any one module holds. Offload moves T (K + f), with stages 2 and 3
also T g, and with parameter offload P p / N, as above.

Communication buffers (stages 1 and 2): DeepSpeed's reduce and all-gather buckets of
``bucket_elements`` (500M by default, capped at T, the parameters that train, as
``ZeroConfig.build`` caps them) in the working precision, 2 x bucket x p bytes.

Activations per micro-batch of B sequences of T tokens (bytes per token, ``a`` bytes per
activation: 2 for bf16/fp16, 4 for fp32; D d_model, H/H_kv heads, Wq = H * head_dim,
Wkv = H_kv * head_dim, F ffn_hidden, V vocab). What autograd keeps for the backward pass, tensor
by tensor, for this repository's block (tests/test_plan.py counts the tensors autograd saves on a
small model and checks this formula to the byte)::

    RMSNorm (x2 per block)  4D + 4 + 2aD     fp32 copy of the input, 1/rms, normalised input, output
                  fused:    2aD + 4          input (or the residual sum), 1/rms, output
    attention               a(2Wq + 2Wkv') + 4H
                                             q, k, v after RoPE and the output, and the fp32
                                             log-sum-exp; RoPE keeps nothing of its own
    document mask           aT               only with the sdpa backend and doc_masking: an
                                             additive (B, 1, T, T) mask per layer; Wkv' = Wq as
                                             SDPA then takes key/value heads repeated to H
    qk-norm (if on)         (4 + a)(Wq + Wkv) + 4(H + H_kv)
                                             fp32 input, 1/rms, normalised input (RoPE keeps
                                             nothing, so the norm's output is not kept)
                  fused:    a(Wq + Wkv) + 4(H + H_kv)
                                             input, 1/rms
    SwiGLU                  4aF              gate, silu(gate), up, their product
                  fused:    3aF              gate, up, their product

    per block       = 2 RMSNorm + attention (+ mask) (+ qk-norm) + SwiGLU
    head            = RMSNorm + 4V + 16 (+ 8 Dh)
                                             final norm, fp32 log-probabilities of the loss,
                                             input ids and targets (int64); with document
                                             masking the rotary cos and sin gathered per position
                                             (fused: + 8, the positions the RoPE kernel reads)
          chunked loss:     RMSNorm + 4 + 16 (+ 8 Dh or 8)
                                             the fp32 log-sum-exp per token instead of the
                                             log-probabilities
    loss backward   = 8V                     the fp32 gradients of the log-probabilities and of
                                             the logits, beside the saved log-probabilities
          chunked loss:     (8 + a) V C + 4 V D (a < 4)
                                             for the whole micro-batch, not per token: one chunk
                                             of C = min(2048, B T) rows of logits in the working
                                             dtype, in fp32 and their fp32 gradient, and the
                                             fp32 accumulator of the output matrix's gradient

    without checkpointing:  B T (L * block + head + loss backward)
    with checkpointing:     B T (L * aD + block + head + loss backward (+ 8))
                            (each block keeps its input, and the int64 doc_ids with document
                            masking; one block is recomputed at a time)

LoRA activations. Autograd keeps a tensor only for a gradient that is wanted, so frozen weights
keep less, and each adapter keeps its own. The plan follows the model block by block, marking
which tensors need a gradient (none before the first trainable parameter: with the embedding
frozen, the first block's input needs none), and counts, with r the rank, m the bytes of a
dropout mask (1: CUDA keeps a bool mask) and w the width of the tensor::

    RMSNorm         4w + 4 where its input needs a gradient, + aw where its gain trains
          fused:    aw + 4 where either does
    linear input    aw, once for all the layers reading it (the norms' outputs, the attention
                    output, the SwiGLU product), where one of their weights trains or an adapter
                    reads it without dropout; the attention output is kept by attention anyway
    adapter         ar, A's output, which B's gradient needs
          dropout:  + aw + mw: the dropped input A reads, and the mask where the input needs a gradient
    attention       as above where q, k or v needs a gradient (qk-norm: as the RMSNorm row)
    SwiGLU          aF for gate and aF for up where gate needs a gradient, aF for silu(gate) where up does
          fused:    2aF where either does
    head            the final norm as above; its output (aD) only where lm_head's weight trains, an
                    adapter reads it, or the chunked loss keeps it; the int64 ids (8) only where
                    the embedding trains; the rotary term only where some layer's q or k needs a
                    gradient (else the checkpoints' contexts hold it); the rest as above
    loss backward   as above; the chunked loss's fp32 accumulator (4VD) only where lm_head's weight trains

With checkpointing, only the blocks that the backward pass reaches (their output needs a
gradient) keep their input; the recomputed block is the largest. Everything training, this is the
formula above. With the default targets (every projection of every block) and frozen norms and
embedding, a block keeps what it keeps in full training less the two norms' normalised inputs
(2aD, unfused kernels only) plus 7ar; the first block also less what its first norm keeps (its
input needs no gradient), the head less the final norm's output and normalised input (unfused) and
the ids. tests/test_plan.py
counts what autograd keeps for a dozen LoRA setups (dropout, single layers, train_also, tied
embeddings, qk-norm, the chunked loss) and checks this to the byte; on a CPU, PyTorch's dropout
keeps the scaled noise (a bytes an element) where CUDA keeps the bool mask, and the test says so.

The kernels are those the config runs on a CUDA GPU: ``attention_backend: auto`` there is
flash-attn or the Triton kernel, which keep what SDPA's flash kernel keeps, and ``fused_kernels:
auto`` the fused Triton RMSNorm, RoPE and SwiGLU ("fused" above). The Triton attention with
document masking also keeps the int32 cumulative document lengths, 4 bytes per document per
micro-batch, left out. The chunked loss's backward term is an estimate: the test counts what the
forward keeps, not the backward's working memory.

Assumptions: the attention kernel never materialises the T x T scores (flash or memory-efficient
SDPA; the CPU flash kernel that the test measures saves the same tensors); the rotary tables stay
fp32 buffers (DeepSpeed casts parameters, not buffers); the gradients of activations in flight
during the backward pass are small beside the saved ones and are left to the allowance. A fixed
allowance (``plan.overhead``, 3 GiB by default) covers the CUDA context, the caching allocator's
fragmentation and kernels' workspaces.

Checkpoints: one DeepSpeed ``save_checkpoint`` (hataori.train.checkpoint) holds, per trained
parameter (every parameter in full training; a LoRA run saves with
``exclude_frozen_parameters``, which leaves the frozen base out), in bytes::

    precision        ZeRO-0     ZeRO-1/2     ZeRO-3
    bf16 / fp16      2 + 12     2 + 12       12
    fp32             4 + 8      4 + 4 + 8    4 + 8

the module's weights in the working precision (ZeRO-3's module state holds empty placeholders)
and the optimizer's fp32 master weights with Adam's m and v. In fp32 the module's weights are the
master at stage 0 (torch's AdamW) and stage 3 (the partitions), but ZeRO-1/2 keep their own fp32
copy of the partition beside the module and save both. tests/test_plan.py saves a toy LoRA model's
checkpoint at every stage and precision and checks these to the byte (tensors only: the pickles'
names and the 0-dim step counters add a few bytes a tensor). The plan prints the size at the
recommended stage (ZeRO-3 if nothing fits) beside full training's.

Recommendation: the cheapest configuration that fits with a tenth of the GPU's memory to spare
(or, if none does, the cheapest that fits, marked tight), ranked by what it costs in speed:
CPU offload (slowest; parameter offload worst), then activation checkpointing (one more forward
pass per step), then ZeRO-3 (1.5x the communication of stages 0-2), then the lower stage. Memory
in GiB (2**30 bytes); ``plan.gpu_mem=80`` (``--gpu-mem 80``) means 80 GiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from hataori.config import build, check_keys, command_items, file_keys, load, merged, require
from hataori.errors import ConfigError, InputError
from hataori.kernels.cross_entropy import DEFAULT_CHUNK_SIZE
from hataori.model import ModelConfig
from hataori.model.lora import apply_lora
from hataori.model.model import Transformer
from hataori.precision import check_gpu
from hataori.train.config import load_train_config
from hataori.train.zero import DEFAULT_BUCKET_ELEMENTS

GIB = 2**30
DEFAULT_OVERHEAD_GIB = 3.0
RECOMMEND_HEADROOM = 0.10
"""Share of GPU memory the recommendation leaves free where some setup can, beyond the allowance:
the estimate does not see fragmentation over a long run nor every workspace of every kernel."""
DROPOUT_MASK_BYTES = 1
"""Bytes per element of the mask a LoRA adapter's dropout keeps: PyTorch's CUDA dropout keeps a bool
mask (on a CPU it keeps the scaled noise, in the activations' dtype)."""
Precision = Literal["bf16", "fp16", "fp32"]
Offload = Literal["none", "optimizer", "optimizer+params"]


# ----------------------------------------------------------------------------- model states


@dataclass(frozen=True, slots=True)
class Bytes:
    """Bytes per parameter of each model state (see the module docstring)."""

    params: int
    grads: int
    optimizer: int
    fp32_grads: int


def bytes_per_param(precision: Precision) -> Bytes:
    """p, g, K and f for mixed-precision (bf16, fp16) or fp32 AdamW."""
    if precision == "fp32":
        return Bytes(params=4, grads=4, optimizer=8, fp32_grads=0)
    if precision in ("bf16", "fp16"):
        return Bytes(params=2, grads=2, optimizer=12, fp32_grads=4)
    raise ConfigError("precision", f"must be 'bf16', 'fp16' or 'fp32', got {precision!r}")


@dataclass(frozen=True, slots=True)
class ModelStates:
    """Model-state memory of one configuration: per GPU, and on the CPU per node."""

    params: float
    """16-bit (or fp32) weights on each GPU."""
    grads: float
    """Gradients in the working precision on each GPU."""
    optimizer: float
    """Adam states and the fp32 gradient partition on each GPU (0 when offloaded)."""
    gathered: float
    """ZeRO-3: the largest layer's parameters and gradients gathered in full."""
    cpu_states: float
    """Offloaded states of the node's GPUs on its CPU."""
    @property
    def gpu(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered


def model_states(num_params: int, *, stage: int, num_gpus: int, gpus_per_node: int, precision: Precision = "bf16",
                 offload: Offload = "none", largest_layer_params: int = 0, trainable_params: int | None = None,
                 largest_trainable_params: int | None = None) -> ModelStates:
    """Bytes of parameters, gradients and optimizer states per GPU under ZeRO ``stage`` over ``num_gpus``.

    ``trainable_params`` of the ``num_params`` train (LoRA), the largest module holding
    ``largest_trainable_params`` of them; None: every parameter trains, the largest layer's all."""
    if stage not in (0, 1, 2, 3):
        raise ConfigError("stage", f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if offload != "none" and stage == 0:
        raise ConfigError("offload", "offload needs ZeRO stage 1, 2 or 3")
    if offload == "optimizer+params" and stage != 3:
        raise ConfigError("offload", "parameter offload needs ZeRO stage 3")
    b = bytes_per_param(precision)
    P, N = float(num_params), num_gpus
    T = P if trainable_params is None else float(trainable_params)
    largest_trainable = largest_layer_params if largest_trainable_params is None else largest_trainable_params
    params = P * b.params / (N if stage == 3 else 1)
    grads = T * b.grads / (N if stage >= 2 else 1)
    optimizer = T * (b.optimizer + b.fp32_grads) / (N if stage >= 1 else 1)
    gathered = float(b.params * largest_layer_params + b.grads * largest_trainable) if stage == 3 else 0.0
    cpu_states = 0.0
    if offload != "none":
        cpu_states += optimizer
        optimizer = 0.0
        if stage >= 2:  # the reduced gradient partition is copied to the CPU bucket by bucket
            grads = 0.0
        if offload == "optimizer+params":
            cpu_states += params
            params = 0.0
    return ModelStates(params=params, grads=grads, optimizer=optimizer, gathered=gathered,
                       cpu_states=cpu_states * gpus_per_node)


def largest_layer_params(cfg: Any) -> int:
    """Parameters of the model's largest single module (DeepSpeed's "largest layer"): the embedding,
    the output matrix or the widest projection."""
    d = cfg.d_model
    return max(cfg.padded_vocab_size * d, cfg.ffn_hidden * d, cfg.n_heads * cfg.head_dim * d)


def checkpoint_bytes(trained_params: int, *, stage: int, precision: Precision) -> int:
    """Bytes of one DeepSpeed checkpoint of ``trained_params`` trained parameters (module docstring)."""
    module = 0 if stage == 3 else bytes_per_param(precision).params  # ZeRO-3's module state: placeholders
    master = 0 if precision == "fp32" and stage == 0 else 4  # fp32 at stage 0: the module's weights are the master
    return trained_params * (module + master + 8)


# ----------------------------------------------------------------------------- LoRA


@dataclass(frozen=True, slots=True)
class Trainable:
    """What a LoRA run trains, read off the model with its adapters applied (:func:`trainable`)."""

    lora: Any
    """The LoRAConfig."""
    params: int
    """Parameters that train: the adapters and the train_also modules' (a tied matrix once)."""
    total: int
    """Every parameter of the adapted model: the base model's and the adapters."""
    adapted: frozenset[str]
    """The adapted linear layers, by module name."""
    trained: frozenset[str]
    """The modules whose own weight trains (train_also), by name; a tied matrix under both names."""
    largest_layer: int
    """Parameters of the largest single module, a wrapped layer's adapters with its weight (ZeRO-3 gathers it)."""
    largest_trainable_layer: int
    """Trainable parameters of the module with the most (ZeRO-3 gathers their gradient)."""


def trainable(model: Any, lora: Any) -> Trainable:
    """What LoRAConfig ``lora`` trains of the transformer ModelConfig ``model``: counted on the model built
    on PyTorch's meta device (no memory allocated) and adapted by ``hataori.model.lora.apply_lora``."""
    import torch

    with torch.device("meta"):
        built = Transformer(model)
    try:
        adapted = apply_lora(built, lora)
    except ConfigError as err:
        raise ConfigError(f"lora.{err.key}", err.message) from None
    params = list(built.parameters())  # each Parameter once, a tied matrix too
    modules = list(built.named_modules())
    own = [list(m.parameters(recurse=False)) for _, m in modules]
    return Trainable(
        lora=lora,
        params=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        adapted=frozenset(adapted),
        trained=frozenset(name for name, m in modules
                          if isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.requires_grad),
        largest_layer=max(sum(p.numel() for p in ps) for ps in own),
        largest_trainable_layer=max(sum(p.numel() for p in ps if p.requires_grad) for ps in own))


# ----------------------------------------------------------------------------- activations


def activation_bytes_per_token(cfg: Any, *, seq_len: int, precision: Precision, lora: Trainable | None = None,
                               mask_bytes: int = DROPOUT_MASK_BYTES) -> dict[str, int]:
    """The per-token terms of the activation formula (module docstring) for ``cfg`` at ``seq_len``:
    ``block`` the largest block's (the one checkpointing recomputes), ``blocks`` all blocks' together.

    ``lora``: a LoRA run's, where frozen weights keep less (:func:`lora_activation_bytes_per_token`)."""
    if lora is not None:
        return lora_activation_bytes_per_token(cfg, lora, seq_len=seq_len, precision=precision,
                                               mask_bytes=mask_bytes)
    a = 4 if precision == "fp32" else 2
    D, H, H_kv, Dh, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size
    Wq, Wkv = H * Dh, H_kv * Dh
    fused = cfg.fused_kernels != "torch"
    norm = 2 * a * D + 4 + (0 if fused else 4 * D)
    mask = cfg.attention_backend == "sdpa" and cfg.doc_masking
    kv_saved = Wq if mask else Wkv
    block = 2 * norm + a * (2 * Wq + 2 * kv_saved) + 4 * H + (3 if fused else 4) * a * F
    if mask:
        block += a * seq_len
    if cfg.qk_norm:
        block += (a if fused else 4 + a) * (Wq + Wkv) + 4 * (H + H_kv)
    rotary = (8 if fused else 8 * Dh) if cfg.doc_masking else 0
    chunked = cfg.chunked_loss
    head = norm + (4 if chunked else 4 * V) + 16 + rotary
    return {"block": block, "blocks": cfg.n_layers * block, "block_input": a * D, "block_inputs": cfg.n_layers * a * D,
            "head": head, "loss_backward": 0 if chunked else 8 * V, "checkpoint_inputs": 8 if cfg.doc_masking else 0}


def lora_activation_bytes_per_token(cfg: Any, lora: Trainable, *, seq_len: int, precision: Precision,
                                    mask_bytes: int = DROPOUT_MASK_BYTES) -> dict[str, int]:
    """The per-token terms of a LoRA run (module docstring, "LoRA activations"), block by block:
    each tensor counted where autograd keeps it, which depends on what needs a gradient.

    ``mask_bytes``: bytes per element of a dropout mask (see DROPOUT_MASK_BYTES)."""
    a = 4 if precision == "fp32" else 2
    D, H, H_kv, Dh, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size
    Wq, Wkv = H * Dh, H_kv * Dh
    fused = cfg.fused_kernels != "torch"
    mask = cfg.attention_backend == "sdpa" and cfg.doc_masking
    kv_saved = Wq if mask else Wkv
    rank, dropout = lora.lora.rank, lora.lora.dropout > 0

    def trains(name: str) -> bool:
        return name in lora.trained

    def changes(name: str) -> bool:
        """Whether the layer's output needs a gradient whatever its input: its weight trains or it is adapted."""
        return name in lora.trained or name in lora.adapted

    def norm(width: int, rows: int, input_grad: bool, weight_grad: bool) -> int:
        """An RMSNorm of ``rows`` vectors, ``width`` values a token in all: the fp32 input and 1/rms where
        the input needs a gradient, the normalised input where the gain does (fused: input and 1/rms)."""
        if fused:
            return a * width + 4 * rows if input_grad or weight_grad else 0
        return (4 * width + 4 * rows if input_grad else 0) + (a * width if weight_grad else 0)

    def readers(width: int, input_grad: bool, names: list[str], kept: bool = False) -> int:
        """What the linear layers ``names``, reading one input ``width`` wide, keep: the input once where a
        weight trains or an adapter reads it undropped (unless another op keeps it anyway), and per
        adapter A's rank-r output, with dropout also its dropped input and the mask."""
        total = 0
        if not kept and any(trains(n) or (n in lora.adapted and not dropout) for n in names):
            total += a * width
        for name in names:
            if name in lora.adapted:
                total += a * rank
                if dropout:
                    total += a * width + (mask_bytes * width if input_grad else 0)
        return total

    blocks, rope_kept, reached = [], False, 0
    grad = trains("tok_embeddings")  # whether the residual stream needs a gradient from here on
    for i in range(cfg.n_layers):
        attn, mlp = f"blocks.{i}.attn.", f"blocks.{i}.mlp."
        block = norm(D, 1, grad, trains(f"blocks.{i}.attn_norm"))
        normed = grad or trains(f"blocks.{i}.attn_norm")
        block += readers(D, normed, [attn + "wq", attn + "wk", attn + "wv"])
        q, k, v = (normed or changes(attn + w) for w in ("wq", "wk", "wv"))
        if cfg.qk_norm:
            block += norm(Wq, H, q, trains(attn + "q_norm")) + norm(Wkv, H_kv, k, trains(attn + "k_norm"))
            q, k = q or trains(attn + "q_norm"), k or trains(attn + "k_norm")
        rope_kept = rope_kept or q or k
        attention = q or k or v
        if attention:
            block += a * (2 * Wq + 2 * kv_saved) + 4 * H + (a * seq_len if mask else 0)
        block += readers(Wq, attention, [attn + "wo"], kept=attention)  # attention keeps its output
        grad = grad or attention or changes(attn + "wo")
        block += norm(D, 1, grad, trains(f"blocks.{i}.mlp_norm"))
        normed = grad or trains(f"blocks.{i}.mlp_norm")
        block += readers(D, normed, [mlp + "w_gate", mlp + "w_up"])
        gate, up = (normed or changes(mlp + w) for w in ("w_gate", "w_up"))
        if fused:
            block += 2 * a * F if gate or up else 0
        else:  # silu keeps gate, the product silu(gate) for up's gradient and up for gate's
            block += a * F * (2 * gate + up)
        block += readers(F, gate or up, [mlp + "w_down"])
        grad = grad or gate or up or changes(mlp + "w_down")
        blocks.append(block)
        reached += grad  # the backward pass reaches this block: its checkpoint keeps its input

    head = norm(D, 1, grad, trains("norm")) + 8 + (8 if trains("tok_embeddings") else 0)  # targets, ids
    if cfg.chunked_loss:
        head += a * D + 4  # the loss keeps its input and the fp32 log-sum-exp
    else:
        head += readers(D, grad or trains("norm"), ["lm_head"]) + 4 * V
    rotary = (8 if fused else 8 * Dh) if cfg.doc_masking else 0
    checkpoint_inputs = 8 if cfg.doc_masking else 0
    if rope_kept:
        head += rotary
    else:  # no attention keeps the rotary tables; the checkpoints hold the context anyway
        checkpoint_inputs += rotary
    return {"block": max(blocks), "blocks": sum(blocks), "block_input": a * D, "block_inputs": reached * a * D,
            "head": head, "loss_backward": 0 if cfg.chunked_loss else 8 * V, "checkpoint_inputs": checkpoint_inputs}


def loss_backward_bytes(cfg: Any, *, tokens: int, precision: Precision, lora: Trainable | None = None) -> int:
    """The chunked loss's backward working memory for a micro-batch of ``tokens`` (0 without it); the
    output matrix's fp32 gradient accumulator only where that matrix trains (``lora``)."""
    if not cfg.chunked_loss:
        return 0
    a = 4 if precision == "fp32" else 2
    rows = min(DEFAULT_CHUNK_SIZE, tokens)
    weight_grad = lora is None or "lm_head" in lora.trained
    return (8 + a) * cfg.vocab_size * rows + (4 * cfg.padded_vocab_size * cfg.d_model if a < 4 and weight_grad else 0)


def activation_bytes(cfg: Any, *, micro_batch: int, seq_len: int, precision: Precision, checkpointing: bool,
                     lora: Trainable | None = None) -> float:
    """Peak activation memory of one micro-batch of ``micro_batch`` x ``seq_len`` tokens (bytes)."""
    t = activation_bytes_per_token(cfg, seq_len=seq_len, precision=precision, lora=lora)
    if checkpointing:
        layers = t["block_inputs"] + t["checkpoint_inputs"] + t["block"]
    else:
        layers = t["blocks"]
    tokens = micro_batch * seq_len
    return float(tokens * (layers + t["head"] + t["loss_backward"])
                 + loss_backward_bytes(cfg, tokens=tokens, precision=precision, lora=lora))


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True, slots=True)
class Setup:
    """One row of the plan: a ZeRO stage, what is offloaded, activation checkpointing."""

    stage: int
    offload: Offload
    checkpointing: bool

    @property
    def cost(self) -> tuple:
        """Sort key: lower is faster (see the module docstring)."""
        return (("none", "optimizer", "optimizer+params").index(self.offload), self.checkpointing,
                self.stage == 3, self.stage)

    def settings(self) -> str:
        """The config overrides that choose this setup."""
        items = [f"zero.stage={self.stage}"]
        if self.offload != "none":
            items.append("zero.offload_optimizer=cpu")
        if self.offload == "optimizer+params":
            items.append("zero.offload_params=cpu")
        return " ".join(items + [f"model.activation_checkpointing={str(self.checkpointing).lower()}"])

    def describe(self) -> str:
        offload = {"none": "no offload", "optimizer": "optimizer offload",
                   "optimizer+params": "optimizer and parameter offload"}[self.offload]
        return f"ZeRO-{self.stage}, {offload}, {'with' if self.checkpointing else 'no'} activation checkpointing"


SETUPS = tuple(Setup(stage, offload, ckpt)
               for stage, offload in [(0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"),
                                      (3, "none"), (3, "optimizer"), (3, "optimizer+params")]
               for ckpt in (False, True))


@dataclass(frozen=True, slots=True)
class Workload:
    """What is trained and on what: the model, the batch shape and the machines, as checked by the
    configs they come from (:func:`load_workload`)."""

    model: Any
    """A ModelConfig."""
    micro_batch: int
    seq_len: int
    precision: Precision
    num_gpus: int
    gpu_mem_gib: float
    gpus_per_node: int
    overhead_gib: float = DEFAULT_OVERHEAD_GIB
    bucket_elements: int = DEFAULT_BUCKET_ELEMENTS
    cpu_mem_gib: float | None = None
    """Host memory per node; None: not checked."""
    lora: Trainable | None = None
    """A LoRA run: what trains (:func:`trainable`); None: every weight trains."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """The memory of one setup for one workload, in bytes."""

    setup: Setup
    states: ModelStates
    buffers: float
    activations: float
    overhead: float
    gpu_mem: float
    cpu_mem: float | None

    @property
    def gpu_total(self) -> float:
        return self.states.gpu + self.buffers + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.gpu_total <= self.gpu_mem and (self.cpu_mem is None or self.states.cpu_states <= self.cpu_mem)

    @property
    def roomy(self) -> bool:
        """Fits with RECOMMEND_HEADROOM of the GPU's memory to spare."""
        return self.fits and self.gpu_total <= (1 - RECOMMEND_HEADROOM) * self.gpu_mem


def states_of(cfg: Any, lora: Trainable | None, *, stage: int, offload: Offload, precision: Precision,
              num_gpus: int, gpus_per_node: int) -> ModelStates:
    """The model states of ModelConfig ``cfg`` (with LoRA adapters, ``lora``) in one setup."""
    if lora is None:
        num_params = trained = cfg.num_params()
        largest = largest_trainable = largest_layer_params(cfg)
    else:
        num_params, trained = lora.total, lora.params
        largest, largest_trainable = lora.largest_layer, lora.largest_trainable_layer
    return model_states(num_params, stage=stage, num_gpus=num_gpus, gpus_per_node=gpus_per_node, precision=precision,
                        offload=offload, largest_layer_params=largest, trainable_params=trained,
                        largest_trainable_params=largest_trainable)


def estimate(work: Workload, setup: Setup) -> Estimate:
    cfg, lora = work.model, work.lora
    states = states_of(cfg, lora, stage=setup.stage, offload=setup.offload, precision=work.precision,
                       num_gpus=work.num_gpus, gpus_per_node=work.gpus_per_node)
    trained = cfg.num_params() if lora is None else lora.params
    bucket = min(work.bucket_elements, trained)  # the buckets carry gradients and updated weights
    buffers = 2.0 * bucket * bytes_per_param(work.precision).params if setup.stage in (1, 2) else 0.0
    activations = activation_bytes(cfg, micro_batch=work.micro_batch, seq_len=work.seq_len,
                                   precision=work.precision, checkpointing=setup.checkpointing, lora=lora)
    return Estimate(setup=setup, states=states, buffers=buffers, activations=activations,
                    overhead=work.overhead_gib * GIB, gpu_mem=work.gpu_mem_gib * GIB,
                    cpu_mem=None if work.cpu_mem_gib is None else work.cpu_mem_gib * GIB)


def zero_offload(zero: Any) -> Offload:
    """What a ZeroConfig offloads, as the plan names it."""
    if zero.offload_optimizer == "none":
        return "none"
    return "optimizer+params" if zero.offload_params == "cpu" else "optimizer"


def states_shortfall(cfg: Any, *, world_size: int, local_ranks: int, device_type: str, device_bytes: int | None,
                     host_bytes: int | None) -> str | None:
    """Why the model states of the run of TrainConfig ``cfg`` cannot fit, or None: weights, gradients and
    optimizer states, which are certain (unlike activations), against the memory there is. ``device_bytes``:
    one GPU's memory (``device_type`` cuda); ``host_bytes``: the memory the host can give (on a CPU run its
    ``local_ranks`` processes each hold a rank's states there, besides what is offloaded). None: not known."""
    lora = None if cfg.lora is None else trainable(cfg.model, cfg.lora)
    zero = cfg.zero
    states = states_of(cfg.model, lora, stage=zero.stage, offload=zero_offload(zero), precision=zero.precision,
                       num_gpus=world_size, gpus_per_node=local_ranks)
    trained = cfg.model.num_params() if lora is None else lora.params
    what = (f"the weights, gradients and optimizer states of {trained:,} trained parameters"
            + ("" if lora is None else f" (LoRA adapters of lora.rank={cfg.lora.rank}) and a frozen base of "
               f"{lora.total - trained:,}") + f" under ZeRO-{zero.stage} in {zero.precision} on {world_size} "
            f"process{'es' * (world_size != 1)}")
    if device_type == "cuda":
        needs = [(states.gpu, device_bytes, "each GPU", "has"),
                 (states.cpu_states, host_bytes, "this host (offloaded)", "has available")]
    else:
        needs = [(states.gpu * local_ranks + states.cpu_states, host_bytes,
                  f"this host ({local_ranks} process{'es' * (local_ranks != 1)} on it)", "has available")]
    for need, have, where, has in needs:
        if have is not None and need > have:
            return (f"{what} need {need / GIB:,.1f} GiB on {where}, which {has} {have / GIB:,.1f} GiB: the run "
                    "cannot fit, before its first step")
    return None


def plan(work: Workload) -> list[Estimate]:
    """Every setup's estimate, in table order."""
    return [estimate(work, setup) for setup in SETUPS]


def recommend(estimates: Iterable[Estimate]) -> Estimate | None:
    """The cheapest setup that fits with RECOMMEND_HEADROOM to spare, else the cheapest that fits at
    all, or None."""
    fitting = [e for e in estimates if e.fits]
    roomy = [e for e in fitting if e.roomy]
    return min(roomy or fitting, key=lambda e: e.setup.cost) if fitting else None


def what_would_fit(work: Workload, estimates: list[Estimate]) -> list[str]:
    """Changes that would make a plan with no fitting setup fit, each as a sentence."""
    hints = []
    for gpus in (2**k for k in range(1, 17)):
        if gpus <= work.num_gpus:
            continue
        bigger = dataclasses.replace(work, num_gpus=gpus, gpus_per_node=min(gpus, max(work.gpus_per_node, 8)))
        best = recommend(plan(bigger))
        if best is not None:
            hints.append(f"{gpus} GPUs of {work.gpu_mem_gib:g} GiB: {best.setup.describe()} needs "
                         f"{best.gpu_total / GIB:.1f} GiB per GPU")
            break
    else:
        floor = min(e.activations + e.states.gathered + e.overhead for e in estimates)
        hints.append(f"no number of GPUs is enough at this micro batch and sequence length: activations, the "
                     f"gathered layer and the allowance alone need {floor / GIB:.1f} GiB per GPU")
    if work.micro_batch > 1:
        one = recommend(plan(dataclasses.replace(work, micro_batch=1)))
        if one is not None:
            hints.append(f"micro batch 1 (with more accumulation steps): {one.setup.describe()} needs "
                         f"{one.gpu_total / GIB:.1f} GiB per GPU")
    seq = work.seq_len // 2
    while seq >= 128:
        shorter = recommend(plan(dataclasses.replace(work, seq_len=seq)))
        if shorter is not None:
            hints.append(f"sequences of {seq} tokens: {shorter.setup.describe()} needs "
                         f"{shorter.gpu_total / GIB:.1f} GiB per GPU")
            break
        seq //= 2
    return hints


# ----------------------------------------------------------------------------- report


COLUMNS = ("ZeRO", "offload", "ckpt", "params", "grads", "optim", "buffers", "activ", "other", "GPU total",
           "CPU/node", "fits")


def format_report(work: Workload, estimates: list[Estimate], *, source: str = "") -> str:
    cfg = work.model
    n = cfg.num_params()
    tokens = work.micro_batch * work.seq_len
    best = recommend(estimates)
    lines = [
        f"model: {source or 'model'}: {n:,} parameters ({n / 1e9:.2f} B), largest layer "
        f"{largest_layer_params(cfg):,}",
        f"compute: {cfg.flops_per_token(work.seq_len):.3e} training FLOPs per token at seq_len {work.seq_len} "
        f"(6N + attention; activation checkpointing adds a forward pass, about a third more)",
        f"run: micro batch {work.micro_batch} x {work.seq_len} = {tokens:,} tokens per GPU, {work.precision}, "
        f"{work.num_gpus} GPU{'s' if work.num_gpus > 1 else ''} of {work.gpu_mem_gib:g} GiB "
        f"({work.gpus_per_node} per node), allowance {work.overhead_gib:g} GiB per GPU",
        *_training_lines(work, stage=best.setup.stage if best is not None else 3, recommended=best is not None),
        "memory in GiB per GPU (CPU per node); * fits",
        "",
    ]
    rows = [COLUMNS]
    for e in estimates:
        s = e.states
        offload = {"none": "-", "optimizer": "optim", "optimizer+params": "optim+param"}[e.setup.offload]
        mark = ("*" if e.fits else "") + ("  <- recommended" if e is best else "")
        rows.append((str(e.setup.stage), offload, "yes" if e.setup.checkpointing else "no",
                     *(f"{x / GIB:.1f}" for x in (s.params, s.grads, s.optimizer + s.gathered, e.buffers,
                                                  e.activations, e.overhead, e.gpu_total, s.cpu_states)), mark))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    for r in rows:
        lines.append("  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     + "  " + r[-1])
    lines.append("")
    lines.append("optim: Adam states and fp32 gradients (ZeRO-3: + the gathered largest layer); buffers: ZeRO-1/2 "
                 "reduce and all-gather buckets; other: the fixed allowance")
    if best is not None:
        lines.append(f"recommended: {best.setup.describe()}: {best.gpu_total / GIB:.1f} of {work.gpu_mem_gib:g} GiB "
                     f"per GPU" + (f", {best.states.cpu_states / GIB:.1f} GiB of offloaded states per node"
                                   if best.states.cpu_states else "")
                     + ("" if best.roomy else f" (tight: nothing that fits leaves {RECOMMEND_HEADROOM:.0%} free)"))
        lines.append(f"  set: {best.setup.settings()}")
    else:
        need = min(estimates, key=lambda e: e.gpu_total)
        cpu = (f" and {need.states.cpu_states / GIB:.1f} GiB of CPU memory per node (of {work.cpu_mem_gib:g})"
               if need.cpu_mem is not None and need.states.cpu_states > need.cpu_mem else "")
        lines.append(f"DOES NOT FIT: no configuration fits in {work.num_gpus} x "
                     f"{work.gpu_mem_gib:g} GiB; the smallest, {need.setup.describe()}, needs "
                     f"{need.gpu_total / GIB:.1f} GiB per GPU{cpu}. It would fit with:")
        lines.extend(f"  - {hint}" for hint in what_would_fit(work, estimates))
    return "\n".join(lines)


def _training_lines(work: Workload, *, stage: int, recommended: bool) -> list[str]:
    """What trains (with LoRA) and the size of one checkpoint at ``stage``, beside full training's."""
    n = work.model.num_params()
    full = checkpoint_bytes(n, stage=stage, precision=work.precision)
    where = f"at ZeRO-{stage}{' (recommended)' if recommended else ''}"
    lora = work.lora
    if lora is None:
        return [f"checkpoint: {full / GIB:.1f} GiB a save {where}, {full // n} bytes a parameter"]
    c = lora.lora
    ckpt = checkpoint_bytes(lora.params, stage=stage, precision=work.precision)
    also = f", train_also {', '.join(c.train_also)}" if c.train_also else ""
    return [f"LoRA: rank {c.rank} on {len(lora.adapted)} linear layers ({', '.join(c.targets)}{also}): "
            f"{lora.params:,} trainable parameters, {lora.params / lora.total:.2%} of {lora.total:,}",
            f"checkpoint: {ckpt / GIB:.2f} GiB a save {where}, {ckpt // lora.params} bytes a trained parameter; "
            f"full training {full / GIB:.1f} GiB"]


# ----------------------------------------------------------------------------- `hataori plan`


@dataclass(kw_only=True, slots=True)
class PlanConfig:
    """What a plan is for besides the model: the machines and, for a model preset, the batch shape
    (a train preset has its own: its data.seq_len, zero.micro_batch_size and zero.precision)."""

    gpus: int
    """GPUs of the run, one data-parallel rank each."""
    gpu_mem: float = 80.0
    """Memory of one GPU in GiB (2**30 bytes), as nvidia-smi reports it."""
    gpus_per_node: int | None = None
    """GPUs per node, whose host memory holds their offloaded states; a job of fewer GPUs runs on one node.
    None: all of them up to 8, else the largest count of at most 8 that divides gpus."""
    overhead: float = DEFAULT_OVERHEAD_GIB
    """Fixed GiB per GPU for the CUDA context, the allocator's fragmentation and kernels' workspaces."""
    cpu_mem: float | None = None
    """Host memory per node in GiB, checked against the offloaded states; None: not checked."""
    seq_len: int | None = None
    """Model presets: tokens per sequence; None: the model's max_seq_len."""
    micro_batch: int = 1
    """Model presets: sequences per GPU per forward pass."""
    precision: Precision = "bf16"
    """Model presets: the training precision."""
    compute_capability: float | None = None
    """The GPUs' CUDA compute capability as ``nvidia-smi --query-gpu=compute_cap`` prints it (9.0 for H100 and
    H200); a precision they cannot run (bf16 below 8.0) is refused. None: not checked."""

    def __post_init__(self) -> None:
        require(self.gpus >= 1, "gpus", f"must be a positive number of GPUs, got {self.gpus}")
        require(self.compute_capability is None or (math.isfinite(self.compute_capability)
                                                    and self.compute_capability >= 1), "compute_capability",
                f"must be a CUDA compute capability such as 9.0 or 8.6, got {self.compute_capability}")
        if self.gpus_per_node is not None:
            require(self.gpus_per_node >= 1 and self.gpus % self.node_gpus == 0, "gpus_per_node",
                    f"must divide the number of GPUs ({self.gpus}) and be >= 1, got {self.gpus_per_node}")
        for key, gib, zero_ok in (("gpu_mem", self.gpu_mem, False), ("overhead", self.overhead, True),
                                  ("cpu_mem", self.cpu_mem, False)):
            require(gib is None or (math.isfinite(gib) and (gib >= 0 if zero_ok else gib > 0)), key,
                    f"must be a finite number of GiB, {'>= 0' if zero_ok else '> 0'}, got {gib}")
        require(self.micro_batch >= 1, "micro_batch", f"must be >= 1, got {self.micro_batch}")

    @property
    def capability(self) -> tuple[int, int] | None:
        """compute_capability as (major, minor): 8.6 is (8, 6)."""
        if self.compute_capability is None:
            return None
        major = int(self.compute_capability)
        return major, round((self.compute_capability - major) * 10)

    @property
    def node_gpus(self) -> int:
        """GPUs per node as planned: gpus_per_node, or gpus where the job is smaller than a node."""
        if self.gpus_per_node is None:
            return default_gpus_per_node(self.gpus)
        return min(self.gpus, self.gpus_per_node)


PLAN_PREFIX = "plan."
"""The prefix of the plan's ``KEY=VALUE`` overrides among the preset's."""
FLAGS = {"--gpus": "gpus", "--gpu-mem": "gpu_mem", "--gpus-per-node": "gpus_per_node", "--overhead": "overhead",
         "--cpu-mem": "cpu_mem", "--seq-len": "seq_len", "--micro-batch": "micro_batch", "--precision": "precision"}
"""Each flag and the PlanConfig key it sets; with a train preset, those of TRAIN_KEYS set the train config's key."""
TRAIN_KEYS = {"seq_len": "data.seq_len", "micro_batch": "zero.micro_batch_size", "precision": "zero.precision"}
"""The plan's batch keys, for model presets, and the train config's keys that a train preset has for them."""


def load_workload(config: str | Path, items: Sequence[str] = (), *, machines: Sequence[str | Path] = (),
                  flags: dict[str, Any] | None = None) -> Workload:
    """A Workload from a model preset or a train preset (``config``), the command line's ``key=value``
    ``items`` for it and for the plan (``plan.KEY=VALUE``), machine profiles and ``flags`` (``{"--gpus": 8}``;
    a flag that is absent or None sets nothing)."""
    path = Path(config)
    if not path.is_file():
        raise InputError(path, "no such config; pass a model preset (configs/model/*.yaml) or a train preset")
    train, flags = _is_train_preset(path), flags or {}
    plan_flags, preset_flags = {}, {}
    for flag, key in FLAGS.items():
        value = flags.get(flag)
        if train and key in TRAIN_KEYS:
            preset_flags[flag] = (TRAIN_KEYS[key], value)
        else:
            plan_flags[flag] = (key, value)
    machine = load_plan_config(machines, [item for item in items if _is_plan_item(item)], plan_flags,
                               train_preset=train)
    files, overrides = command_items([item for item in items if not _is_plan_item(item)], preset_flags)
    bucket, lora = DEFAULT_BUCKET_ELEMENTS, None
    if train:
        # The plan reads no data and writes no run: placeholders for what a preset leaves to the command
        # line. An init source (init.from_hf=DIR) gives the model's shape, as in pretrain.
        placeholders = ["run_dir=unused-by-plan", "data.datasets=[{path: unused-by-plan}]"]
        try:
            cfg = load_train_config([path, *files], [*placeholders, *overrides])
        except ConfigError as err:
            raise _naming_flag(err, preset_flags) from None
        model, zero, seq_len, lora = cfg.model, cfg.zero, cfg.data.seq_len, cfg.lora
        micro_batch, precision, bucket = zero.micro_batch_size, zero.precision, zero.bucket_elements
        try:  # the run must be able to start on these GPUs, as pretrain checks before any rank starts
            zero.grad_accum_steps(seq_len=seq_len, world_size=machine.gpus)
        except ConfigError as err:
            raise ConfigError(err.key, f"{err.message} (planned on {machine.gpus} GPUs: plan.gpus, --gpus)") from None
    else:
        model = load(ModelConfig, [path, *files], overrides)
        micro_batch, precision = machine.micro_batch, machine.precision
        seq_len = model.max_seq_len if machine.seq_len is None else machine.seq_len
        require(1 <= seq_len <= model.max_seq_len, f"{PLAN_PREFIX}seq_len (--seq-len)",
                f"must be between 1 and the model's max_seq_len={model.max_seq_len}, got {seq_len}")
    if machine.capability is not None:  # as pretrain refuses it on GPUs that cannot run it
        key = "zero.precision" if train else f"{PLAN_PREFIX}precision (--precision)"
        try:
            check_gpu(precision, machine.capability, key)
        except ConfigError as err:
            raise ConfigError(err.key, f"{err.message} (the GPUs planned: {PLAN_PREFIX}compute_capability="
                              f"{machine.compute_capability})") from None
    return Workload(model=model, micro_batch=micro_batch, seq_len=seq_len, precision=precision,
                    num_gpus=machine.gpus, gpu_mem_gib=machine.gpu_mem, gpus_per_node=machine.node_gpus,
                    overhead_gib=machine.overhead, bucket_elements=bucket, cpu_mem_gib=machine.cpu_mem,
                    lora=None if lora is None else trainable(model, lora))


def load_plan_config(machines: Sequence[str | Path], items: Sequence[str], flags: dict[str, tuple[str, Any]], *,
                     train_preset: bool) -> PlanConfig:
    """The PlanConfig of machine profiles, ``plan.KEY=VALUE`` ``items`` and ``flags`` (flag: (key, value),
    as :func:`hataori.config.command_items` takes them). Errors name ``plan.KEY`` and the flag that sets it."""
    for item in items:  # an unknown key named as written, with the closest plan.KEY
        key = item.split("=", 1)[0].strip().removeprefix(PLAN_PREFIX).split(".")[0]
        check_keys(PlanConfig, {key: None}, f"override {item!r}", PLAN_PREFIX)
    files, overrides = command_items([item.removeprefix(PLAN_PREFIX) for item in items], flags, prefix=PLAN_PREFIX)
    try:
        data = merged(PlanConfig, [*machines, *files], overrides)
        if data.get("gpus") is None:
            raise ConfigError("gpus", "the number of GPUs is not set; pass --gpus N, plan.gpus=N or set gpus: in a "
                              "--machine profile")
        for key, train_key in TRAIN_KEYS.items():
            if train_preset and key in data:
                flag = next(flag for flag, name in FLAGS.items() if name == key)
                raise ConfigError(key, f"is a model preset's; a train preset has its own {train_key}: set that "
                                  f"(or {flag}) instead")
        return build(PlanConfig, data)
    except ConfigError as err:
        raise _naming_flag(ConfigError(f"{PLAN_PREFIX}{err.key}", err.message),
                           {flag: (f"{PLAN_PREFIX}{key}", value) for flag, (key, value) in flags.items()}) from None


def _naming_flag(err: ConfigError, flags: dict[str, tuple[str, Any]]) -> ConfigError:
    """``err`` with the flag that sets its key, if one does, after the key: ``plan.gpus (--gpus): ...``."""
    flag = next((flag for flag, (key, _) in flags.items() if key == err.key), None)
    return ConfigError(f"{err.key} ({flag})", err.message) if flag else err


def _is_plan_item(item: str) -> bool:
    """A ``plan.KEY=VALUE`` override (a file such as plan.yaml is the preset's)."""
    return "=" in item and item.startswith(PLAN_PREFIX)


def default_gpus_per_node(gpus: int) -> int:
    """GPUs per node when ``plan.gpus_per_node`` is not set: all of them up to 8 (one node), else the
    largest count of at most 8 that divides ``gpus`` (8 for 64, 5 for 10, 6 for 12)."""
    return max(n for n in range(1, min(gpus, 8) + 1) if gpus % n == 0) if gpus >= 1 else gpus


def _is_train_preset(path: Path) -> bool:
    """A train preset has a ``model`` or ``zero`` section (itself or through its ``base:`` chain)."""
    return bool({"model", "zero"} & file_keys(path))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = {f.name: f.default for f in dataclasses.fields(PlanConfig)}
    parser.add_argument("config", metavar="CONFIG", help="a model preset (configs/model/*.yaml) or a train preset")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of the preset, e.g. n_layers=40 or lora.rank=16 (more YAML files layer on it "
                             "in order); plan.KEY=VALUE sets the plan's own keys, e.g. plan.gpus=64")
    parser.add_argument("--machine", action="append", default=[], metavar="PROFILE.yaml",
                        help="a machine profile (configs/plan/): plan keys such as gpu_mem and gpus_per_node "
                             "(repeatable, applied in order; plan.KEY=VALUE and the flags override it)")
    parser.add_argument("--gpus", type=int, help="number of GPUs, one data-parallel rank each (shortcut for plan.gpus, "
                                                 "which has no default: set it one way or another)")
    parser.add_argument("--gpu-mem", type=float, help=f"memory of one GPU in GiB (default {default['gpu_mem']:g}; "
                                                      "shortcut for plan.gpu_mem)")
    parser.add_argument("--gpus-per-node", type=int,
                        help="GPUs per node, for CPU memory (default: 8, or the largest divisor of the GPUs up to 8; "
                             "a job of fewer GPUs runs on one node; shortcut for plan.gpus_per_node)")
    parser.add_argument("--overhead", type=float,
                        help="fixed GiB per GPU for the CUDA context and fragmentation (default "
                             f"{default['overhead']:g}; shortcut for plan.overhead)")
    parser.add_argument("--cpu-mem", type=float,
                        help="host memory per node in GiB; checked when set (shortcut for plan.cpu_mem)")
    batch = "shortcut for plan.{} with a model preset, for a train preset's {}"
    parser.add_argument("--seq-len", type=int,
                        help="tokens per sequence (a model preset's default: its max_seq_len; "
                             f"{batch.format('seq_len', TRAIN_KEYS['seq_len'])})")
    parser.add_argument("--micro-batch", type=int,
                        help=f"sequences per GPU per forward pass (a model preset's default: {default['micro_batch']}; "
                             f"{batch.format('micro_batch', TRAIN_KEYS['micro_batch'])})")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                        help=f"the training precision (a model preset's default: {default['precision']}; "
                             f"{batch.format('precision', TRAIN_KEYS['precision'])})")


def main(args: argparse.Namespace) -> int:
    flags = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in FLAGS}
    work = load_workload(args.config, args.overrides, machines=args.machine, flags=flags)
    print(format_report(work, plan(work), source=args.config))
    return 0
