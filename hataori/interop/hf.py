"""hataori's model in Hugging Face transformers' Llama layout, both ways: the one adapter that export
(``hataori export hf``) and import (``init.from_hf``) use.

Weights. Ours map one to one onto ``LlamaForCausalLM``'s (same ``(out_features, in_features)``
layout, same "rotate half" rotary layout, so no permutation of q/k rows). Our embedding and output
matrices have ``padded_vocab_size`` rows; the Hugging Face model has ``vocab_size`` (the
tokenizer's): export cuts the padded rows, import pads with zero rows (never read: logits and the
loss stop at ``vocab_size``). With tied embeddings ``lm_head.weight`` is left out, as in Hugging
Face's own checkpoints of tied models. qk-norm has no place in Llama; such models cannot leave.

Config. :func:`hf_config` writes ``config.json`` as transformers 4.x and 5.x, vLLM and llama.cpp's
converter read it (``rope_theta`` at the top). :func:`model_fields` reads a Llama-family
``config.json`` into ModelConfig fields; what hataori cannot represent (biases, rope scaling,
sliding windows, mixtures of experts, another activation or architecture, quantized weights) is an
error that names the field, and so is any field it does not know.

Files. :class:`HFCheckpoint` reads a folder in transformers' layout (``config.json`` and
safetensors weights, sharded with ``model.safetensors.index.json`` or not) one tensor, or a range
of rows, at a time, without reading the rest. :func:`write_safetensors` writes named tensors shard
by shard, holding one shard in memory at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from hataori.errors import InputError
from hataori.fsutil import atomic_path, atomic_write_text
from hataori.model.model import ModelConfig

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

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
VOCAB_WEIGHTS = ("tok_embeddings.weight", "lm_head.weight")
"""Our weights with one row per (padded) vocabulary entry."""

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
"""config.json model types that are hataori's architecture (Mistral's without a sliding window)."""

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# config.json fields with no effect on the weights or the function they compute.
_HARMLESS = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
             "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "pretraining_tp",
             "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class", "_attn_implementation",
             "attn_implementation"}


def _check_convertible(cfg: ModelConfig) -> None:
    if cfg.qk_norm:
        raise ValueError("a model with qk_norm cannot be converted to HF LlamaForCausalLM, which has no qk-norm")


# ----------------------------------------------------------------------------- config


def hf_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The architecture fields of ``config.json`` (and ``transformers.LlamaConfig``) for ``cfg``."""
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

    return LlamaConfig(**hf_config_kwargs(cfg), **extra)


def hf_config(cfg: ModelConfig, *, dtype: torch.dtype, bos_id: int | None, eos_id: int | None,
              pad_id: int | None) -> dict[str, Any]:
    """``config.json`` of ``cfg`` exported in ``dtype`` with the tokenizer's special ids."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **hf_config_kwargs(cfg),
            "rope_scaling": None, "attention_dropout": 0.0, "bos_token_id": bos_id, "eos_token_id": eos_id,
            "pad_token_id": pad_id, "torch_dtype": DTYPE_NAMES[dtype], "use_cache": True}


def model_fields(config: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The ModelConfig fields (shape, rotary base, norm epsilon, tying) of a Hugging Face ``config.json``.

    Raises an InputError naming the field for anything hataori's model cannot represent.
    """
    where = Path(path)

    def refuse(key: str, why: str) -> InputError:
        return InputError(where, f"{key}: {why}; hataori's model cannot represent it, and nothing is dropped silently")

    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise refuse("model_type", f"is {model_type!r}, not a Llama-family model ({', '.join(ARCHITECTURES)})")
    known = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
             "rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings", "attention_bias", "mlp_bias",
             "attention_dropout", "sliding_window", "use_sliding_window", "max_window_layers"} | _HARMLESS
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise refuse(key, f"is missing or not an integer ({config.get(key)!r})")
    if config.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", f"is {config['hidden_act']!r}; hataori's MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise refuse(key, "adds biases, and hataori's linear layers have none")
    if config.get("attention_dropout", 0.0):
        raise refuse("attention_dropout", f"is {config['attention_dropout']}; hataori trains without dropout")
    if config.get("sliding_window") is not None and config.get("use_sliding_window", True):
        raise refuse("sliding_window", f"is {config['sliding_window']}; hataori's attention is full causal")
    rope = config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if config.get("rope_scaling") or rope_type != "default":
        scaling = config.get("rope_scaling") or rope
        raise refuse("rope_scaling", f"is {scaling!r}; hataori's rotary embedding has no scaling")
    unknown = sorted(key for key, value in config.items() if key not in known and value not in (None, False, 0, {}, []))
    if unknown:
        raise refuse(unknown[0], f"is {config[unknown[0]]!r}, a field hataori does not know "
                     f"(all unknown fields: {', '.join(unknown)})")
    n_heads = config["num_attention_heads"]
    return {
        "vocab_size": config["vocab_size"],
        "d_model": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // n_heads,
        "ffn_hidden": config["intermediate_size"],
        "rope_base": float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "max_seq_len": config.get("max_position_embeddings", 2048),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "qk_norm": False,
    }


# ----------------------------------------------------------------------------- names and tensors


_TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    """Hugging Face's name of our weight ``name`` (``blocks.3.attn.wq.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``)."""
    if name in _TOP_KEYS:
        return _TOP_KEYS[name]
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{_BLOCK_KEYS[rest]}"


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """Our weight names -> Hugging Face's, in the order a Hugging Face checkpoint lists them
    (``lm_head.weight`` left out when tied)."""
    _check_convertible(cfg)
    ours = ["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        ours += [f"blocks.{i}.{key}" for key in _BLOCK_KEYS]
    ours += ["norm.weight"] + ([] if cfg.tie_embeddings else ["lm_head.weight"])
    return {name: hf_name(name) for name in ours}


def hf_shape(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face shape of our weight ``name``: vocabulary rows cut to vocab_size."""
    return (cfg.vocab_size, *shape[1:]) if name in VOCAB_WEIGHTS else tuple(shape)


def to_hf_tensor(cfg: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Our weight ``name`` as Hugging Face stores it: vocabulary rows cut to vocab_size."""
    return tensor[:cfg.vocab_size] if name in VOCAB_WEIGHTS else tensor


def to_hf_llama_state_dict(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``Transformer.state_dict()`` renamed for ``LlamaForCausalLM``, vocabulary cut to vocab_size."""
    names = hf_names(cfg)
    ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unknown = sorted(set(state_dict) - set(names) - ignored)
    missing = sorted(set(names) - set(state_dict))
    if unknown or missing:
        raise ValueError(f"state dict does not match the config: unknown keys {unknown[:5]}, missing {missing[:5]}")
    return {theirs: to_hf_tensor(cfg, ours, state_dict[ours]) for ours, theirs in names.items()}


# ----------------------------------------------------------------------------- safetensors files


def plan_shards(sizes: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names grouped in order into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = []
    total = 0
    for name, nbytes in sizes:
        if not shards or (total + nbytes > max_bytes and shards[-1]):
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += nbytes
    return shards


def write_safetensors(folder: Path, shards: list[list[str]], tensor: Callable[[str], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``model-0000i-of-0000n.safetensors`` for each shard of names (``tensor(name)`` gives
    each, one shard in memory at a time) and ``model.safetensors.index.json``; returns the index."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: tensor(name).contiguous() for name in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        with atomic_path(folder / filename) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
            os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files readable by the owner only
        weight_map.update(dict.fromkeys(names, filename))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(folder / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return index


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_safetensors(path: Path):
    """``safe_open`` of ``path``; a truncated or damaged file is an :class:`InputError` naming it."""
    from safetensors import SafetensorError, safe_open  # heavy: imported by the readers that need it

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise InputError(path, f"not a readable safetensors file ({err}): it is truncated or damaged; copy it "
                         "again from where the model came from") from None


class HFCheckpoint:
    """A model folder in transformers' layout: ``config.json`` and safetensors weights."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        config_path = self.folder / CONFIG_FILE
        if not self.folder.is_dir():
            raise InputError(self.folder, "no such folder; init.from_hf takes a model folder in transformers' layout")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(config_path, "missing: a transformers model folder has config.json beside its "
                             "weights") from None
        except json.JSONDecodeError as err:
            raise InputError(config_path, f"not valid JSON: {err}") from None
        if not isinstance(self.config, dict):
            raise InputError(config_path, f"holds a JSON {type(self.config).__name__}, not the object of model "
                             "settings transformers writes; restore the model folder's own config.json")
        self.weight_map = self._weight_map()
        self._files: dict[str, Any] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise InputError(index, f"not a safetensors index ({err!r})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise InputError(index, "weight_map: must map each weight's name to its shard file's name")
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise InputError(index, f"names shard files that are not there: {', '.join(missing[:3])}")
            return weight_map
        files = sorted(self.folder.glob("*.safetensors"))
        if len(files) != 1:
            others = (sorted(p.name for p in self.folder.glob("*.bin"))
                      + sorted(p.name for p in self.folder.glob("*.pt")))
            hint = f" (found {', '.join(others[:3])}: convert them to safetensors)" if others else ""
            what = "no" if not files else f"{len(files)} .safetensors files but no {INDEX_FILE} for"
            raise InputError(self.folder, f"{what} model weights{hint}; expected {SINGLE_FILE} or {INDEX_FILE} with "
                             "its shards")
        with open_safetensors(files[0]) as f:
            return dict.fromkeys(f.keys(), files[0].name)

    def _open(self, name: str):
        if name not in self.weight_map:
            raise InputError(self.folder, f"holds no weight {name!r}")
        filename = self.weight_map[name]
        if filename not in self._files:
            self._files[filename] = open_safetensors(self.folder / filename)
        return self._files[filename]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(name).get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self._open(name).get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of weight ``name`` (its first dimension), reading only those."""
        return self._open(name).get_slice(name)[start:stop]
