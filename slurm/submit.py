"""``hataori slurm submit``: write a pretraining run's batch script into its run folder and submit it.

    hataori slurm submit CONFIG.yaml [key=value ...] --nodes N --gpus-per-node G --time T
        [--partition P] [--account A] [--qos Q] [--cpus-only] [--cpus-per-task C]
        [--max-requeues K] [--signal-seconds S] [--data DATASET[:WEIGHT]] [--run-dir DIR] [--dry-run]

    hataori slurm submit configs/train/1b.yaml --data data/shards/debian-ja --run-dir runs/1b \\
        --nodes 4 --gpus-per-node 8 --time 24:00:00 --partition gpu --max-requeues 10

The training config is resolved and checked here, for the job's world size, before anything is
submitted. The run folder then holds, under ``slurm/``:

* ``train.yaml``: the resolved training config, which every attempt of the job trains from (a later
  edit of a preset does not change a queued run);
* ``job-<ID>.sbatch``: the batch script as submitted (see :mod:`hataori.slurm.sbatch`);
* ``job-<ID>.out``: the job's log, appended to by every attempt;
* ``jobs.jsonl``: one record per submission (job id, time, shape), read by ``hataori slurm status``.

``--dry-run`` prints the batch script and writes and submits nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

from hataori.config import override, split_items, to_yaml
from hataori.errors import HataoriError
from hataori.fsutil import atomic_write_text
from hataori.slurm.config import TIME_FORMATS, SlurmConfig
from hataori.slurm.sbatch import render

JOBS_FILE = "jobs.jsonl"
TRAIN_CONFIG = "train.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="+", metavar="CONFIG|key=value",
                        help="training presets (applied in order), then overrides such as trainer.max_steps=100")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the job (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="GPUs per node, one training process each; with --cpus-only, CPU processes per node")
    parser.add_argument("--time", required=True, help=f"time limit of one attempt: {TIME_FORMATS}")
    parser.add_argument("--partition", default="", help="Slurm partition")
    parser.add_argument("--account", default="", help="Slurm account to charge")
    parser.add_argument("--qos", default="", help="Slurm quality of service")
    parser.add_argument("--cpus-only", action="store_true", help="train on CPU nodes with gloo, no GPUs")
    parser.add_argument("--cpus-per-task", type=int, default=0, help="CPU cores per training process")
    parser.add_argument("--max-requeues", type=int, default=3,
                        help="requeues after a time-limit or preemption signal before giving up (default 3)")
    parser.add_argument("--signal-seconds", type=int, default=300,
                        help="seconds before the time limit at which training checkpoints and stops (default 300)")
    parser.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                        help="one more sbatch option, e.g. --sbatch-option=--exclusive (repeatable)")
    parser.add_argument("--data", action="append", default=[], metavar="DATASET[:WEIGHT]",
                        help="a dataset folder from `hataori data prepare` (repeatable); replaces data.datasets")
    parser.add_argument("--run-dir", help="the run folder (run_dir); an existing run resumes")
    parser.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")


def main(args: argparse.Namespace) -> int:
    from hataori.tokenizer.sources import parse_source
    from hataori.train.config import load_train_config
    from hataori.train.pretrain import check

    slurm = SlurmConfig(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_only=args.cpus_only,
                        cpus_per_task=args.cpus_per_task, time=args.time, signal_seconds=args.signal_seconds,
                        max_requeues=args.max_requeues, partition=args.partition, account=args.account,
                        qos=args.qos, extra_sbatch=args.sbatch_option)
    files, overrides = split_items(args.config)
    flags = [override("data.datasets", [parse_source(item) for item in args.data])] if args.data else []
    if args.run_dir:
        flags.append(override("run_dir", args.run_dir))
    cfg = load_train_config(files, overrides + flags)
    check(cfg, world_size=slurm.world_size)

    run_dir = Path(cfg.run_dir).absolute()
    folder = run_dir / "slurm"
    script = render(slurm, run_dir=run_dir, train_args=[str(folder / TRAIN_CONFIG)], python=sys.executable,
                    workdir=Path.cwd())
    if args.dry_run:
        print(script, end="")
        return 0

    if shutil.which("sbatch") is None:
        raise HataoriError("sbatch is not on PATH: submit from a Slurm login node (or use --dry-run)")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / TRAIN_CONFIG, to_yaml(cfg))
    pending = folder / "job.sbatch"
    atomic_write_text(pending, script)
    result = subprocess.run(["sbatch", "--parsable", str(pending)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise HataoriError(f"sbatch refused the job ({result.returncode}): {result.stderr.strip()}; "
                           f"the script is in {pending}")
    job_id = result.stdout.strip().split(";")[0]
    pending.replace(folder / f"job-{job_id}.sbatch")
    record = {"job_id": job_id, "submitted": datetime.datetime.now().isoformat(timespec="seconds"),
              "nodes": slurm.nodes, "processes_per_node": slurm.gpus_per_node, "cpus_only": slurm.cpus_only,
              "time": slurm.time, "max_requeues": slurm.max_requeues}
    with open(folder / JOBS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(f"submitted job {job_id}: {slurm.nodes} node(s) x {slurm.gpus_per_node} "
          f"{'CPU processes' if slurm.cpus_only else 'GPUs'}; log {folder / f'job-{job_id}.out'}")
    print(f"status: hataori slurm status {run_dir}")
    return 0
