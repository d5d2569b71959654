"""What training a model costs in memory: model states (weights, gradients, optimizer states) under each
ZeRO stage, precision and offload, what a LoRA run trains, and the activations a micro-batch keeps.

The formulas and the measurements behind them are in docs/plan.md; ``hataori plan``
(:mod:`hataori.plan.planner`) tabulates them for a run, and ``hataori pretrain`` refuses a run whose
model states cannot fit (:func:`states_shortfall`) before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from hataori.errors import ConfigError
from hataori.kernels.cross_entropy import DEFAULT_CHUNK_SIZE
from hataori.model.lora import apply_lora
from hataori.model.model import Transformer

GIB = 2**30
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
    """Bytes of one DeepSpeed checkpoint of ``trained_params`` trained parameters (docs/plan.md)."""
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
    """The per-token terms of the activation formula (docs/plan.md) for ``cfg`` at ``seq_len``:
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


@dataclass(frozen=True)
class AdapterWalk:
    """What the layers of one LoRA run keep for the backward pass, asked layer by layer: which weights
    train, which layers carry an adapter, and the sizes the terms are counted in."""

    trainable: Trainable
    value_bytes: int
    """Bytes of one activation value: 4 in fp32, 2 in bf16 and fp16."""
    fused: bool
    """Whether RMSNorm (and SwiGLU) are the fused kernels, which keep other tensors than PyTorch's ops."""
    mask_bytes: int
    """Bytes per element of a dropout mask (see DROPOUT_MASK_BYTES)."""

    @property
    def rank(self) -> int:
        return self.trainable.lora.rank

    @property
    def dropout(self) -> bool:
        return self.trainable.lora.dropout > 0

    def trains(self, name: str) -> bool:
        """Whether the weight ``name`` trains."""
        return name in self.trainable.trained

    def changes(self, name: str) -> bool:
        """Whether the layer's output needs a gradient whatever its input: its weight trains or it is adapted."""
        return name in self.trainable.trained or name in self.trainable.adapted

    def norm(self, width: int, rows: int, input_grad: bool, weight_grad: bool) -> int:
        """An RMSNorm of ``rows`` vectors, ``width`` values a token in all: the fp32 input and 1/rms where
        the input needs a gradient, the normalised input where the gain does (fused: input and 1/rms)."""
        if self.fused:
            return self.value_bytes * width + 4 * rows if input_grad or weight_grad else 0
        return (4 * width + 4 * rows if input_grad else 0) + (self.value_bytes * width if weight_grad else 0)

    def readers(self, width: int, input_grad: bool, names: list[str], kept: bool = False) -> int:
        """What the linear layers ``names``, reading one input ``width`` wide, keep: the input once where a
        weight trains or an adapter reads it undropped (unless another op keeps it anyway, ``kept``), and
        per adapter A's rank-r output, with dropout also its dropped input and the mask."""
        adapted = self.trainable.adapted
        total = 0
        if not kept and any(self.trains(n) or (n in adapted and not self.dropout) for n in names):
            total += self.value_bytes * width
        for name in names:
            if name in adapted:
                total += self.value_bytes * self.rank
                if self.dropout:
                    total += self.value_bytes * width + (self.mask_bytes * width if input_grad else 0)
        return total


def lora_activation_bytes_per_token(cfg: Any, lora: Trainable, *, seq_len: int, precision: Precision,
                                    mask_bytes: int = DROPOUT_MASK_BYTES) -> dict[str, int]:
    """The per-token terms of a LoRA run (docs/plan.md, "LoRA activations"), block by block: each tensor
    counted where autograd keeps it, which depends on what needs a gradient (:class:`AdapterWalk`).

    Walking the blocks in order, ``grad`` says whether the residual stream needs a gradient from there
    on (it does once anything before it trains); a block the backward pass reaches keeps its input
    under activation checkpointing. ``mask_bytes``: bytes per element of a dropout mask."""
    value = 4 if precision == "fp32" else 2
    walk = AdapterWalk(lora, value, cfg.fused_kernels != "torch", mask_bytes)
    width, heads, kv_heads, head_dim = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q_width, kv_width, ffn = heads * head_dim, kv_heads * head_dim, cfg.ffn_hidden
    mask = cfg.attention_backend == "sdpa" and cfg.doc_masking
    kv_saved = q_width if mask else kv_width  # SDPA with a mask keeps K and V expanded to every query head

    blocks, rope_kept, reached = [], False, 0
    grad = walk.trains("tok_embeddings")
    for i in range(cfg.n_layers):
        attn, mlp = f"blocks.{i}.attn.", f"blocks.{i}.mlp."
        block = walk.norm(width, 1, grad, walk.trains(f"blocks.{i}.attn_norm"))
        normed = grad or walk.trains(f"blocks.{i}.attn_norm")
        block += walk.readers(width, normed, [attn + "wq", attn + "wk", attn + "wv"])
        q, k, v = (normed or walk.changes(attn + w) for w in ("wq", "wk", "wv"))
        if cfg.qk_norm:
            block += (walk.norm(q_width, heads, q, walk.trains(attn + "q_norm"))
                      + walk.norm(kv_width, kv_heads, k, walk.trains(attn + "k_norm")))
            q, k = q or walk.trains(attn + "q_norm"), k or walk.trains(attn + "k_norm")
        rope_kept = rope_kept or q or k
        attention = q or k or v
        if attention:
            block += value * (2 * q_width + 2 * kv_saved) + 4 * heads + (value * seq_len if mask else 0)
        block += walk.readers(q_width, attention, [attn + "wo"], kept=attention)  # attention keeps its output
        grad = grad or attention or walk.changes(attn + "wo")
        block += walk.norm(width, 1, grad, walk.trains(f"blocks.{i}.mlp_norm"))
        normed = grad or walk.trains(f"blocks.{i}.mlp_norm")
        block += walk.readers(width, normed, [mlp + "w_gate", mlp + "w_up"])
        gate, up = (normed or walk.changes(mlp + w) for w in ("w_gate", "w_up"))
        if walk.fused:
            block += 2 * value * ffn if gate or up else 0
        else:  # silu keeps gate, the product silu(gate) for up's gradient and up for gate's
            block += value * ffn * (2 * gate + up)
        block += walk.readers(ffn, gate or up, [mlp + "w_down"])
        grad = grad or gate or up or walk.changes(mlp + "w_down")
        blocks.append(block)
        reached += grad

    ids = 8 + (8 if walk.trains("tok_embeddings") else 0)  # the targets, and the input ids for the embedding's gradient
    head = walk.norm(width, 1, grad, walk.trains("norm")) + ids
    if cfg.chunked_loss:
        head += value * width + 4  # the loss keeps its input and the fp32 log-sum-exp
    else:
        head += walk.readers(width, grad or walk.trains("norm"), ["lm_head"]) + 4 * cfg.vocab_size
    rotary = (8 if walk.fused else 8 * head_dim) if cfg.doc_masking else 0
    checkpoint_inputs = 8 if cfg.doc_masking else 0
    if rope_kept:
        head += rotary
    else:  # no attention keeps the rotary tables; the checkpoints hold the context anyway
        checkpoint_inputs += rotary
    return {"block": max(blocks), "blocks": sum(blocks), "block_input": value * width,
            "block_inputs": reached * value * width, "head": head,
            "loss_backward": 0 if cfg.chunked_loss else 8 * cfg.vocab_size, "checkpoint_inputs": checkpoint_inputs}


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
