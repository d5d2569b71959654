"""LoRA adapters in PEFT's layout: what Hugging Face PEFT saves for ``LlamaForCausalLM``.

:func:`peft_state_dict` and :func:`peft_config` give ``adapter_model.safetensors``'s keys and
``adapter_config.json`` for a model adapted by :func:`hataori.model.lora.apply_lora`, names mapped by
:mod:`hataori.interop.hf`, vocabulary rows cut to ``vocab_size``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from hataori.interop.hf import hf_name, hf_names, to_hf_tensor
from hataori.model.lora import LoRAConfig, LoRALinear, lora_modules, train_also_modules
from hataori.model.model import Transformer

PEFT_PREFIX = "base_model.model."
"""What PEFT puts before the wrapped model's names in a saved adapter."""


def peft_state_dict(model: Transformer, cfg: LoRAConfig,
                    tensor: Callable[[str], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter as PEFT saves it for ``LlamaForCausalLM`` (``adapter_model.safetensors``):
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` and ``...lora_B.weight``
    for each adapted layer, and the whole weights of the ``train_also`` modules
    (``base_model.model.model.embed_tokens.weight``); vocabulary rows cut to vocab_size.

    ``tensor(name)`` gives the value of the model's parameter ``name`` (``blocks.0.attn.wq.lora_A``,
    ``tok_embeddings.weight``) where ``model`` holds only the layout (built on the meta device);
    by default the model's own parameters are read."""
    mc = model.config
    hf_names(mc)  # a ValueError for a model Llama cannot hold (qk-norm)
    params = dict(model.named_parameters(remove_duplicate=False))
    get = tensor or (lambda name: params[name].detach())
    state = {}
    for name, _ in lora_modules(model):
        prefix = f"{PEFT_PREFIX}{_hf_module(name)}"
        state[f"{prefix}.lora_A.weight"] = get(f"{name}.lora_A")
        state[f"{prefix}.lora_B.weight"] = to_hf_tensor(mc, f"{name}.weight", get(f"{name}.lora_B"))
    for name in _modules_to_save(model, cfg):
        for pname, _ in model.get_submodule(name).named_parameters(prefix=name, remove_duplicate=False):
            state[f"{PEFT_PREFIX}{hf_name(pname)}"] = to_hf_tensor(mc, pname, get(pname)).clone()  # tied: two copies
    return state


def peft_config(model: Transformer, cfg: LoRAConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """``adapter_config.json`` of the adapter :func:`peft_state_dict` gives.

    ``target_modules`` holds a Hugging Face module name (``q_proj``) where every layer's is adapted
    and the full names (``model.layers.0.self_attn.k_proj``) otherwise, so it selects exactly the
    adapted layers; ``modules_to_save`` holds the full names of the modules with parameters of their
    own in ``train_also`` (see :func:`peft_state_dict`).
    """
    hf_names(model.config)
    adapted = [_hf_module(name) for name, _ in lora_modules(model)]
    every = [_hf_module(name) for name, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    targets: list[str] = []
    for short in dict.fromkeys(name.rpartition(".")[2] for name in adapted):
        kind = [name for name in every if name.rpartition(".")[2] == short]
        targets += [short] if set(kind) <= set(adapted) else [name for name in kind if name in adapted]
    to_save = [_hf_module(name) for name in _modules_to_save(model, cfg)]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": targets,
        "modules_to_save": to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _hf_module(name: str) -> str:
    """Hugging Face's name of our module ``name`` (``blocks.0.attn.wq`` -> ``model.layers.0.self_attn.q_proj``)."""
    return hf_name(f"{name}.weight").removesuffix(".weight")


def _modules_to_save(model: Transformer, cfg: LoRAConfig) -> list[str]:
    """The modules with parameters of their own in ``train_also`` (``blocks.0`` becomes its norms and
    projections, which Hugging Face names one by one), and with tied embeddings the other half of
    the pair: PEFT gives each saved module its own copy, so both must be saved to keep computing
    what the tied model does."""
    names = [leaf for name in train_also_modules(model, cfg)
             for leaf, m in model.get_submodule(name).named_modules(prefix=name) if list(m.parameters(recurse=False))]
    if model.config.tie_embeddings and ({"tok_embeddings", "lm_head"} & set(names)):
        names = list(dict.fromkeys([*names, "tok_embeddings", "lm_head"]))
    return names
