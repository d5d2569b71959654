"""hataori.model: the Llama-style decoder-only transformer."""
