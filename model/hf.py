"""Conversion to Hugging Face transformers' ``LlamaForCausalLM``: the contract of HF export.

Our weights map one to one onto HF Llama's (same ``(out_features, in_features)`` layout, same
"rotate half" rotary layout, so no permutation of q/k rows is needed). The padded vocabulary rows
are cut off, so the HF model's ``vocab_size`` is the tokenizer's and its logits equal ours.
qk-norm has no place in HF Llama; such models cannot be converted to it.

transformers is imported only when a ``LlamaConfig`` is asked for.
"""

from __future__ import annotations

from typing import Any

import torch

from hataori.model.model import ModelConfig

_BLOCK_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}


def _check_convertible(cfg: ModelConfig) -> None:
    if cfg.qk_norm:
        raise ValueError("a model with qk_norm cannot be converted to HF LlamaForCausalLM, which has no qk-norm")


def hf_llama_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of the ``transformers.LlamaConfig`` that describes ``cfg``."""
    _check_convertible(cfg)
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_base,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        attention_bias=False,
        mlp_bias=False,
    )


def hf_llama_config(cfg: ModelConfig, **extra: Any):
    """A ``transformers.LlamaConfig`` for ``cfg``; ``extra`` adds e.g. ``bos_token_id``, ``eos_token_id``."""
    from transformers import LlamaConfig

    return LlamaConfig(**hf_llama_config_kwargs(cfg), **extra)


def to_hf_llama_state_dict(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``Transformer.state_dict()`` renamed for ``LlamaForCausalLM``, vocabulary cut to vocab_size.

    With tied embeddings ``lm_head.weight`` is left out, as in HF's own checkpoints of tied models.
    """
    _check_convertible(cfg)
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        names.update({f"blocks.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in _BLOCK_KEYS.items()})
    ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unknown = sorted(set(state_dict) - set(names) - ignored)
    missing = sorted(set(names) - set(state_dict))
    if unknown or missing:
        raise ValueError(f"state dict does not match the config: unknown keys {unknown[:5]}, missing {missing[:5]}")
    out = {theirs: state_dict[ours] for ours, theirs in names.items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in out:
            out[key] = out[key][:cfg.vocab_size]  # (vocab_size, D): padded rows cut off
    return out
