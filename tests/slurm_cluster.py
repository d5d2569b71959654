"""A real Slurm cluster on this machine for tests: munged, slurmctld and two fake slurmd nodes.

Debian's ``slurm-wlm`` and ``munge`` run without systemd: :class:`SlurmCluster` starts a private
munged (as the munge user, on its own socket), a slurmctld and one ``slurmd -N NAME`` per fake
node, each node with its own port and ``NodeAddr=127.0.0.1``. Configuration, state, spool, logs,
pid files and the munge socket all live in one temporary folder, and every command of the cluster
(``sbatch``, ``scontrol``, the daemons) finds the config through ``SLURM_CONF``.

Chosen for tests: ``AuthInfo=cred_expire=10`` (a requeued job may start again after 11 s instead
of 121 s), ``KillWait=10`` (seconds between SIGTERM and SIGKILL at a job's end)
and completed jobs kept for ``scontrol show job`` for 10 minutes.

Nothing is installed here. Where the binaries are missing, :func:`missing_binaries` names them so
the fixture can skip; ``scripts/test.sh`` installs them on CI.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import closing
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "scontrol", "scancel")
NODES = ("node1", "node2")
CPUS_PER_NODE = 2
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60


def missing_binaries() -> list[str]:
    """The cluster's programs (and the munge user) that this machine lacks."""
    paths = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [name for name in BINARIES if shutil.which(name, path=paths) is None]
    try:
        pwd.getpwnam("munge")
    except KeyError:
        missing.append("user munge")
    return missing


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop` (idempotent, also after a failed start)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="hataori-slurm-"))
        # munged runs as the munge user: everything on its way must be reachable by it.
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
        self._daemons: list[subprocess.Popen] = []
        self._munged_pid: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "SlurmCluster":
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        self._start_munged()
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        self.conf.write_text(self._config(ctld_port, node_ports))
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") >= 1,
                   "slurmctld to answer ping")
        for name in NODES:
            (self.root / "spool" / name).mkdir(exist_ok=True)
            self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
        self._wait(self._nodes_idle, f"nodes {', '.join(NODES)} to be idle")
        return self

    def stop(self) -> None:
        """Cancel every job, shut the daemons down, kill what is left and stop munged."""
        if self.conf.exists() and any(p.poll() is None for p in self._daemons):
            self.run(["scancel", "--full", "--user", "root"], check=False)
            self._wait(lambda: not self.job_processes(), "job processes to end", timeout=30, fail=False)
            self.run(["scontrol", "shutdown"], check=False)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self._daemons:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self.job_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._daemons.clear()
        self._stop_munged()

    def remove(self) -> None:
        """Delete the cluster's folder (after :meth:`stop`)."""
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ commands

    def run(self, command: list[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm command against this cluster."""
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the controller has forgotten the job)."""
        result = self.run(["scontrol", "show", "job", "--oneliner", str(job_id)], check=False)
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def wait_job(self, job_id: int | str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        """Wait until the job is in one of ``states``; raise with the controller log's tail otherwise."""
        info: dict[str, str] = {}

        def reached() -> bool:
            nonlocal info
            info = self.job(job_id)
            return info.get("JobState") in states

        self._wait(reached, f"job {job_id} to reach {'/'.join(states)}", timeout=timeout)
        return info

    def log_tail(self, name: str = "slurmctld.log", lines: int = 30) -> str:
        path = self.logs / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # ------------------------------------------------------------------ internals

    def _config(self, ctld_port: int, node_ports: list[int]) -> str:
        r = self.root
        nodes = "\n".join(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} Port={port} "
                          f"CPUs={CPUS_PER_NODE} State=UNKNOWN" for name, port in zip(NODES, node_ports))
        return f"""\
ClusterName=hataori-test
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={self.logs}/slurmctld.log
SlurmdLogFile={self.logs}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
MinJobAge=600
InactiveLimit=0
MailProg=/bin/true
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""

    def _start_munged(self) -> None:
        user = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(self.munge_dir, user.pw_uid, user.pw_gid)
        d = self.munge_dir
        subprocess.run(["runuser", "-u", "munge", "--", shutil.which("munged", path=self.env["PATH"]),
                        f"--socket={self.munge_socket}", f"--pid-file={d}/munged.pid",
                        f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
                       check=True, capture_output=True, text=True, timeout=30, env=os.environ)
        self._munged_pid = int((d / "munged.pid").read_text())
        self._wait(self.munge_socket.exists, "munged's socket")

    def _stop_munged(self) -> None:
        if self._munged_pid is None:
            return
        try:
            os.kill(self._munged_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self._wait(lambda: not Path(f"/proc/{self._munged_pid}").exists(), "munged to exit", timeout=10,
                   fail=False)
        self._munged_pid = None

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.logs / f"{name}.stdout", "w")
        with closing(log):
            self._daemons.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True))

    def _nodes_idle(self) -> bool:
        result = self.run(["scontrol", "show", "node", "--oneliner"], check=False)
        states = re.findall(r"State=(\S+)", result.stdout)
        return len(states) == len(NODES) and all(s.split("+")[0] == "IDLE" for s in states)

    def job_processes(self) -> list[int]:
        """Processes of this cluster's jobs (batch shells and tasks): their environment names this
        cluster's config and a job id. The daemons' own helpers (slurmscriptd) carry no job id."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ and any(item.startswith(b"SLURM_JOB_ID=") for item in environ):
                pids.append(int(entry.name))
        return pids

    def _wait(self, condition, what: str, *, timeout: float = START_TIMEOUT_S, fail: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self._daemons:
                if proc.poll() is not None and fail:
                    raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) while waiting for {what}:\n"
                                       + self.log_tail() + "\n" + self._daemon_output())
            if condition():
                return True
            time.sleep(0.2)
        if fail:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}:\n{self.log_tail()}\n"
                               + self._daemon_output())
        return False

    def _daemon_output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in self.logs.glob("*.stdout"))
