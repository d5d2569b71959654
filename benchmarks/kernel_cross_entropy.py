"""Memory (and on a GPU, time) of the chunked cross-entropy against the plain materialised-logits loss.

Both compute the mean cross-entropy of ``hidden @ weight.T`` for N tokens of width D and a
vocabulary of V (defaults: N=8192, D=4096, V = 32k, 64k, 100k, bf16 inputs).

- Everywhere (CPU included): the bytes autograd saves for the backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` on meta tensors (shapes only, nothing is computed or
  allocated, so the figure is exact and deterministic). The plain path saves the (N, V) fp32
  log-softmax; the chunked one N fp32 log-sum-exps beside the inputs both keep.
- On a CUDA GPU, also ``torch.cuda.max_memory_allocated`` over forward + backward above the inputs,
  and the time of forward + backward with its TFLOP/s (``6 * N * V * D`` useful FLOPs; the chunked
  path does ``8 * N * V * D``, recomputing the logits). It prints, it never asserts.

``--json PATH`` also writes the figures as JSON rows, one per vocabulary and loss.

    python benchmarks/kernel_cross_entropy.py [--tokens 8192] [--width 4096] [--chunk 2048] [--dtype bf16]
        [--vocabs 32000,64000,100000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch

from hataori.config import int_list
from hataori.fsutil import atomic_write_text
from hataori.kernels.cross_entropy import DEFAULT_CHUNK_SIZE, ChunkedCrossEntropyFunction, cross_entropy_ref

VOCABS = (32_000, 64_000, 100_000)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 2 ** 30


def _providers(chunk: int):
    """name -> fn(hidden, weight, targets) -> loss. The chunked one skips the target range check,
    which needs values (meta tensors have none)."""
    return {
        "plain": lambda h, w, t: cross_entropy_ref(h, w, t, vocab_size=w.shape[0]),
        "chunked": lambda h, w, t: ChunkedCrossEntropyFunction.apply(h, w, t, w.shape[0], chunk, -100),
    }


def _inputs(n_tokens: int, width: int, vocab: int, dtype: torch.dtype, device: str):
    hidden = torch.randn(n_tokens, width, dtype=dtype, device=device, requires_grad=True)
    weight = (torch.randn(vocab, width, dtype=dtype, device=device) * width ** -0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n_tokens,), device=device)
    return hidden, weight, targets


def saved_bytes(fn, hidden, weight, targets) -> int:
    """Bytes of the distinct tensors autograd saves while running fn forward."""
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(hidden, weight, targets)
    return sum(t.numel() * t.element_size() for t in saved.values())


def _gpu_peak_and_time(fn, hidden, weight, targets) -> tuple[float, float]:
    """(peak bytes above the inputs over forward + backward, milliseconds per forward + backward)."""
    import triton.testing

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets).backward()

    step()
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(step, warmup=5, rep=50)
    return peak, ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--vocabs", type=int_list(2), default=VOCABS, help="comma-separated (default 32k, 64k, 100k)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    if min(args.tokens, args.width, args.chunk) < 1:
        parser.error("--tokens, --width and --chunk must be positive")
    dtype, n, d = DTYPES[args.dtype], args.tokens, args.width
    providers = _providers(args.chunk)
    rows = {(vocab, name): {"vocab": vocab, "loss": name} for vocab in args.vocabs for name in providers}

    print(f"saved for backward (exact, from shapes): N={n} D={d} {args.dtype} chunk={args.chunk}")
    for vocab in args.vocabs:
        line = []
        for name, fn in providers.items():
            saved = saved_bytes(fn, *_inputs(n, d, vocab, dtype, 'meta'))
            rows[vocab, name]["saved_gib"] = saved / GIB
            line.append(f"{name} {saved / GIB:7.3f} GiB")
        print(f"  V={vocab:>6}: " + "   ".join(line))

    cuda = torch.cuda.is_available()
    if not cuda:
        print("no CUDA device: peak memory and time are measured on a GPU only")
    else:
        print(f"GPU ({torch.cuda.get_device_name()}): peak allocated above inputs over forward + backward, "
              f"time of forward + backward")
        for vocab in args.vocabs:
            line = []
            for name, fn in providers.items():
                inputs = _inputs(n, d, vocab, dtype, "cuda")
                try:
                    peak, ms = _gpu_peak_and_time(fn, *inputs)
                except torch.OutOfMemoryError:
                    rows[vocab, name]["note"] = "out of memory"
                    line.append(f"{name} out of memory")
                    continue
                finally:
                    del inputs
                    torch.cuda.empty_cache()
                tflops = 6 * n * vocab * d / (ms * 1e-3) / 1e12
                rows[vocab, name].update(peak_gib=peak / GIB, ms=ms, tflops=tflops)
                line.append(f"{name} {peak / GIB:7.3f} GiB {ms:7.2f} ms {tflops:6.1f} TFLOP/s")
            print(f"  V={vocab:>6}: " + "   ".join(line))
    if args.json:
        settings = {"tokens": n, "width": d, "chunk": args.chunk, "dtype": args.dtype}
        atomic_write_text(args.json, json.dumps({
            "benchmark": "cross_entropy", "device": torch.cuda.get_device_name() if cuda else "CPU",
            "settings": settings, "rows": list(rows.values())}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
