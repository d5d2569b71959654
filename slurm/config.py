"""The typed config of a Slurm job: shape, time limit, accounting and requeue policy."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hataori.config import require



def time_limit_seconds(text: str) -> int:
    """Seconds of a Slurm time limit: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    days, _, clock = text.rpartition("-")
    if days and not days.isdigit():
        raise ValueError(text)
    parts = clock.split(":")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise ValueError(text)
    numbers = [int(p) for p in parts]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, m, s = (numbers + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + m * 60 + s
    if len(numbers) == 1:  # minutes
        return numbers[0] * 60
    if len(numbers) == 2:  # MM:SS
        return numbers[0] * 60 + numbers[1]
    return numbers[0] * 3600 + numbers[1] * 60 + numbers[2]


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
    """Time limit of one attempt, in Slurm's syntax: MM, HH:MM:SS or D-HH:MM:SS."""
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
        require(self.cpus_per_task >= 0, "cpus_per_task", f"must be >= 0 (0: Slurm's default), got {self.cpus_per_task}")
        require(self.max_requeues >= 0, "max_requeues", f"must be >= 0, got {self.max_requeues}")
        try:
            limit = time_limit_seconds(self.time)
        except ValueError:
            limit = 0
        require(limit > 0, "time", f"{self.time!r} is not a Slurm time limit; write MM, HH:MM:SS or D-HH:MM:SS")
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
