"""The run folder's lock: who may take it, who is refused, and what each is told."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from hataori.checkpoint.lock import LOCK_FILE, RunFolderBusy, claim
from hataori.locks import EMPTY_STALE_S, holder, process_start


def write_lock(run_dir, **fields) -> dict:
    found = {**holder(), **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps(found))
    return found


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_is_named_and_the_folder_refused(tmp_path):
    lock = claim(tmp_path / "run")
    assert lock.owned and json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    other = write_lock(tmp_path / "other", host="node-17", pid=4242, slurm_job="991")
    with pytest.raises(RunFolderBusy) as busy:
        claim(tmp_path / "other")
    assert str(busy.value).startswith(f"{tmp_path / 'other'} is in use by PID 4242 on node-17 (Slurm job 991) since "
                                      f"{other['since']}")
    assert "scancel 991" in str(busy.value) and f"remove {tmp_path / 'other' / LOCK_FILE}" in str(busy.value)
    lock.release()
    assert not (tmp_path / "run").exists()  # the folder it created, empty again


@pytest.mark.parametrize("case", ["dead-pid", "reused-pid", "requeued-slurm-job", "empty-and-old"])
def test_a_lock_whose_holder_is_gone_is_taken_over(case, tmp_path, capsys, monkeypatch):
    if case == "dead-pid":
        write_lock(tmp_path, pid=dead_pid())
        reason = "which is no longer running"
    elif case == "reused-pid":  # our own PID, but a process that started at another time
        write_lock(tmp_path, start="1")
        reason = "which is no longer running"
    elif case == "requeued-slurm-job":  # the next attempt of the job, on another node
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
        write_lock(tmp_path, host="node-03", pid=12, slurm_job="77", slurm_restart=1)
        reason = "held by an earlier attempt of this Slurm job (77, restart 1, PID 12 on node-03)"
    else:  # a launch killed between creating the lock and writing it
        (tmp_path / LOCK_FILE).touch()
        os.utime(tmp_path / LOCK_FILE, (0, os.stat(tmp_path / LOCK_FILE).st_mtime - EMPTY_STALE_S - 5))
        reason = "empty for"
    lock = claim(tmp_path)
    assert lock.owned and reason in capsys.readouterr().err
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == lock.holder
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_ranks_inherit_their_launchers_lock_and_rank_0_releases_it(tmp_path):
    claim(tmp_path)
    child = "from hataori.checkpoint.lock import claim; lock = claim(r'%s'); print(lock.owned, lock.holder['pid'])"
    out = subprocess.run([sys.executable, "-c", child % tmp_path], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", str(os.getpid())]
    child += "; lock.release()"
    subprocess.run([sys.executable, "-c", child % tmp_path], check=True)
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_process_on_this_host_that_did_not_launch_us_keeps_its_lock(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=sleeper.pid, start=process_start(sleeper.pid))
        with pytest.raises(RunFolderBusy, match=f"in use by PID {sleeper.pid}"):
            claim(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("case", ["same-slurm-attempt", "fresh-empty"])
def test_a_lock_that_may_be_live_is_kept(case, tmp_path, monkeypatch):
    """Another step of the same Slurm job attempt (two srun in one allocation), or a lock being written."""
    if case == "same-slurm-attempt":
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        write_lock(tmp_path, host="node-03", pid=12, slurm_job="77", slurm_restart=0)
        expected = "in use by PID 12 on node-03 (Slurm job 77)"
    else:
        (tmp_path / LOCK_FILE).touch()
        expected = "exists but names no holder"
    with pytest.raises(RunFolderBusy, match=re.escape(expected)):
        claim(tmp_path)
