"""hataori.train: data blending and packing, the DeepSpeed training loop, checkpoints and logs."""
