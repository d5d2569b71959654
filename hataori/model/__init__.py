"""hataori.model: the Llama-style decoder-only transformer."""

from hataori.model.attention import BACKENDS, attention, register_backend
from hataori.model.lora import LoRAConfig, LoRALinear, apply_lora, merged_state_dict
from hataori.model.model import IGNORE_INDEX, ModelConfig, Transformer

__all__ = ["BACKENDS", "IGNORE_INDEX", "LoRAConfig", "LoRALinear", "ModelConfig", "Transformer", "apply_lora",
           "attention", "merged_state_dict", "register_backend"]
