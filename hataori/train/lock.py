"""One owner per run folder: the lock ``run.lock``, and ranks that die with the launcher that started them.

A launch takes ``<run_dir>/run.lock`` before it writes anything into the folder: a file created
exclusively (``O_CREAT | O_EXCL``) that names its holder (host, PID and the process's start time,
Slurm job id, time, command line). Who takes it:

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
import datetime
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hataori.errors import HataoriError

LOCK_FILE = "run.lock"
EMPTY_STALE_S = 60
"""An empty lock older than this was left by a launch killed as it took it (a live one writes it at once)."""
LAUNCHER_PID_VAR = "HATAORI_LAUNCHER_PID"
"""Set by ``hataori pretrain --nproc N`` for the ranks it launches: the PID whose death kills them."""
PR_SET_PDEATHSIG = 1


class RunFolderBusy(HataoriError):
    """Another live launch holds the run folder."""


@dataclass(slots=True)
class RunLock:
    """A held run-folder lock; ``owned``: this process created it (and removes it on release)."""

    path: Path
    holder: dict[str, Any]
    owned: bool
    recorded: bool = True
    """Whether the file names its holder (False: created on a full disk, still empty)."""
    created_folder: bool = False
    """Whether taking the lock created the run folder (removed again on release if nothing else was written)."""

    def record(self) -> None:
        """Write the holder into a lock created empty on a full disk, now that there may be room."""
        if self.owned and not self.recorded:
            self.recorded = _write(self.path, self.holder, os.O_WRONLY | os.O_TRUNC)

    def release(self) -> None:
        """Remove the lock if it is still this holder's."""
        found = _read(self.path)
        if found == self.holder or (found is None and self.owned and not self.recorded):
            self.path.unlink(missing_ok=True)
            if self.created_folder and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()


def claim(run_dir: str | os.PathLike) -> RunLock:
    """Take the lock of ``run_dir`` (created if missing), or raise :class:`RunFolderBusy`."""
    path = Path(run_dir) / LOCK_FILE
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    me = holder()
    for _ in range(10):  # a few rounds against a concurrent take-over
        try:
            recorded = _write(path, me, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            found = _read(path)
            if found is not None and _inherited(found, me):
                return RunLock(path, found, owned=False)
            reason = _stale(path, found, me)
            if reason is None:
                raise RunFolderBusy(busy_message(path, found))
            print(f"{path}: {reason}; taking the run folder over", file=sys.stderr, flush=True)
            _remove_if_unchanged(path, found)
            continue
        return RunLock(path, me, owned=True, recorded=recorded, created_folder=created)
    raise RunFolderBusy(busy_message(path, _read(path)))


def holder() -> dict[str, Any]:
    """What a lock taken by this process says about it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "since": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}


def busy_message(path: Path, found: dict[str, Any] | None) -> str:
    if found is None:
        return (f"{path.parent} is in use: {path} exists but names no holder (it was written on a full disk, or "
                f"is being written); if no run uses this folder, remove {path} and launch again")
    job = f" (Slurm job {found['slurm_job']})" if found.get("slurm_job") else ""
    stop = f"scancel {found['slurm_job']}" if found.get("slurm_job") else f"kill {found.get('pid')}"
    return (f"{path.parent} is in use by PID {found.get('pid')} on {found.get('host')}{job} since "
            f"{found.get('since')}: {found.get('command')}\nwait for that run to end or stop it ({stop}); if it is "
            f"gone (its machine crashed), remove {path} and launch again")


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, ...); [] if unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (tells a reused PID apart), or None."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return start is None or process_start(pid) in (start, None)


def _ancestors() -> set[int]:
    pids, pid = set(), os.getppid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        fields = _stat(pid)
        if len(fields) < 2:
            break
        pid = int(fields[1])
    return pids


def _inherited(found: dict[str, Any], me: dict[str, Any]) -> bool:
    """Whether ``found`` was taken by the launcher that started this process."""
    return (found.get("host") == me["host"] and found.get("pid") in _ancestors()
            and process_start(found["pid"]) == found.get("start"))


def _stale(path: Path, found: dict[str, Any] | None, me: dict[str, Any]) -> str | None:
    """Why the lock ``found`` can be taken over, or None if its holder may still run."""
    if found is None:  # empty: a launch killed between creating the file and writing it
        try:
            age = datetime.datetime.now().timestamp() - path.stat().st_mtime
        except FileNotFoundError:
            return "gone"
        return f"empty for {age:.0f} s (its launch was killed as it took it)" if age > EMPTY_STALE_S else None
    if (found.get("slurm_job") and found["slurm_job"] == me["slurm_job"]
            and int(found.get("slurm_restart") or 0) < me["slurm_restart"]):
        return (f"held by an earlier attempt of this Slurm job ({found['slurm_job']}, restart "
                f"{found.get('slurm_restart') or 0}, PID {found.get('pid')} on {found.get('host')})")
    if found.get("host") == me["host"] and not _alive(int(found.get("pid", 0)), found.get("start")):
        return f"held by PID {found.get('pid')} on this host, which is no longer running"
    return None


def _write(path: Path, found: dict[str, Any], flags: int) -> bool:
    """Open ``path`` with ``flags`` and write ``found`` into it; False if the disk is full (the file
    then exists, empty, and still holds the folder: see :func:`busy_message`)."""
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, (json.dumps(found) + "\n").encode())
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _remove_if_unchanged(path: Path, found: dict[str, Any]) -> None:
    """Remove a stale lock, unless another launch replaced it meanwhile (renaming first makes one winner)."""
    doomed = path.with_name(f".{LOCK_FILE}.stale-{os.getpid()}")
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    if _read(doomed) != found:  # not the one judged stale: put it back, unless yet another launch took the name
        try:
            os.link(doomed, path)
        except FileExistsError:
            pass
    doomed.unlink(missing_ok=True)


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
