"""LoRA: low-rank adapters on the model's linear layers.

A :class:`LoRALinear` replaces an ``nn.Linear`` and computes ``x W^T + s * dropout(x) A^T B^T``,
A (rank, in) and B (out, rank), ``s = alpha / rank`` (or ``alpha / sqrt(rank)`` with rslora). A
starts like PEFT's (kaiming-uniform, a = sqrt(5)) and B at zero, so at initialisation the model
computes exactly what it computed before. :func:`apply_lora` wraps the linear layers that
``LoRAConfig.targets`` name, and leaves trainable only the adapters and the whole modules of
``LoRAConfig.train_also``; training decides nothing else.

Names. The wrapper keeps the wrapped layer's Parameter object as its own ``weight`` (and ``bias``),
so the base weights keep their names (``blocks.0.attn.wq.weight``) and the adapters add two
entries beside each (``blocks.0.attn.wq.lora_A``, ``blocks.0.attn.wq.lora_B``). A plain model's
state dict therefore loads into a LoRA model with ``strict=False`` (missing: only the adapters),
and the adapters are ordinary Parameters in the module tree, which ZeRO partitions like any other.
:func:`merged_state_dict` folds the adapters in and gives the plain model's names and keys.

Patterns. ``targets`` and ``train_also`` hold shell-style patterns (``fnmatch``, case-sensitive;
``*`` also crosses dots) matched against a module's dotted name or any dotted suffix of it:
``attn.wq`` matches ``blocks.3.attn.wq``, ``mlp.*`` every MLP projection, ``blocks.0.attn.wk``
layer 0's only, ``lm_head`` the output projection. Targets are matched against the linear layers
only, ``train_also`` against every module; a pattern that matches nothing is a ConfigError.

PEFT's layout of the adapters is :mod:`hataori.interop.peft`'s.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
import torch.nn as nn
import torch.nn.functional as F

from hataori.config import require
from hataori.errors import ConfigError
from hataori.model.model import Transformer


@dataclass(kw_only=True, slots=True)
class LoRAConfig:
    """Which linear layers get low-rank adapters, their rank and scale, and what else trains."""

    rank: int = 8
    """Inner width r of each adapter: A is (r, in_features), B is (out_features, r)."""
    alpha: float = 16.0
    """Scale numerator: the adapter's output is multiplied by alpha / rank (alpha / sqrt(rank) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training, in [0, 1); the base layer sees the undropped input."""
    targets: tuple[str, ...] = ("attn.*", "mlp.*")
    """Linear layers to adapt, as module-name patterns (see the module docstring), e.g. ["attn.wq", "attn.wv"]."""
    train_also: tuple[str, ...] = ()
    """Whole modules that stay trainable beside the adapters, e.g. ["tok_embeddings", "lm_head"]."""
    rslora: bool = False
    """Rank-stabilised scale alpha / sqrt(rank) instead of alpha / rank (Kalajdzievski 2023)."""

    def __post_init__(self) -> None:
        require(self.rank >= 1, "rank", f"must be a positive integer, got {self.rank}")
        require(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(len(self.targets) > 0, "targets", "is empty; name the linear layers to adapt, e.g. [attn.wq, attn.wv]")
        for key in ("targets", "train_also"):
            patterns = getattr(self, key)
            require(all(isinstance(p, str) and p for p in patterns), key,
                    f"must be non-empty module-name patterns, got {list(patterns)}")

    @property
    def scaling(self) -> float:
        """What the adapter's output is multiplied by: alpha / rank, or alpha / sqrt(rank) with rslora."""
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


class LoRALinear(nn.Module):
    """``linear`` plus a low-rank update: ``x W^T + b + scaling * dropout(x) A^T B^T``.

    ``weight`` and ``bias`` are the wrapped layer's own Parameter objects (same names in the state
    dict); ``lora_A`` (rank, in_features) and ``lora_B`` (out_features, rank) are new Parameters on
    the weight's device and in its dtype. Shapes come from ``in_features``/``out_features``, so a
    layer whose weight ZeRO-3 has already partitioned can be wrapped too.
    """

    def __init__(self, linear: nn.Linear, *, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rank, self.scaling, self.dropout = rank, scaling, dropout
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **factory))
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """A as PEFT draws it (kaiming-uniform, a = sqrt(5)), B zero: the layer computes the base layer's output."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        return base + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling  # (..., rank) -> (..., out)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + scaling * B A`` (out, in), computed in fp32 and returned in the weight's dtype."""
        delta = self.lora_B.float() @ self.lora_A.float()  # (out, in)
        return (self.weight.float() + self.scaling * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scaling={self.scaling:g}, dropout={self.dropout:g}")


# ----------------------------------------------------------------------------- applying


def matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` or one of its dotted suffixes matches ``pattern`` (fnmatch, case-sensitive)."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, f"*.{pattern}")


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the linear layers ``cfg.targets`` names in :class:`LoRALinear`, freeze every parameter
    but the adapters and those of ``cfg.train_also``; returns the adapted module names in module order.

    Raises a ConfigError, leaving ``model`` untouched, for a pattern that matches nothing (naming
    the candidates), for a rank above an adapted layer's smaller width, for a ``train_also`` module
    that holds an adapted weight, and, on a
    :class:`Transformer`, for adapting ``lm_head`` where its weight is not its own (tied embeddings)
    or is read directly (chunked_loss).
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; apply_lora once, to a plain model")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    adapted = _matching(cfg.targets, linears, "targets", "linear module")
    trained = train_also_modules(model, cfg)
    adapted_weights = {id(model.get_submodule(name).weight): name for name in adapted}
    for name in trained:
        for pname, p in model.get_submodule(name).named_parameters(prefix=name):
            if id(p) in adapted_weights:
                raise ConfigError("train_also", f"{name!r} holds {pname}, the weight LoRA adapts in "
                                  f"{adapted_weights[id(p)]!r}; leave one of them out of targets or train_also")
    narrow = [(name, m.in_features, m.out_features) for name in adapted
              if cfg.rank > min((m := model.get_submodule(name)).in_features, m.out_features)]
    if narrow:  # a rank past a layer's smaller side adds parameters and no expressiveness (and may not fit)
        name, fan_in, fan_out = narrow[0]
        raise ConfigError("rank", f"{cfg.rank} is above the width of {name} ({fan_in} in, {fan_out} out"
                          f"{f', and {len(narrow) - 1} more layers' if len(narrow) > 1 else ''}): "
                          "a LoRA rank is at most "
                          f"the smaller of a layer's widths, {min(fan_in, fan_out)} here; choose a smaller rank")
    if isinstance(model, Transformer) and "lm_head" in adapted:
        require(not model.config.tie_embeddings, "targets",
                "lm_head shares its weight with tok_embeddings (tie_embeddings), so no plain model could hold "
                "the adapted output matrix; leave lm_head out of targets")
        require(not model.config.chunked_loss, "targets",
                "lm_head cannot be adapted with chunked_loss, whose loss multiplies by lm_head.weight directly; "
                "set chunked_loss: false or leave lm_head out of targets")

    for name in adapted:
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        setattr(model.get_submodule(parent), child,
                LoRALinear(linear, rank=cfg.rank, scaling=cfg.scaling, dropout=cfg.dropout))
    model.requires_grad_(False)
    for name in adapted:
        module = model.get_submodule(name)
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    for name in trained:
        model.get_submodule(name).requires_grad_(True)
    return adapted


def train_also_modules(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Names of the modules ``cfg.train_also`` keeps trainable, outermost only, in module order."""
    names = [name for name, _ in model.named_modules() if name]
    found = _matching(cfg.train_also, names, "train_also", "module")
    return [name for name in found if not any(name.startswith(f"{other}.") for other in found)]


def _matching(patterns: tuple[str, ...], names: list[str], key: str, what: str) -> list[str]:
    """The names some pattern matches, in ``names``' order; a ConfigError for a pattern matching none."""
    for pattern in patterns:
        if not any(matches(name, pattern) for name in names):
            listed = ", ".join(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in names))
            raise ConfigError(key, f"pattern {pattern!r} matches no {what} of the model; its {what}s are: {listed}")
    return [name for name in names if any(matches(name, pattern) for pattern in patterns)]


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The model's adapted layers, (name, module) in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


# ----------------------------------------------------------------------------- merging and export


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model (same keys) with every adapter folded into its weight.

    The model's parameters must be whole (gather them first under ZeRO-3)."""
    state = model.state_dict()
    for name, module in lora_modules(model):
        state[f"{name}.weight"] = module.merged_weight()
        del state[f"{name}.lora_A"], state[f"{name}.lora_B"]
    return state
