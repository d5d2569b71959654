"""Launching a test script on N processes of one CPU process group, with a hard time limit.

Nothing may be JIT-compiled (DeepSpeed's shm op, its Adams): the processes get an empty
``TORCH_EXTENSIONS_DIR`` that must stay absent.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import cpu_env


def launch_ranks(script: str, args: list[str], log_dir: Path, nproc: int, timeout: float) -> list[int]:
    """Run ``script args`` as ranks 0..nproc-1 (logs in ``log_dir/rankN.log``); their exit codes."""
    from hataori.train.zero import free_port

    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    extensions = log_dir / "torch_extensions"
    procs, logs = [], []
    for rank in range(nproc):
        env = {**cpu_env(extensions), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        logs.append(open(log_dir / f"rank{rank}.log", "w"))
        procs.append(subprocess.Popen([sys.executable, script, *args], env=env, stdout=logs[-1],
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"launch {args} did not finish in {timeout} s; logs in {log_dir}:\n{log_tails(log_dir)}")
    finally:
        for proc in procs:
            proc.wait()
        for log in logs:
            log.close()
    assert not extensions.exists(), f"a C++ extension was compiled into {extensions}"
    return [proc.returncode for proc in procs]


def log_tails(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-25:])
                     for p in sorted(log_dir.glob("rank*.log")))
