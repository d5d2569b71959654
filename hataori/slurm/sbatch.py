"""The batch script of a pretraining job, rendered from :class:`SlurmConfig` without a template engine.

:data:`TEMPLATE` holds ``{{name}}`` fields; :func:`render` fills every one of them (and refuses a
field it does not know or leaves unfilled). One template serves one node with 8 GPUs and N nodes
with G GPUs or CPU processes each: only the resource lines and the device environment differ.

What the script does, in order:

1. ``#SBATCH`` lines: one task per GPU (``--ntasks-per-node``), ``--signal=B:USR1@S`` (SIGUSR1 to
   the batch shell S seconds before the time limit), ``--requeue``, ``--open-mode=append`` (every
   attempt appends to the same log).
2. The rendezvous: ``MASTER_ADDR`` is the first node's ``NodeAddr`` from ``scontrol show node`` (a
   node's name need not resolve on the others), ``MASTER_PORT`` is derived from the job id and the
   attempt (``SLURM_RESTART_COUNT``), so a restart never meets a lingering store of the last one.
   Each process takes its rank from ``SLURM_PROCID``, ``SLURM_LOCALID`` and ``SLURM_NTASKS``.
3. ``srun`` starts the training processes in the background, so that the shell's traps run while
   they train: on SIGUSR1 or SIGTERM the shell forwards SIGUSR1 to ``srun``, which signals every task.
   A timer of the shell raises the SIGUSR1 itself when the warning is due, since Slurm's own comes
   late (its periodic check) or, for a requeued job in Slurm 22.05, at once; such an early one is ignored.
4. When ``srun`` has returned: a finished run (``hataori slurm status --finished``) ends the job.
   A run that stopped before its last step is requeued with ``scontrol requeue`` if the shell got
   a stop signal or the processes exited cleanly (a stop request, ``trainer.launch_steps``), and the
   job has requeues left and is still RUNNING: after scancel, at the time limit and on preemption
   Slurm is already ending the job (COMPLETING), and a requeue would revive a cancelled job. (With
   ``PreemptMode=REQUEUE`` Slurm requeues a preempted job itself.) A crash without a signal is not
   requeued: it would crash again.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from hataori.slurm.config import SlurmConfig

TEMPLATE = """\
#!/bin/bash
# hataori pretraining: {{shape}}.
# Written by `hataori slurm submit`; this file is what the job runs.
#SBATCH --job-name={{job_name}}
#SBATCH --nodes={{nodes}}
#SBATCH --ntasks-per-node={{tasks_per_node}}
{{resources}}#SBATCH --time={{time}}
#SBATCH --signal=B:USR1@{{signal_seconds}}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={{log}}
#SBATCH --chdir={{workdir}}
{{options}}
set -uo pipefail
RUN_DIR={{run_dir}}
PYTHON={{python}}
MAX_REQUEUES={{max_requeues}}
ATTEMPT=${SLURM_RESTART_COUNT:-0}
say() { echo "[$(date '+%F %T')] slurm job $SLURM_JOB_ID: $*"; }
say "attempt $ATTEMPT on $SLURM_JOB_NODELIST ($SLURM_NTASKS processes)"

# Rendezvous on the first node, by the address Slurm reaches it at: node names need not resolve.
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$first_node" | grep -o 'NodeAddr=[^ ]*' | head -n 1 | cut -d= -f2)
export MASTER_ADDR
# From the job id and the attempt: jobs sharing a node, and a restart, each get their own port.
export MASTER_PORT=$((20000 + (SLURM_JOB_ID % 4000) * 10 + ATTEMPT % 10))
# Each task's rank comes from Slurm (SLURM_PROCID); torchrun's variables, inherited from the
# submitting shell, would take precedence and make every task rank 0 of its own group.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
{{device_env}}{{setup}}
# Stop signals. SIGUSR1 {{signal_seconds}} s before the time limit, SIGTERM on preemption or scancel: either
# way every training process (through srun) checkpoints after its current step and exits.
# Slurm checks for the warning signal only periodically, so it can come half a minute late; and
# Slurm 22.05 sends it at once when it starts a requeued job. So a timer of this shell sends the
# warning on time, and a SIGUSR1 that comes earlier than the warning is due (by more than Slurm's
# 30 s check period) is logged and ignored.
TIME_LIMIT_S={{time_limit_s}}
STOP_BEFORE_S={{signal_seconds}}
stop_signal=""
srun_pid=""
forward() {
  if [ -n "$stop_signal" ]; then say "got SIG$1 (already stopping)"; return; fi
  stop_signal=$1
  say "got SIG$1; the training processes checkpoint after this step and stop"
  if [ -n "$srun_pid" ]; then kill -USR1 "$srun_pid" 2>/dev/null; fi
}
on_usr1() {
  local left=$((TIME_LIMIT_S - SECONDS))
  if [ "$left" -gt $((STOP_BEFORE_S + 30)) ]; then
    say "ignoring a SIGUSR1 ${left} s before the time limit (the warning is due ${STOP_BEFORE_S} s before it)"
    return
  fi
  forward USR1
}
trap on_usr1 USR1
trap 'forward TERM' TERM
# The timer: its sleep is killed with it, so that nothing of the job outlives the job.
( trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
  sleep $((TIME_LIMIT_S - STOP_BEFORE_S - SECONDS)) & sleep_pid=$!
  wait "$sleep_pid" && kill -USR1 $$ ) &
timer_pid=$!

srun --kill-on-bad-exit=1 {{srun_options}}"$PYTHON" -m hataori.cli pretrain {{train_args}} &
srun_pid=$!
# `wait` returns early when a trapped signal arrives; wait again until srun itself has ended.
while true; do
  wait "$srun_pid"
  status=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
kill "$timer_pid" 2>/dev/null
say "training processes exited with status $status"

if "$PYTHON" -m hataori.cli slurm status "$RUN_DIR" --finished; then
  say "the run is complete"
  exit 0
fi
state=$(scontrol show job "$SLURM_JOB_ID" | grep -o 'JobState=[^ ]*' | cut -d= -f2)
if [ "$state" != RUNNING ]; then
  # COMPLETING: scancel, the time limit or preemption is ending the job; requeueing would revive it.
  say "the job is ending ($state); not requeued (a new job resumes from the latest complete checkpoint)"
  exit "$status"
fi
if [ -z "$stop_signal" ] && [ "$status" -ne 0 ]; then
  say "training failed without a stop signal; not requeued"
  exit "$status"
fi
if [ "$ATTEMPT" -ge "$MAX_REQUEUES" ]; then
  say "stopped before the last step, and all $MAX_REQUEUES requeues are used; resubmit to continue"
  exit 3
fi
say "stopped before the last step; requeueing (requeue $((ATTEMPT + 1)) of $MAX_REQUEUES)"
scontrol requeue "$SLURM_JOB_ID"
"""

GPU_ENV = """\
# NCCL across nodes. Set what the fabric needs (print what NCCL picks with NCCL_DEBUG=INFO):
#   NCCL_SOCKET_IFNAME=ib0 (or eth0, ^lo,docker)  interface for NCCL's bootstrap and socket traffic
#   NCCL_IB_HCA=mlx5_0,mlx5_1                      which InfiniBand adapters to use
#   NCCL_IB_GID_INDEX=3                            RoCE v2 on most Ethernet fabrics
#   NCCL_IB_DISABLE=1                              no InfiniBand/RoCE: TCP sockets only
# A rank stuck in a collective (a dead peer) raises after the process group's timeout instead of
# hanging: TORCH_NCCL_ASYNC_ERROR_HANDLING (torch >= 2.2), NCCL_ASYNC_ERROR_HANDLING (older torch).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS={{threads}}
"""

CPU_ENV = """\
# CPU nodes: gloo carries the collectives (GLOO_SOCKET_IFNAME picks its interface, like NCCL's).
export DS_ACCELERATOR=cpu
export OMP_NUM_THREADS={{threads}}
"""

_FIELD = re.compile(r"\{\{(\w+)\}\}")


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every ``{{name}}`` of ``template`` by ``values[name]``; every field must be given and used."""
    unknown = set(values) - set(_FIELD.findall(template))
    if unknown:
        raise KeyError(f"values for fields the template lacks: {sorted(unknown)}")

    def value(match: re.Match) -> str:
        if match.group(1) not in values:
            raise KeyError(f"no value for template field {match.group(1)!r}")
        return values[match.group(1)]

    return _FIELD.sub(value, template)


def render(cfg: SlurmConfig, *, run_dir: str | Path, train_args: list[str], python: str,
           workdir: str | Path) -> str:
    """The batch script of ``hataori pretrain TRAIN_ARGS`` for the run in ``run_dir``."""
    run_dir = Path(run_dir).absolute()
    threads = str(cfg.cpus_per_task or 1)
    unit = "CPU processes" if cfg.cpus_only else "GPUs"
    resources = "" if cfg.cpus_only else f"#SBATCH --gpus-per-node={cfg.gpus_per_node}\n"
    if cfg.cpus_per_task:
        resources += f"#SBATCH --cpus-per-task={cfg.cpus_per_task}\n"
    options = [f"--{key}={getattr(cfg, key)}" for key in ("partition", "account", "qos") if getattr(cfg, key)]
    options += cfg.extra_sbatch
    srun_options = f"--cpus-per-task={cfg.cpus_per_task} " if cfg.cpus_per_task else ""
    device_env = fill(CPU_ENV if cfg.cpus_only else GPU_ENV, {"threads": threads})
    setup = "".join(f"{line}\n" for line in cfg.setup)
    return fill(TEMPLATE, {
        "shape": f"{cfg.nodes} node(s) x {cfg.gpus_per_node} {unit}, one training process each",
        "job_name": cfg.job_name or f"hataori-{run_dir.name}",
        "nodes": str(cfg.nodes),
        "tasks_per_node": str(cfg.gpus_per_node),
        "resources": resources,
        "time": cfg.time,
        "signal_seconds": str(cfg.signal_seconds),
        "time_limit_s": str(cfg.time_seconds),
        "log": str(run_dir / "slurm" / "job-%j.out"),
        "workdir": str(Path(workdir).absolute()),
        "options": "".join(f"#SBATCH {option}\n" for option in options),
        "run_dir": shlex.quote(str(run_dir)),
        "python": shlex.quote(python),
        "max_requeues": str(cfg.max_requeues),
        "device_env": device_env,
        "setup": setup,
        "srun_options": srun_options,
        "train_args": " ".join(shlex.quote(arg) for arg in train_args),
    })
