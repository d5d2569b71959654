"""The typed config of a Slurm job: shape, time limit, accounting and requeue policy."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hataori.config import require
from hataori.errors import ConfigError

TIME_FORMATS = ("minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes or "
                "days-hours:minutes:seconds (e.g. 90, 24:00:00, 2-00:00:00)")
FINITE = "the batch script times its own stop signal from the limit, so it needs a finite one"
_SECONDS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
_BELOW = {"hours": 24, "minutes": 60, "seconds": 60}
"""Bounds of a field after the leading one: hours after a day count, minutes and seconds after a larger unit."""


def time_limit_seconds(text: str) -> int:
    """Seconds of a Slurm time limit in any of sbatch's ``--time`` formats (:data:`TIME_FORMATS`).

    The leading field is unbounded; the others are bounded as on a clock. Raises a :class:`ConfigError`
    on ``time`` for anything else, and for zero and ``UNLIMITED``: Slurm reads them as no limit."""

    def refuse(reason: str) -> ConfigError:
        return ConfigError("time", f"{text!r} {reason}; write {TIME_FORMATS}")

    if text.strip().upper() in ("UNLIMITED", "INFINITE", "-1"):
        raise refuse(f"is no limit, but {FINITE}")
    if text.startswith("-"):
        raise refuse("is not a Slurm time limit: it is negative")
    days, dash, clock = text.rpartition("-")
    fields = clock.split(":")
    if len(fields) > 3:
        raise refuse("is not a Slurm time limit: it has more than three colon-separated fields")
    names = (("days", "hours", "minutes", "seconds")[:len(fields) + 1] if dash else
             {1: ("minutes",), 2: ("minutes", "seconds"), 3: ("hours", "minutes", "seconds")}[len(fields)])
    seconds = 0
    for i, (name, value) in enumerate(zip(names, [days, *fields] if dash else fields)):
        if not (value.isascii() and value.isdigit()):
            raise refuse(f"is not a Slurm time limit: its {name} field is "
                         + (f"{value!r}, not a whole number" if value else "empty"))
        if i and int(value) >= _BELOW[name]:
            raise refuse(f"is not a Slurm time limit: {name} after {names[i - 1]} must be below {_BELOW[name]}, "
                         f"got {value}")
        seconds += int(value) * _SECONDS[name]
    if not seconds:
        raise refuse(f"is zero, which Slurm reads as no limit, but {FINITE}")
    return seconds


def time_limit_text(seconds: int) -> str:
    """``seconds`` as Slurm's D-HH:MM:SS."""
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    d, h = divmod(hours, 24)
    return f"{d}-{h:02d}:{m:02d}:{s:02d}"


# Slurm 22.05 sends a requeued job its warning signal as it starts; the batch script ignores a
# warning that comes more than 30 s (Slurm's check period) before it is due, so a real warning must
# be due later than that into an attempt.
MIN_WARNING_AFTER_S = 45


@dataclass(kw_only=True, slots=True)
class SlurmConfig:
    """One batch job of ``hataori pretrain`` over ``nodes`` nodes with ``gpus_per_node`` processes each."""

    nodes: int = 1
    """Nodes of the job."""
    gpus_per_node: int = 8
    """GPUs per node, one training process each; with cpus_only, CPU training processes per node."""
    cpus_only: bool = False
    """Train on CPUs (gloo, no GPU request) instead of GPUs (NCCL)."""
    cpus_per_task: int = 0
    """CPU cores per training process (also its OMP_NUM_THREADS); 0: Slurm's default and 1 thread."""
    time: str
    """Time limit of one attempt in any of sbatch's --time formats (:data:`TIME_FORMATS`); kept as D-HH:MM:SS.
    Slurm rounds seconds up to a whole minute, so the script's stop signal comes at most a minute early."""
    signal_seconds: int = 300
    """SIGUSR1 reaches the job this many seconds before the time limit; enough for one step and a checkpoint."""
    max_requeues: int = 3
    """Times the job requeues itself after a stop signal before the run is done; 0: never."""
    partition: str = ""
    """Partition (sbatch --partition); empty: the cluster's default."""
    account: str = ""
    """Account to charge (sbatch --account); empty: the user's default."""
    qos: str = ""
    """Quality of service (sbatch --qos); empty: the default."""
    job_name: str = ""
    """Job name; empty: ``hataori-<run folder name>``."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More sbatch options, one per #SBATCH line, e.g. ``--exclusive`` or ``--constraint=h100``."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the training step (``module load ...``, environment variables)."""

    def __post_init__(self) -> None:
        require(self.nodes >= 1, "nodes", f"must be >= 1, got {self.nodes}")
        require(self.gpus_per_node >= 1, "gpus_per_node", f"must be >= 1, got {self.gpus_per_node}")
        require(self.cpus_per_task >= 0, "cpus_per_task",
                f"must be >= 0 (0: Slurm's default), got {self.cpus_per_task}")
        require(self.max_requeues >= 0, "max_requeues", f"must be >= 0, got {self.max_requeues}")
        limit = time_limit_seconds(self.time)
        self.time = time_limit_text(limit)  # the #SBATCH line and the script's timer read this one parse
        require(0 < self.signal_seconds <= limit - MIN_WARNING_AFTER_S, "signal_seconds",
                f"must lie between 0 and {limit - MIN_WARNING_AFTER_S} s for a time limit of {limit} s, got "
                f"{self.signal_seconds}: the warning must come at least {MIN_WARNING_AFTER_S} s into an attempt, "
                "so the batch script can tell it from the one Slurm 22.05 sends a requeued job as it starts")
        for key in ("partition", "account", "qos", "job_name"):
            value = getattr(self, key)
            require(not re.search(r"\s", value), key, f"must not contain whitespace, got {value!r}")
        for option in self.extra_sbatch:
            require(option.startswith("-") and "\n" not in option, "extra_sbatch",
                    f"each item is one sbatch option such as --exclusive, got {option!r}")

    @property
    def world_size(self) -> int:
        """Training processes over all nodes."""
        return self.nodes * self.gpus_per_node

    @property
    def time_seconds(self) -> int:
        return time_limit_seconds(self.time)
