"""Models in and out: transformers' layout, init sources, opening a run for a command, `export hf`."""
