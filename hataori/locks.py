"""One writer at a time: a lock file that names its holder, taken over only when the holder is gone.

A lock is a file created exclusively (``O_CREAT | O_EXCL``) that names its holder (host, PID and the
process's start time, Slurm job id, time, command line). A second taker finds it and is refused with
who holds it. A lock whose holder is gone is taken over, with a message: on the same host when that
PID no longer runs (or runs another program, told apart by its start time), or when it names an
earlier attempt of the taker's own Slurm job (a requeued job restarts under the same id with a higher
``SLURM_RESTART_COUNT``, possibly on another node), or when it is empty and older than
:data:`EMPTY_STALE_S` (its taker was killed as it took it). A lock held on another host by another
job is never taken over: only the user can know that it is stale. A process started by the holder
(a launcher's ranks, a command's workers) shares the holder's lock.

Run folders (:mod:`hataori.checkpoint.lock`, ``run.lock``) and every command's outputs
(:mod:`hataori.outputs`) are held so.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hataori.errors import HataoriError

EMPTY_STALE_S = 60
"""An empty lock older than this was left by a taker killed as it took it (a live one writes it at once)."""


@dataclass(slots=True)
class Lock:
    """A held lock; ``owned``: this process created it (and removes it on release)."""

    path: Path
    holder: dict[str, Any]
    owned: bool
    recorded: bool = True
    """Whether the file names its holder (False: created on a full disk, still empty)."""
    created_folder: bool = False
    """Whether taking the lock created its folder (removed again on release if nothing else was written)."""

    def record(self) -> None:
        """Write the holder into a lock created empty on a full disk, now that there may be room."""
        if self.owned and not self.recorded:
            self.recorded = _write(self.path, self.holder, os.O_WRONLY | os.O_TRUNC)

    def release(self) -> None:
        """Remove the lock if it is still this holder's."""
        found = read_holder(self.path)
        if found == self.holder or (found is None and self.owned and not self.recorded):
            self.path.unlink(missing_ok=True)
            if self.created_folder and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()


def claim(path: str | os.PathLike, busy: Callable[[Path, dict[str, Any] | None], HataoriError], *,
          what: str = "it") -> Lock:
    """Take the lock file ``path`` (its folder created if missing), or raise ``busy(path, holder)``; a stale
    lock is taken over with a message ending ``taking WHAT over``."""
    path = Path(path)
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    me = holder()
    for _ in range(10):  # a few rounds against a concurrent take-over
        try:
            recorded = _write(path, me, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            found = read_holder(path)
            if found is not None and _inherited(found, me):
                return Lock(path, found, owned=False)
            reason = _stale(path, found, me)
            if reason is None:
                raise busy(path, found) from None
            print(f"{path}: {reason}; taking {what} over", file=sys.stderr, flush=True)
            _remove_if_unchanged(path, found)
            continue
        return Lock(path, me, owned=True, recorded=recorded, created_folder=created)
    raise busy(path, read_holder(path))


def holder() -> dict[str, Any]:
    """What a lock taken by this process says about it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "since": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}


def describe(found: dict[str, Any]) -> tuple[str, str]:
    """(``PID 12 on node-3 (Slurm job 9) since T: COMMAND``, how to stop it) of a lock's holder."""
    job = f" (Slurm job {found['slurm_job']})" if found.get("slurm_job") else ""
    stop = f"scancel {found['slurm_job']}" if found.get("slurm_job") else f"kill {found.get('pid')}"
    return (f"PID {found.get('pid')} on {found.get('host')}{job} since {found.get('since')}: "
            f"{found.get('command')}"), stop


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


def alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` runs on this host (and, given its start time, is still that process)."""
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
    """Whether ``found`` was taken by a process that started this one."""
    return (found.get("host") == me["host"] and found.get("pid") in _ancestors()
            and process_start(found["pid"]) == found.get("start"))


def _stale(path: Path, found: dict[str, Any] | None, me: dict[str, Any]) -> str | None:
    """Why the lock ``found`` can be taken over, or None if its holder may still run."""
    if found is None:  # empty: a taker killed between creating the file and writing it
        try:
            age = datetime.datetime.now().timestamp() - path.stat().st_mtime
        except FileNotFoundError:
            return "gone"
        return f"empty for {age:.0f} s (whoever took it was killed as it did)" if age > EMPTY_STALE_S else None
    if (found.get("slurm_job") and found["slurm_job"] == me["slurm_job"]
            and int(found.get("slurm_restart") or 0) < me["slurm_restart"]):
        return (f"held by an earlier attempt of this Slurm job ({found['slurm_job']}, restart "
                f"{found.get('slurm_restart') or 0}, PID {found.get('pid')} on {found.get('host')})")
    if found.get("host") == me["host"] and not alive(int(found.get("pid", 0)), found.get("start")):
        return f"held by PID {found.get('pid')} on this host, which is no longer running"
    return None


def _write(path: Path, found: dict[str, Any], flags: int) -> bool:
    """Open ``path`` with ``flags`` and write ``found`` into it; False if the disk is full (the file
    then exists, empty, and still holds the lock)."""
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, (json.dumps(found) + "\n").encode())
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder a lock file names, or None (missing, empty or unreadable)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _remove_if_unchanged(path: Path, found: dict[str, Any]) -> None:
    """Remove a stale lock, unless another taker replaced it meanwhile (renaming first makes one winner)."""
    doomed = path.with_name(f".{path.name}.stale-{os.getpid()}")
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    if read_holder(doomed) != found:  # not the one judged stale: put it back, unless yet another took the name
        try:
            os.link(doomed, path)
        except FileExistsError:
            pass
    doomed.unlink(missing_ok=True)
