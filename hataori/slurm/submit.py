"""``hataori slurm submit``: write a pretraining run's batch script into its run folder and submit it.

    hataori slurm submit CONFIG.yaml [key=value ...] [--cluster PROFILE.yaml ...] [slurm.KEY=VALUE ...]
        [--nodes N] [--gpus-per-node G] [--time T] [--partition P] [--account A] [--qos Q] [--job-name J]
        [--cpus-only] [--cpus-per-task C] [--max-requeues K] [--signal-seconds S] [--sbatch-option OPT ...]
        [--data DATASET[:WEIGHT]] [--run-dir DIR] [--dry-run]

    hataori slurm submit configs/train/1b.yaml --cluster configs/slurm/h100-example.yaml \
        --data data/shards/debian-ja --run-dir runs/1b --nodes 4 --time 24:00:00

Two configs meet here. The training config comes from training presets and ``key=value``
overrides, as in ``hataori pretrain``. The job (:class:`~hataori.slurm.config.SlurmConfig`: shape,
time limit, partition, account, job name, setup lines, requeue policy) comes from cluster profiles
(``--cluster``, presets in ``configs/slurm/`` with ``base:`` chains like any other) and
``slurm.KEY=VALUE`` overrides; each flag above is a shortcut for one such key (``--nodes 4`` is
``slurm.nodes=4``), and a key set both ways is refused. The training config is resolved and
checked here, for the job's world size, before anything is submitted. The run folder then holds,
under ``slurm/``:

* ``train.yaml``: the resolved training config, which every attempt of the job trains from (a later
  edit of a preset does not change a queued run);
* ``slurm.yaml``: the resolved job config of the latest submission;
* ``job-<ID>.sbatch``: the batch script as submitted (see :mod:`hataori.slurm.sbatch`);
* ``job-<ID>.out``: the job's log, appended to by every attempt;
* ``jobs.jsonl``: one record per submission (job id, time, shape), read by ``hataori slurm status``.

``--dry-run`` prints the batch script and writes and submits nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

from hataori.config import command_items, file_keys, load, to_yaml
from hataori.errors import ConfigError, HataoriError, InputError
from hataori.fsutil import atomic_write_text
from hataori.slurm.config import TIME_FORMATS, SlurmConfig
from hataori.slurm.sbatch import render
from hataori.sourcespec import parse_source

JOBS_FILE = "jobs.jsonl"
TRAIN_CONFIG = "train.yaml"
JOB_CONFIG = "slurm.yaml"


SLURM_PREFIX = "slurm."
"""The prefix of the job's ``KEY=VALUE`` overrides among the training config's."""
SHORTCUTS = {"--nodes": "nodes", "--gpus-per-node": "gpus_per_node", "--time": "time", "--partition": "partition",
             "--account": "account", "--qos": "qos", "--job-name": "job_name", "--cpus-only": "cpus_only",
             "--cpus-per-task": "cpus_per_task", "--max-requeues": "max_requeues",
             "--signal-seconds": "signal_seconds", "--sbatch-option": "extra_sbatch"}
"""Each flag and the SlurmConfig key it sets."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="+", metavar="CONFIG|key=value",
                        help="training presets (applied in order), then overrides such as trainer.max_steps=100; "
                             "slurm.KEY=VALUE overrides set the job's config")
    parser.add_argument("--cluster", action="append", default=[], metavar="PROFILE.yaml",
                        help="a cluster profile (configs/slurm/): partition, account, setup lines... (repeatable)")
    shortcut = "shortcut for slurm.{}"
    parser.add_argument("--nodes", type=int, help=f"nodes of the job (default 1; {shortcut.format('nodes')})")
    parser.add_argument("--gpus-per-node", type=int,
                        help="GPUs per node, one training process each; with --cpus-only, CPU processes per node "
                             f"(default 8; {shortcut.format('gpus_per_node')})")
    parser.add_argument("--time", help=f"time limit of one attempt: {TIME_FORMATS} ({shortcut.format('time')})")
    parser.add_argument("--partition", help=f"Slurm partition ({shortcut.format('partition')})")
    parser.add_argument("--account", help=f"Slurm account to charge ({shortcut.format('account')})")
    parser.add_argument("--qos", help=f"Slurm quality of service ({shortcut.format('qos')})")
    parser.add_argument("--job-name", help=f"job name (default hataori-RUN; {shortcut.format('job_name')})")
    parser.add_argument("--cpus-only", action="store_const", const=True,
                        help=f"train on CPU nodes with gloo, no GPUs ({shortcut.format('cpus_only')}=true)")
    parser.add_argument("--cpus-per-task", type=int,
                        help=f"CPU cores per training process ({shortcut.format('cpus_per_task')})")
    parser.add_argument("--max-requeues", type=int,
                        help="requeues after a time-limit or preemption signal before giving up (default 3; "
                             f"{shortcut.format('max_requeues')})")
    parser.add_argument("--signal-seconds", type=int,
                        help="seconds before the time limit at which training checkpoints and stops (default 300; "
                             f"{shortcut.format('signal_seconds')})")
    parser.add_argument("--sbatch-option", action="append", metavar="OPTION",
                        help="one more sbatch option, e.g. --sbatch-option=--exclusive (repeatable; "
                             f"{shortcut.format('extra_sbatch')})")
    parser.add_argument("--data", action="append", default=[], metavar="DATASET[:WEIGHT]",
                        help="a dataset folder from `hataori data prepare` (repeatable); replaces data.datasets")
    parser.add_argument("--run-dir", help="the run folder (run_dir); an existing run resumes")
    parser.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")


def job_config(args: argparse.Namespace, overrides: list[str]) -> SlurmConfig:
    """The SlurmConfig of the cluster profiles, the ``slurm.KEY=VALUE`` items of ``overrides`` and the flags."""
    items = [item.removeprefix(SLURM_PREFIX) for item in overrides]
    files, job_overrides = command_items(items, {flag: (key, getattr(args, flag[2:].replace("-", "_")))
                                                 for flag, key in SHORTCUTS.items()}, prefix=SLURM_PREFIX)
    try:
        return load(SlurmConfig, [*args.cluster, *files], job_overrides)
    except ConfigError as err:
        if err.key == "time" and "required" in err.message:
            raise ConfigError("slurm.time", "the job's time limit is not set; pass --time (e.g. --time 24:00:00), "
                              "slurm.time=... or set time: in the cluster profile") from None
        raise ConfigError(f"{SLURM_PREFIX}{err.key}" if err.key else "slurm", err.message) from None


def refuse_cluster_profiles(files: list[str]) -> None:
    """A cluster profile passed among the training presets is named, with ``--cluster``, instead of
    meeting the training config's unknown-key error."""
    job_keys = {field.name for field in dataclasses.fields(SlurmConfig)}
    for path in files:
        keys = file_keys(path) - {"base"}
        if keys and keys <= job_keys:
            raise InputError(path, f"is a cluster profile (it sets {', '.join(sorted(keys))}); pass it with "
                                   f"--cluster {path}")


def main(args: argparse.Namespace) -> int:
    # torch (~1.2 s) loads with the training config: not for `hataori slurm submit --help`
    from hataori.train.config import load_train_config
    from hataori.train.pretrain import check

    job_items = [item for item in args.config if item.startswith(SLURM_PREFIX)]
    slurm = job_config(args, job_items)
    files, overrides = command_items([item for item in args.config if not item.startswith(SLURM_PREFIX)], {
        "--data": ("data.datasets", [parse_source(item) for item in args.data] if args.data else None),
        "--run-dir": ("run_dir", args.run_dir)})
    refuse_cluster_profiles(files)
    cfg = load_train_config(files, overrides)
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
    atomic_write_text(folder / JOB_CONFIG, to_yaml(slurm))
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
