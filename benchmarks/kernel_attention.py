"""Throughput of the Triton attention kernel against torch SDPA (and flash-attn when installed).

Prints forward, backward and forward+backward TFLOP/s for causal grouped-query attention at sequence
lengths 1k-16k and head dims 64 and 128, plus the bandwidth of the unavoidable traffic (reading q, k,
v and writing the output; for the backward also reading dO and writing dQ, dK, dV). FLOPs count the
causal half of the score matrix: forward ``2 * 2 * B * H * T^2 * Dh / 2``, backward 2.5 times that;
the backward's time is the forward+backward's less the forward's. ``--json PATH`` also writes the
rows as JSON. It times, it never asserts a time.

On a CUDA GPU every provider runs, timed by ``triton.testing.do_bench``: our Triton kernel, SDPA as
torch dispatches it and held to each of its backends (flash, cuDNN, memory-efficient), and flash-attn
when installed. The byte counts are those of grouped-query inputs for every provider. On a CPU (``--device cpu``)
SDPA alone runs (as dispatched, held to flash, and to cuDNN, which says it cannot run there), timed with
a wall clock, as a rehearsal of the script and its output; without
``--device cpu`` and without a GPU it says so and exits 0.

    python benchmarks/kernel_attention.py [--dtype bf16] [--heads 32] [--kv-heads 8] [--tokens 16384]
        [--seq-lens 1024,2048,4096,8192,16384] [--head-dims 64,128] [--json PATH] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from hataori.config import int_list
from hataori.fsutil import atomic_write_text

SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def _sdpa_with(backend):
    """SDPA held to one backend, on k and v expanded to every query head beforehand (outside the
    timing; some backends take no grouped-query inputs)."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
        return out.transpose(1, 2)

    run.expand_kv = True
    return run


def _providers(device: torch.device):
    """name -> fn(q, k, v) on (B, T, H, Dh) / (B, T, H_kv, Dh), causal. On CUDA SDPA runs as torch
    dispatches it (``sdpa``) and held to each of its backends in turn, so that the best of them is known."""
    from torch.nn.attention import SDPBackend

    sdpa = {"sdpa": _sdpa, "sdpa-flash": _sdpa_with(SDPBackend.FLASH_ATTENTION),
            "sdpa-cudnn": _sdpa_with(SDPBackend.CUDNN_ATTENTION)}
    if device.type != "cuda":  # cuDNN's backend cannot run there: its row says so
        return sdpa
    from hataori.kernels.attention import flash_attention  # Triton compiles it for the GPU: on CUDA only

    providers = {"triton": flash_attention, **sdpa, "sdpa-efficient": _sdpa_with(SDPBackend.EFFICIENT_ATTENTION)}
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return providers
    providers["flash-attn"] = lambda q, k, v: flash_attn_func(q, k, v, causal=True)
    return providers


def _time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _tuned_configs() -> dict[str, str]:
    """The block sizes the autotuner chose for the Triton kernels (its key leaves out the sequence
    length: the choice made at the first length measured holds for the others)."""
    from hataori.kernels import attention  # as in _providers: on CUDA only

    return {name: str(getattr(kernel, "best_config", None))
            for name, kernel in (("fwd", attention._fwd), ("dkdv", attention._bwd_dkdv), ("dq", attention._bwd_dq))}


def measure(provider: str, fn, *, batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int,
            dtype: torch.dtype, device: torch.device) -> dict:
    """One row: the provider's times and rates at one shape, or ``"note"`` when it ran out of memory."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, seq_len, heads, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(batch, seq_len, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(k.shape, device=device, dtype=dtype, generator=gen)
    dout = torch.randn(q.shape, device=device, dtype=dtype, generator=gen)
    fwd_flops = 2 * 2 * batch * heads * seq_len * seq_len * head_dim / 2
    q_bytes, kv_bytes = q.numel() * q.element_size(), k.numel() * k.element_size()
    fwd_bytes = 2 * q_bytes + 2 * kv_bytes  # q, k, v in; out
    bwd_bytes = 3 * q_bytes + 4 * kv_bytes  # q, k, v, out, dO in; dQ, dK, dV out (delta aside)
    row = {"provider": provider, "head_dim": head_dim, "seq_len": seq_len, "batch": batch}
    if getattr(fn, "expand_kv", False):
        k, v = (x.repeat_interleave(heads // kv_heads, dim=2) for x in (k, v))  # (B, T, H, Dh)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    try:
        fwd_ms = _time_ms(lambda: fn(q, k, v), device)
        both_ms = _time_ms(lambda: fn(qg, kg, vg).backward(dout), device)
    except torch.OutOfMemoryError:
        return {**row, "note": "out of memory"}
    except RuntimeError as err:  # a backend held to shapes or a build it does not support
        return {**row, "note": f"cannot run: {str(err).splitlines()[0][:200]}"}
    bwd_ms = both_ms - fwd_ms
    if provider == "triton":
        row["configs"] = _tuned_configs()
    return {**row, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_bwd_ms": both_ms,
            "fwd_tflops": fwd_flops / fwd_ms / 1e9,
            "bwd_tflops": 2.5 * fwd_flops / bwd_ms / 1e9 if bwd_ms > 0 else None,
            "fwd_bwd_tflops": 3.5 * fwd_flops / both_ms / 1e9, "fwd_gbps": fwd_bytes / fwd_ms / 1e6,
            "fwd_bwd_gbps": (fwd_bytes + bwd_bytes) / both_ms / 1e6}


def format_row(row: dict) -> str:
    head = f"{row['provider']:>14} {row['head_dim']:>4} {row['seq_len']:>6} {row['batch']:>3}"
    if "note" in row:
        return f"{head}  {row['note']}"
    bwd = "-" if row["bwd_tflops"] is None else f"{row['bwd_tflops']:.1f}"
    return (f"{head} {row['fwd_tflops']:>12.1f} {bwd:>12} {row['fwd_bwd_tflops']:>16.1f} {row['fwd_gbps']:>9.0f} "
            f"{row['fwd_bwd_gbps']:>13.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (grouped-query)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch: B = tokens // T")
    parser.add_argument("--seq-lens", type=int_list(), default=SEQ_LENS, help="comma-separated (default 1k-16k)")
    parser.add_argument("--head-dims", type=int_list(), default=HEAD_DIMS, help="comma-separated (default 64,128)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: SDPA alone, a rehearsal of the script (default cuda)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to PATH as JSON")
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kernel_attention.py needs a CUDA GPU; none found, nothing measured (--device cpu rehearses it)")
        return 0

    dtype = DTYPES[args.dtype]
    providers = _providers(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}  {args.dtype}  causal  H={args.heads} H_kv={args.kv_heads}  {args.tokens} tokens per batch")
    print(f"{'provider':>14} {'Dh':>4} {'T':>6} {'B':>3} {'fwd TFLOP/s':>12} {'bwd TFLOP/s':>12} "
          f"{'fwd+bwd TFLOP/s':>16} {'fwd GB/s':>9} {'fwd+bwd GB/s':>13}")
    rows = []
    for head_dim in args.head_dims:
        for seq_len in args.seq_lens:
            for provider, fn in providers.items():
                rows.append(measure(provider, fn, batch=max(1, args.tokens // seq_len), seq_len=seq_len,
                                    heads=args.heads, kv_heads=args.kv_heads, head_dim=head_dim, dtype=dtype,
                                    device=device))
                print(format_row(rows[-1]), flush=True)
                if "configs" in rows[-1]:
                    print(f"{'':>30}autotuned: {rows[-1]['configs']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if args.json:
        settings = {"dtype": args.dtype, "heads": args.heads, "kv_heads": args.kv_heads, "tokens": args.tokens,
                    "causal": True}
        atomic_write_text(args.json, json.dumps({"benchmark": "attention", "device": name, "settings": settings,
                                                 "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
