"""hataori.kernels: fused Triton kernels (attention, norms, loss) with pure-PyTorch references."""
