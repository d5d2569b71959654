"""The cost of a training step under each post-training objective: SFT and DPO on the same model and rows.

    python benchmarks/objective_step.py --init RUN --sft SFT_DATA --dpo DPO_DATA [--steps 30] [--repeats 2]
        [--nproc 2] [--config configs/train/sft-toy.yaml] [key=value ...]

Runs ``hataori sft`` on SFT_DATA (conversations) and ``hataori dpo`` on DPO_DATA (preference pairs), each from
``init.from_run=RUN``, in alternating order ``--repeats`` times, for ``--steps`` steps with no validation and
no checkpoint before the last step, each in a fresh run folder under a temporary folder; the overrides go to
both. For each run it prints the median seconds a step (steps 2 on: the first warms up), positions a second
(rows x seq_len over that time, padding included, as the trainer counts them) and, for DPO, the one-off pass
that computes the reference log-probabilities before step 1. It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(objective: str, data: str, args: argparse.Namespace, run_dir: Path) -> dict:
    """One run of ``hataori OBJECTIVE``; its step figures and, for DPO, the reference pass's seconds."""
    command = [sys.executable, "-m", "hataori.cli", objective, args.config, "--data", data, "--run-dir", str(run_dir),
               "--nproc", str(args.nproc), f"init.from_run={args.init}", f"trainer.max_steps={args.steps}",
               "validation.every_steps=0", f"checkpoint.every_steps={args.steps}", "logging.every_steps=1",
               *args.overrides]
    began = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    seconds = statistics.median(r["seconds"] for r in train[1:])
    found = re.search(r"reference log-probabilities of ([\d,]+) pairs in ([\d.]+) s", result.stdout)
    return {"seconds": seconds, "positions_per_s": train[-1]["tokens"] / seconds, "wall": wall,
            "reference": (found.group(1), float(found.group(2))) if found else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="the run both objectives start from (init.from_run)")
    parser.add_argument("--sft", required=True, help="conversations (hataori data prepare --chat-template)")
    parser.add_argument("--dpo", required=True, help="preference pairs (... preference=true)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--config", default="configs/train/sft-toy.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value settings for both objectives")
    args = parser.parse_args(argv)
    print(f"{args.config} from {args.init}, {args.nproc} processes, {args.steps} steps a run, "
          f"{' '.join(args.overrides) or 'no overrides'}")
    with tempfile.TemporaryDirectory(prefix="objective_step-") as tmp:
        for repeat in range(args.repeats):
            for objective, data in (("sft", args.sft), ("dpo", args.dpo))[::1 if repeat % 2 == 0 else -1]:
                found = run(objective, data, args, Path(tmp) / f"{objective}-{repeat}")
                line = (f"  {objective}: {found['seconds']:.3f} s a step (median), "
                        f"{found['positions_per_s']:,.0f} positions/s, {found['wall']:.0f} s in all")
                if found["reference"]:
                    pairs, seconds = found["reference"]
                    line += f"; reference of {pairs} pairs in {seconds:.1f} s"
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
