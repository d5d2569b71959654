"""hataori.model: the Llama-style decoder-only transformer."""

from hataori.model.attention import BACKENDS, attention, register_backend
from hataori.model.model import IGNORE_INDEX, ModelConfig, Transformer

__all__ = ["BACKENDS", "IGNORE_INDEX", "ModelConfig", "Transformer", "attention", "register_backend"]
