"""Filesystem helpers: everything hataori writes is written under a temporary name and renamed.

A reader therefore sees a file or folder complete, or not at all; a failure part-way leaves
nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from hataori.errors import HataoriError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
"""The ``errno`` values of a write that found no room: the disk is full, or the quota is spent."""


def temp_sibling(path: Path) -> Path:
    """A unique temporary name beside ``path``, in the same folder so the rename is atomic."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it to ``path``, on failure remove it.

    For a folder (``is_dir=True``) an existing ``path`` is replaced only once the new one is
    complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if is_dir and path.exists():
            old = temp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def disk_full(err: BaseException) -> str | None:
    """Why ``err`` is a write that found no room (the OS's words), or None. Libraries that write through
    their own code (safetensors, torch.save) raise their own errors, with the OS's words in the message."""
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        return err.strerror or os.strerror(err.errno)
    text = str(err)
    return next((os.strerror(code) for code in DISK_FULL if os.strerror(code) in text), None)


def disk_full_message(path: str | os.PathLike, why: str, option: str = "--output") -> str:
    return (f"{path}: the disk is full ({why}); nothing half-written was kept; free space, or choose another "
            f"output ({option}) on a disk with room")


@contextlib.contextmanager
def disk_full_error(path: str | os.PathLike, option: str = "--output") -> Iterator[None]:
    """Report a full disk (or an exhausted quota) while writing ``path`` as an error naming it."""
    try:
        yield
    except Exception as err:
        if (why := disk_full(err)) is None:
            raise
        raise HataoriError(disk_full_message(path, why, option)) from None


def remove_stale_temps(folder: Path) -> None:
    """Delete temporary files left in ``folder`` by a process that was killed mid-write."""
    for tmp in folder.glob(".*.tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable; a filesystem that cannot sync a folder is let be."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
