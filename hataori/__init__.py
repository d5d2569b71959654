"""hataori: a pretraining framework for Japanese decoder-only language models."""

__version__ = "0.1.0"
