"""Step time of a training preset under each ZeRO stage, two processes on this machine.

    python benchmarks/zero_stages.py --data data/shards/debian-ja [--config configs/train/toy.yaml] [--steps 12]

Each stage trains ``--steps`` steps in a fresh run folder under ``runs/bench-zero/`` through
``hataori pretrain --nproc 2``; the table gives the median seconds of the steps after the first two
(start-up and first-step allocation excluded) and the tokens per second that makes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared dataset folder")
    parser.add_argument("--config", default="configs/train/toy.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every stage")
    args = parser.parse_args()

    rows = []
    for stage in range(4):
        run_dir = Path("runs/bench-zero") / f"stage{stage}"
        shutil.rmtree(run_dir, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "hataori.cli", "pretrain", args.config, "--data", args.data,
                        "--run-dir", str(run_dir), "--nproc", str(args.nproc), f"zero.stage={stage}",
                        f"trainer.max_steps={args.steps}", "schedule.warmup_steps=2", "validation.every_steps=0",
                        "validation.max_docs=1",
                        "checkpoint.every_steps=100000", "logging.every_steps=100000", *args.overrides],
                       check=True, stdout=subprocess.DEVNULL)
        steps = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"train"' in line]
        seconds = statistics.median(s["seconds"] for s in steps[2:])
        rows.append((stage, seconds, steps[-1]["tokens"] / seconds))
    print(f"{args.config}, {args.nproc} processes, {args.steps} steps")
    print("ZeRO stage | s/step (median) | tokens/s")
    for stage, seconds, rate in rows:
        print(f"{stage:10d} | {seconds:15.3f} | {rate:8,.0f}")


if __name__ == "__main__":
    main()
