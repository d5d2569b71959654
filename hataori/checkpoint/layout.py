"""The names in a run folder, written once for every part of hataori that reads or writes them.
Nothing but the standard library stands behind them, so `hataori slurm status` and the commands'
--help read a run without loading torch.

    RUN/config.yaml                 the resolved config (CONFIG_FILE)
    RUN/provenance.json             where the initial weights came from (PROVENANCE_FILE)
    RUN/metrics.jsonl               one record per step, validation and eval task run (METRICS_FILE)
    RUN/eval/NAME-step_N.json       an eval task's full results at step N (EVAL_DIR)
    RUN/checkpoints/step_00000200   a complete checkpoint (CHECKPOINTS, tag(200); COMPLETE matches it)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CONFIG_FILE = "config.yaml"
PROVENANCE_FILE = "provenance.json"
METRICS_FILE = "metrics.jsonl"
EVAL_DIR = "eval"
CHECKPOINTS = "checkpoints"
COMPLETE = re.compile(r"^step_(\d{8})$")
"""The name of a complete checkpoint folder; its group is the step."""


def tag(step: int) -> str:
    """The folder name of the complete checkpoint after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def complete_steps(folder: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := COMPLETE.match(p.name)) and p.is_dir())
