"""One owner per run folder: the lock ``run.lock``, and ranks that die with the launcher that started them.

A launch takes ``<run_dir>/run.lock`` (a :mod:`hataori.locks` lock) before it writes anything into the
folder: a file created exclusively (``O_CREAT | O_EXCL``) that names its holder (host, PID and the
process's start time, Slurm job id, time, command line). Who takes it:

* ``hataori pretrain --nproc N``: the command, before it checks the config and replaces itself with
  torch's launcher (same PID), so the launcher holds it and its ranks inherit it;
* a single process, or rank 0 of ranks started by ``torchrun`` or ``srun`` directly.

A second launch into the folder finds the lock and is refused with who holds it. A lock whose holder
is gone is taken over, with a message: on the same host when that PID no longer runs (or runs
another program, told apart by its start time), or when it names an earlier attempt of this
launch's own Slurm job (a requeued job restarts under the same id with a higher
``SLURM_RESTART_COUNT``, possibly on another node). A lock held on another host by another job, or
by another step of the same attempt, is never taken over: only the user can know that it is stale. Released when the run
ends (by rank 0 for an inherited lock), and also left behind by ``kill -9``, which the next launch
then takes over.

Ranks that ``hataori pretrain --nproc N`` starts ask the kernel to SIGKILL them when the launcher
dies (``PR_SET_PDEATHSIG``), so a killed launcher leaves no rank training on its own.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Any

from hataori.errors import HataoriError
from hataori.locks import Lock, describe
from hataori.locks import claim as claim_lock

LOCK_FILE = "run.lock"
LAUNCHER_PID_VAR = "HATAORI_LAUNCHER_PID"
"""Set by ``hataori pretrain --nproc N`` for the ranks it launches: the PID whose death kills them."""
PR_SET_PDEATHSIG = 1


class RunFolderBusy(HataoriError):
    """Another live launch holds the run folder."""


def claim(run_dir: str | os.PathLike) -> Lock:
    """Take the lock of ``run_dir`` (created if missing), or raise :class:`RunFolderBusy`."""
    return claim_lock(Path(run_dir) / LOCK_FILE, lambda path, found: RunFolderBusy(busy_message(path, found)),
                      what="the run folder")


def busy_message(path: Path, found: dict[str, Any] | None) -> str:
    if found is None:
        return (f"{path.parent} is in use: {path} exists but names no holder (it was written on a full disk, or "
                f"is being written); if no run uses this folder, remove {path} and launch again")
    who, stop = describe(found)
    return (f"{path.parent} is in use by {who}\nwait for that run to end or stop it ({stop}); if it is "
            f"gone (its machine crashed), remove {path} and launch again")


# ----------------------------------------------------------------------------- ranks of a launcher


def die_with_launcher() -> None:
    """In a rank started by ``hataori pretrain --nproc N``: be SIGKILLed when the launcher dies."""
    launcher = os.environ.get(LAUNCHER_PID_VAR)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The launcher's agent is this rank's parent; if it died before prctl, die now.
    if str(os.getppid()) != launcher:
        os.kill(os.getpid(), signal.SIGKILL)
