"""Throughput of the Triton attention kernel against torch SDPA (and flash-attn when installed).

Prints forward and forward+backward TFLOP/s for causal grouped-query attention at sequence lengths
1k-16k and head dims 64 and 128, plus the bandwidth of the unavoidable traffic (reading q, k, v and
writing the output; for the backward also reading dO and writing dQ, dK, dV). FLOPs count the causal
half of the score matrix: forward ``2 * 2 * B * H * T^2 * Dh / 2``, backward 2.5 times that.
Needs a CUDA GPU; elsewhere it says so and exits 0. It times, it never asserts a time.

    python kernels/bench_attention.py [--dtype bf16] [--heads 32] [--kv-heads 8] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _providers(dtype: torch.dtype):
    """name -> fn(q, k, v) on (B, T, H, Dh) / (B, T, H_kv, Dh), causal."""
    from hataori.kernels.attention import flash_attention

    def sdpa(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)

    providers = {"triton": flash_attention, "sdpa": sdpa}
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return providers
    providers["flash-attn"] = lambda q, k, v: flash_attn_func(q, k, v, causal=True)
    return providers


def _time_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (grouped-query)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch: B = tokens // T")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU; none found, nothing measured")
        return 0

    dtype = DTYPES[args.dtype]
    providers = _providers(dtype)
    print(f"{torch.cuda.get_device_name()}  {args.dtype}  causal  H={args.heads} H_kv={args.kv_heads}  "
          f"{args.tokens} tokens per batch")
    print(f"{'provider':>10} {'Dh':>4} {'T':>6} {'B':>3} {'fwd TFLOP/s':>12} {'fwd GB/s':>9} "
          f"{'fwd+bwd TFLOP/s':>16} {'fwd+bwd GB/s':>13}")
    for head_dim in HEAD_DIMS:
        for seq_len in SEQ_LENS:
            batch = max(1, args.tokens // seq_len)
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(batch, seq_len, args.heads, head_dim, device="cuda", dtype=dtype, generator=gen)
            k = torch.randn(batch, seq_len, args.kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
            v = torch.randn_like(k)
            dout = torch.randn_like(q)
            fwd_flops = 2 * 2 * batch * args.heads * seq_len * seq_len * head_dim / 2
            q_bytes, kv_bytes = q.numel() * q.element_size(), k.numel() * k.element_size()
            fwd_bytes = 2 * q_bytes + 2 * kv_bytes  # q, k, v in; out
            bwd_bytes = 3 * q_bytes + 4 * kv_bytes  # q, k, v, out, dO in; dQ, dK, dV out (delta aside)
            for name, fn in providers.items():
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                try:
                    fwd_ms = _time_ms(lambda: fn(q, k, v))
                    both_ms = _time_ms(lambda: fn(qg, kg, vg).backward(dout))
                except torch.OutOfMemoryError:
                    print(f"{name:>10} {head_dim:>4} {seq_len:>6} {batch:>3}  out of memory")
                    continue
                print(f"{name:>10} {head_dim:>4} {seq_len:>6} {batch:>3} "
                      f"{fwd_flops / fwd_ms / 1e9:>12.1f} {fwd_bytes / fwd_ms / 1e6:>9.0f} "
                      f"{3.5 * fwd_flops / both_ms / 1e9:>16.1f} "
                      f"{(fwd_bytes + bwd_bytes) / both_ms / 1e6:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
