"""Tokens/s of one training step of a model preset with each choice of kernels.

A step is forward, backward and a fused AdamW update (``torch.optim.AdamW(fused=True)``) of the
preset's model (default configs/model/1b.yaml) with its parameters in bf16; the rotary tables stay
fp32 buffers, as under DeepSpeed, which casts parameters only. The variants differ in
``attention_backend``, ``fused_kernels`` and ``chunked_loss``:

- ``sdpa+torch``: plain PyTorch, the reference
- ``triton+torch``: our attention kernel, PyTorch RMSNorm, RoPE and SwiGLU
- ``triton+triton``: our attention kernel and fused kernels
- ``triton+triton+chunked``: the same with the chunked cross-entropy
- ``flash_attn+triton``: flash-attn and our fused kernels (skipped, saying why, without flash-attn)
- ``auto+auto``: the presets' default; prints what auto chose

Every variant starts from the same seed and the same random batch (one batch, reused every step),
so the first-step losses agree up to the kernels' rounding and a broken kernel shows as a
different loss. Per variant it prints tokens/s, step time, TFLOP/s from
``ModelConfig.flops_per_token(seq_len)`` (the full T x T attention matrix, as in the PaLM paper),
MFU against ``--peak-tflops`` (default 989.4: H100 SXM dense bf16), the peak memory allocated over
the steps (model, optimizer and activations; AdamW keeps its states in bf16 like the parameters,
with no fp32 master copy, so a DeepSpeed run of the same model needs more), and the loss at the
first and at the last step. A variant that runs out of memory says so and the others still run.
It times, it never asserts a time. ``--json PATH`` also writes the settings and one row per variant
as JSON.

Without a GPU (``--device cpu``, the default when CUDA is absent) it is a smoke test: fp32, the
toy preset (configs/model/toy.yaml, unless ``--preset`` says otherwise) at ``--seq-len 128``, and
only the variants that run on a CPU: ``sdpa+torch``, ``sdpa+torch+chunked`` and ``auto+auto``
(which chooses SDPA and PyTorch ops there). MFU and memory print as "-".

    python benchmarks/bench_model.py [--preset configs/model/1b.yaml] [--micro-batch 4] [--seq-len 2048]
        [--steps 10] [--warmup 3] [--doc-len 0] [--checkpointing] [--variants sdpa+torch,auto+auto]
        [--peak-tflops 989.4] [--device cuda] [--json PATH] [KEY=VALUE ...]

KEY=VALUE pairs override the preset (e.g. ``n_layers=4``), as on hataori's command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from hataori.config import load
from hataori.fsutil import atomic_write_text
from hataori.model import ModelConfig
from hataori.model.attention import BACKENDS, auto_choice
from hataori.model.model import fused_kernels_unavailable, use_triton

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "model"
GIB = 2 ** 30


@dataclass(frozen=True)
class Variant:
    """One choice of kernels: the ModelConfig fields it sets."""

    name: str
    attention_backend: str
    fused_kernels: str
    chunked_loss: bool = False


CUDA_VARIANTS = (
    Variant("sdpa+torch", "sdpa", "torch"),
    Variant("triton+torch", "triton", "torch"),
    Variant("triton+triton", "triton", "triton"),
    Variant("triton+triton+chunked", "triton", "triton", chunked_loss=True),
    Variant("flash_attn+triton", "flash_attn", "triton"),
    Variant("auto+auto", "auto", "auto"),
)
CPU_VARIANTS = (
    Variant("sdpa+torch", "sdpa", "torch"),
    Variant("sdpa+torch+chunked", "sdpa", "torch", chunked_loss=True),
    Variant("auto+auto", "auto", "auto"),
)


def variants_for(device: torch.device) -> tuple[Variant, ...]:
    """The variants benchmarked on ``device``: the Triton and flash-attn ones need CUDA."""
    return CUDA_VARIANTS if device.type == "cuda" else CPU_VARIANTS


@dataclass(frozen=True)
class Shape:
    """What one step trains on, and how many steps are run."""

    micro_batch: int
    seq_len: int
    steps: int
    """Timed steps."""
    warmup: int
    """Untimed steps before them (compilation, autotuning, allocator warm-up)."""
    doc_len: int = 0
    """Mean document length of the packed rows (doc_ids); 0: no doc_ids."""
    seed: int = 0


@dataclass
class Result:
    """One variant's figures; ``note`` instead of figures when it was skipped or ran out of memory."""

    name: str
    attention: str = "-"
    """The attention backend that ran (auto resolved)."""
    kernels: str = "-"
    """The RMSNorm/RoPE/SwiGLU implementation that ran (auto resolved)."""
    tokens_per_s: float = math.nan
    step_ms: float = math.nan
    tflops: float = math.nan
    peak_gib: float | None = None
    """torch.cuda.max_memory_allocated over the steps (model, optimizer, activations); None off CUDA."""
    first_loss: float = math.nan
    last_loss: float = math.nan
    note: str | None = None

    @property
    def ran(self) -> bool:
        return self.note is None


def make_batch(cfg: ModelConfig, shape: Shape, device: torch.device):
    """(input_ids, doc_ids or None, targets), each (B, T), from a seeded CPU generator.

    Document starts fall independently with probability 1 / doc_len, so lengths are geometric
    with mean doc_len (cut at row ends); every row starts a document.
    """
    gen = torch.Generator().manual_seed(shape.seed)
    B, T = shape.micro_batch, shape.seq_len
    tokens = torch.randint(cfg.vocab_size, (B, T + 1), generator=gen)  # (B, T + 1)
    doc_ids = None
    if shape.doc_len > 0:
        starts = torch.rand(B, T, generator=gen) < 1.0 / shape.doc_len  # (B, T)
        starts[:, 0] = True
        doc_ids = (starts.cumsum(dim=1) - 1).to(device)  # (B, T)
    return tokens[:, :-1].to(device), doc_ids, tokens[:, 1:].to(device)


def unavailable(variant: Variant) -> str | None:
    """Why ``variant`` cannot run here, or None."""
    reason = BACKENDS[variant.attention_backend].unavailable()
    if reason is None and variant.fused_kernels == "triton":
        reason = fused_kernels_unavailable()
    return reason


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(cfg: ModelConfig, shape: Shape, batch, device: torch.device, dtype: torch.dtype) -> Result:
    """Build the model, run warmup + timed steps, return the figures (name and note unset)."""
    torch.manual_seed(shape.seed)
    model = cfg.build(device, dtype)  # parameters in dtype, the rotary tables in fp32
    if device.type == "cuda":  # the peak of the steps
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=device.type == "cuda")
    input_ids, doc_ids, targets = batch

    def step() -> torch.Tensor:
        loss = model(input_ids, doc_ids=doc_ids, targets=targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    first = last = None  # loss tensors, read once the steps are done so that no step waits on them
    for i in range(shape.warmup + shape.steps):
        if i == shape.warmup:
            _sync(device)
            start = time.perf_counter()
        last = step()
        if i == 0:
            first = last
    _sync(device)
    seconds = (time.perf_counter() - start) / shape.steps
    tokens = shape.micro_batch * shape.seq_len
    return Result(
        name="",
        attention=auto_choice(device, dtype, cfg.head_dim) if cfg.attention_backend == "auto"
        else cfg.attention_backend,
        kernels="triton" if use_triton(cfg.fused_kernels, device) else "torch",
        tokens_per_s=tokens / seconds,
        step_ms=seconds * 1e3,
        tflops=cfg.flops_per_token(shape.seq_len) * tokens / seconds / 1e12,
        peak_gib=torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
        first_loss=first.item(),
        last_loss=last.item(),
    )


def run_variants(base: ModelConfig, variants: tuple[Variant, ...] | list[Variant], shape: Shape,
                 device: torch.device, dtype: torch.dtype, checkpointing: bool = False) -> Iterator[Result]:
    """Benchmark each variant of ``base`` in turn, yielding its Result as soon as it is measured.

    Each variant builds its own model (same seed) and optimizer and frees them before the next.
    """
    for variant in variants:
        reason = unavailable(variant)
        if reason is not None:
            yield Result(variant.name, note=f"skipped: {reason}")
            continue
        cfg = dataclasses.replace(base, attention_backend=variant.attention_backend,
                                  fused_kernels=variant.fused_kernels, chunked_loss=variant.chunked_loss,
                                  activation_checkpointing=checkpointing)
        batch = make_batch(cfg, shape, device)
        try:
            result = _measure(cfg, shape, batch, device, dtype)
            result.name = variant.name
        except torch.OutOfMemoryError as err:
            result = Result(variant.name, note=f"out of memory: {str(err).splitlines()[0]}")
        del batch
        gc.collect()  # the failed step's frames, the model and optimizer are gone once err is
        if device.type == "cuda":
            torch.cuda.empty_cache()
        yield result


def _versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for module in ("triton", "flash_attn"):
        try:
            parts.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            parts.append(f"{module} not installed")
    return ", ".join(parts)


def _fmt(value: float | None, width: int, spec: str, suffix: str = "") -> str:
    """value right-aligned in ``width`` columns, "-" when it is unknown."""
    text = "-" if value is None or math.isnan(value) else format(value, spec) + suffix
    return f"{text:>{width}}"


HEADER = (f"{'variant':<22} {'attention':>10} {'kernels':>7} {'tokens/s':>10} {'step ms':>9} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'mem GiB':>8} {'loss@1':>8} {'loss@N':>8}")


def format_row(result: Result, peak_tflops: float | None) -> str:
    """One table row (columns as HEADER); MFU only when a peak is given (on CUDA)."""
    if not result.ran:
        return f"{result.name:<22} {result.note}"
    mfu = result.tflops / peak_tflops * 100 if peak_tflops else None
    return " ".join([f"{result.name:<22}", f"{result.attention:>10}", f"{result.kernels:>7}",
                     _fmt(result.tokens_per_s, 10, ".0f"), _fmt(result.step_ms, 9, ".1f"),
                     _fmt(result.tflops, 8, ".2f"), _fmt(mfu, 6, ".1f", "%"), _fmt(result.peak_gib, 8, ".2f"),
                     _fmt(result.first_loss, 8, ".4f"), _fmt(result.last_loss, 8, ".4f")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="preset overrides, e.g. n_layers=4")
    parser.add_argument("--preset", type=Path,
                        help="model preset (default: configs/model/1b.yaml on CUDA, toy.yaml on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per step (default 4)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default 2048 on CUDA, 128 on CPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--doc-len", type=int, default=0,
                        help="mean document length of packed rows with doc_ids; 0: no doc_ids (default)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every variant")
    parser.add_argument("--variants", help="comma-separated subset of the variants (default: all)")
    parser.add_argument("--peak-tflops", type=float, default=989.4,
                        help="the GPU's dense bf16 peak for MFU (default 989.4, H100 SXM)")
    parser.add_argument("--json", metavar="PATH", help="also write the settings and rows to PATH as JSON")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or PRESETS / ("1b.yaml" if cuda else "toy.yaml")
    seq_len = args.seq_len or (2048 if cuda else 128)
    known = variants_for(device)
    variants = known
    if args.variants:
        by_name = {v.name: v for v in known}
        wanted = [name.strip() for name in args.variants.split(",")]
        unknown = [name for name in wanted if name not in by_name]
        if unknown:
            parser.error(f"unknown variants on {device.type}: {', '.join(unknown)}; "
                         f"choose from {', '.join(by_name)}")
        variants = [by_name[name] for name in wanted]
    if min(args.micro_batch, seq_len, args.steps) < 1 or args.warmup < 0 or args.doc_len < 0:
        parser.error("--micro-batch, --seq-len and --steps must be positive, --warmup and --doc-len non-negative")
    base = load(ModelConfig, [preset], args.overrides)
    if seq_len > base.max_seq_len:
        parser.error(f"--seq-len {seq_len} exceeds the preset's max_seq_len={base.max_seq_len} "
                     f"(override it: max_seq_len={seq_len})")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = Shape(args.micro_batch, seq_len, args.steps, args.warmup, args.doc_len)

    print(torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)")
    print(_versions())
    print(f"{preset.name} {' '.join(args.overrides)}".rstrip()
          + f": {base.num_params() / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')}; "
          f"B={shape.micro_batch} T={seq_len} ({shape.micro_batch * seq_len} tokens per step), "
          f"{'no doc_ids' if not shape.doc_len else f'documents of mean length {shape.doc_len}'}, "
          f"activation checkpointing {'on' if args.checkpointing else 'off'}; "
          f"{shape.warmup} warmup + {shape.steps} timed steps of forward, backward, AdamW")
    if cuda:
        print(f"MFU against a peak of {args.peak_tflops} TFLOP/s (--peak-tflops; 989.4 is H100 SXM dense bf16)")
    else:
        print("CPU: the Triton and flash-attn variants need CUDA and are not run; no MFU or memory figures")
    if any(v.attention_backend == "auto" for v in variants):
        print(f"auto chooses attention {auto_choice(device, dtype, base.head_dim)}, fused kernels "
              f"{'triton' if use_triton('auto', device) else 'torch'} here")
    print(HEADER)
    peak = args.peak_tflops if cuda else None
    rows = []
    for result in run_variants(base, variants, shape, device, dtype, args.checkpointing):
        print(format_row(result, peak), flush=True)
        row = {key: None if isinstance(value, float) and math.isnan(value) else value  # JSON has no NaN
               for key, value in dataclasses.asdict(result).items()}
        rows.append({**row, "mfu": result.tflops / peak if peak and result.ran else None})
    if args.json:
        settings = {"preset": preset.name, "overrides": args.overrides, "params": base.num_params(),
                    "dtype": str(dtype).removeprefix("torch."), **dataclasses.asdict(shape),
                    "checkpointing": args.checkpointing, "peak_tflops": peak}
        text = json.dumps({"benchmark": "model_step", "device": torch.cuda.get_device_name(device) if cuda else "CPU",
                           "versions": _versions(), "settings": settings, "rows": rows}, indent=1, allow_nan=False,
                          default=str)
        atomic_write_text(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
