"""``hataori slurm status RUN``: the run's latest job, its last step and its last complete checkpoint.

    hataori slurm status runs/1b
    hataori slurm status runs/1b --finished    # exit status 0 if the run has trained its last step

The job comes from ``RUN/slurm/jobs.jsonl`` (written by ``hataori slurm submit``) and its state from
``scontrol show job`` (no accounting database needed; the controller forgets a job ``MinJobAge``
seconds after it ends). The last step is the last training record of ``RUN/metrics.jsonl``; the last
complete checkpoint is the newest ``RUN/checkpoints/step_<N>`` folder. ``--finished`` compares that
checkpoint's step with ``trainer.max_steps`` of the submitted config (``RUN/slurm/train.yaml``, else
``RUN/config.yaml``); the batch script asks it before requeueing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

from hataori.checkpoint.layout import CHECKPOINTS, CONFIG_FILE, METRICS_FILE, complete_steps, tag
from hataori.errors import InputError
from hataori.slurm.submit import JOBS_FILE, TRAIN_CONFIG


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="the run folder")
    parser.add_argument("--finished", action="store_true",
                        help="print nothing; exit 0 if the run's last complete checkpoint is of its last step, "
                             "1 if not")


def main(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "no such run folder")
    checkpoint = last_checkpoint(run_dir)
    max_steps = planned_steps(run_dir)
    if args.finished:
        return 0 if checkpoint is not None and max_steps is not None and checkpoint >= max_steps else 1

    print(f"run: {run_dir}")
    job_id = latest_job(run_dir)
    if job_id is None:
        print("job: none submitted from this folder (no slurm/jobs.jsonl)")
    else:
        print(f"job {job_id}: {describe_job(job_id)}")
    step, loss = last_step(run_dir)
    of = f" of {max_steps}" if max_steps is not None else ""
    print("last step: none logged" if step is None else f"last step: {step}{of} (loss {loss:.4f})")
    if checkpoint is None:
        print("last complete checkpoint: none")
    else:
        print(f"last complete checkpoint: step {checkpoint} ({run_dir / CHECKPOINTS / tag(checkpoint)})")
    return 0


def latest_job(run_dir: Path) -> str | None:
    path = run_dir / "slurm" / JOBS_FILE
    if not path.is_file():
        return None
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(lines[-1])["job_id"] if lines else None


def job_fields(job_id: str) -> dict[str, str] | None:
    """``scontrol show job``'s fields, or None if the controller does not know the job (any more)."""
    if shutil.which("scontrol") is None:
        return None
    result = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        return None
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


def describe_job(job_id: str) -> str:
    fields = job_fields(job_id)
    if fields is None:
        return "not known to the Slurm controller (ended long ago, or scontrol is not on PATH)"
    text = f"{fields.get('JobState', '?')}, {fields.get('Restarts', '0')} restart(s)"
    if fields.get("Reason", "None") != "None":
        text += f" (reason {fields['Reason']})"
    if fields.get("NodeList") not in (None, "", "(null)"):
        text += f", on {fields['NodeList']}"
    return text + f", run time {fields.get('RunTime', '?')} of {fields.get('TimeLimit', '?')}"


def last_step(run_dir: Path) -> tuple[int | None, float | None]:
    """The step and loss of the last training record of ``metrics.jsonl``."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None, None
    last = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.endswith("}"):  # a line cut short by a kill is skipped
            record = json.loads(line)
            if record.get("kind") == "train":
                last = record
    return (None, None) if last is None else (last["step"], last["loss"])


def last_checkpoint(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint of the run."""
    return max(complete_steps(run_dir / CHECKPOINTS), default=None)


def planned_steps(run_dir: Path) -> int | None:
    """``trainer.max_steps`` of the submitted (or else the recorded) config."""
    from omegaconf import OmegaConf

    for path in (run_dir / "slurm" / TRAIN_CONFIG, run_dir / CONFIG_FILE):
        if path.is_file():
            return int(OmegaConf.load(path).trainer.max_steps)
    return None
