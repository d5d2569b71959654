"""LoRA against full training of the same model: step time, tokens per second, checkpoint size.

    python benchmarks/lora_throughput.py --init init.from_run=runs/pretrain/toy --data data/shards/debian-ja \
        [--config configs/train/toy.yaml] [--steps 20] [--nproc 2] [key=value ...]

Both runs start from the same weights (``--init``: ``init.from_run=RUN`` or ``init.from_hf=DIR``) in a
fresh run folder under ``runs/bench-lora/`` through ``hataori pretrain --nproc N``, with the same
batches; the LoRA run adds ``lora.rank=16`` on every attention and MLP projection (change it with
``--lora``). The table gives the median seconds of the steps after the first two (start-up and
first-step allocation excluded), the tokens per second that makes, the trainable parameters and
the size of the last checkpoint (its manifest's files).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULT_LORA = "lora={rank: 16, alpha: 32, targets: [attn.*, mlp.*]}"


def run(name: str, args: argparse.Namespace, extra: list[str]) -> tuple[float, float, str, int]:
    """(median s/step, tokens/s, trainable parameters as printed, checkpoint bytes) of one run."""
    run_dir = Path("runs/bench-lora") / name
    shutil.rmtree(run_dir, ignore_errors=True)
    result = subprocess.run([sys.executable, "-m", "hataori.cli", "pretrain", args.config, args.init, "--data",
                             args.data, "--run-dir", str(run_dir), "--nproc", str(args.nproc),
                             f"trainer.max_steps={args.steps}", "schedule.warmup_steps=2", "validation.every_steps=0",
                             "validation.max_docs=1", f"checkpoint.every_steps={args.steps}",
                             "logging.every_steps=100000", *extra, *args.overrides],
                            check=True, capture_output=True, text=True)
    steps = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"train"' in line]
    seconds = statistics.median(s["seconds"] for s in steps[2:])
    lora = re.search(r"([\d,]+) trainable of ([\d,]+) parameters", result.stdout)
    trainable = f"{lora.group(1)} of {lora.group(2)}" if lora else "all"
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    size = sum(entry["bytes"] for entry in manifest["files"].values())
    return seconds, steps[-1]["tokens"] / seconds, trainable, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True,
                        help="init.from_run=RUN or init.from_hf=DIR: the weights both start from")
    parser.add_argument("--data", required=True, help="a prepared dataset folder")
    parser.add_argument("--config", default="configs/train/toy.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--lora", default=DEFAULT_LORA, help=f"the LoRA override (default: {DEFAULT_LORA!r})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = parser.parse_args()

    rows = [("full", *run("full", args, [])), ("LoRA", *run("lora", args, [args.lora]))]
    print(f"{args.config} {args.init}, {args.nproc} processes, {args.steps} steps; LoRA: {args.lora}")
    print("training | s/step (median) | tokens/s | trainable parameters | checkpoint bytes")
    for name, seconds, rate, trainable, size in rows:
        print(f"{name:8} | {seconds:15.3f} | {rate:8,.0f} | {trainable:>20} | {size:,}")


if __name__ == "__main__":
    main()
