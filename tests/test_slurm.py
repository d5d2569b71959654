"""``hataori slurm``: batch scripts, and pretraining jobs on a real two-node Slurm cluster.

The cluster (``slurm_cluster`` fixture, tests/slurm_cluster.py) is Debian's Slurm with two fake
nodes of 2 CPUs on this machine. Jobs go through
``hataori slurm submit --cluster configs/slurm/test-cluster.yaml`` and train a
~0.4M-parameter model in fp32 with 2 processes on each node (gloo, real DeepSpeed engines). The
reference of the requeued and the cancelled runs is an independent, uninterrupted job of the same
config: their loss curves must equal it exactly. Every job and wait has a hard time limit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "train" / "toy.yaml"
TEST_CLUSTER = REPO / "configs" / "slurm" / "test-cluster.yaml"
"""The cluster profile of the test cluster: 2 nodes x 2 CPU processes, a setup line that echoes its name."""
SEQ_LEN = 64
STEPS = 500
WORLD = 4  # 2 nodes x 2 processes
ENDED = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "DEADLINE")

# The toy preset shrunk: 4 processes x 8 sequences of 64 tokens a step, no accumulation, about 0.12 s a
# step here; validation only before the first and after the last step.
TINY = ["model.vocab_size=4000", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        f"model.max_seq_len={SEQ_LEN}", f"data.seq_len={SEQ_LEN}", "zero.micro_batch_size=8",
        f"zero.global_batch_tokens={8 * WORLD * SEQ_LEN}", "schedule.warmup_steps=10", "schedule.min_lr=1e-4",
        f"trainer.max_steps={STEPS}", "checkpoint.every_steps=100", "checkpoint.keep_last=2",
        "validation.every_steps=0", "validation.max_tokens=2000", "logging.every_steps=50"]


def submit(cluster, run_dir: Path, shards: Path, *options: str) -> str:
    """Submit the tiny config as a 2-node x 2-process CPU job; return its id. Nothing may be JIT-compiled."""
    env = {**cluster.env, "TORCH_EXTENSIONS_DIR": str(run_dir.parent / f"{run_dir.name}-torch_extensions")}
    result = subprocess.run([sys.executable, "-m", "hataori.cli", "slurm", "submit", str(TOY), *TINY,
                             "--data", str(shards), "--run-dir", str(run_dir), "--cluster", str(TEST_CLUSTER),
                             *options], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


def wait_ended(cluster, job_id: str, run_dir: Path, timeout: float) -> dict[str, str]:
    try:
        return cluster.wait_job(job_id, ENDED, timeout=timeout)
    except TimeoutError as err:
        cluster.run(["scancel", job_id], check=False)
        pytest.fail(f"{err}\njob log:\n{job_log(run_dir, job_id)[-4000:]}")


def job_log(run_dir: Path, job_id: str) -> str:
    path = run_dir / "slurm" / f"job-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def train_records(run_dir: Path) -> dict[int, dict]:
    found = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            found[record["step"]] = record
    return found


def complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").iterdir() if re.fullmatch(r"step_\d{8}", p.name))


def status(cluster, run_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hataori.cli", "slurm", "status", str(run_dir), *flags],
                          env=cluster.env, capture_output=True, text=True, timeout=120)


def log_times(log: str, pattern: str) -> list[datetime]:
    return [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
            for m in re.finditer(r"^\[([\d-]+ [\d:]+)\] slurm job \d+: " + pattern, log, re.M)]


# ----------------------------------------------------------------------------- batch scripts


def dry_run(shards: Path, run_dir: Path, *options: str, capsys) -> str:
    from hataori.cli import main as hataori_main

    assert hataori_main(["slurm", "submit", str(TOY), *TINY, "--data", str(shards), "--run-dir", str(run_dir),
                         "--dry-run", *options]) == 0
    return capsys.readouterr().out


@pytest.mark.timeout(120)
def test_dry_run_scripts_for_one_node_of_8_gpus_and_4_nodes_of_8(ja_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    one = dry_run(ja_shards, run_dir, "--gpus-per-node", "8", "--time", "24:00:00", "--partition", "gpu",
                  f"zero.global_batch_tokens={8 * 8 * SEQ_LEN}", capsys=capsys)
    four = dry_run(ja_shards, run_dir, "--nodes", "4", "--gpus-per-node", "8", "--time", "2-00:00:00",
                   "--account", "llm", "--qos", "high", "--cpus-per-task", "12", "--max-requeues", "10",
                   "--signal-seconds", "600", f"zero.global_batch_tokens={8 * 32 * SEQ_LEN}", capsys=capsys)
    assert not run_dir.exists(), "--dry-run wrote into the run folder"
    for script, nodes, limit, stop in ((one, 1, 86400, 300), (four, 4, 172800, 600)):
        subprocess.run(["bash", "-n"], input=script, text=True, check=True, timeout=30)  # valid bash
        sbatch = re.findall(r"^#SBATCH (\S+)$", script, re.M)
        for option in (f"--nodes={nodes}", "--ntasks-per-node=8", "--gpus-per-node=8", f"--signal=B:USR1@{stop}",
                       "--requeue", "--open-mode=append", f"--output={run_dir / 'slurm' / 'job-%j.out'}"):
            assert option in sbatch, f"{option} missing from {sbatch}"
        assert f"TIME_LIMIT_S={limit}\n" in script and f"STOP_BEFORE_S={stop}\n" in script
        assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script and "DS_ACCELERATOR" not in script
        assert f"pretrain {run_dir / 'slurm' / 'train.yaml'}" in script
    assert "--partition=gpu" in one and "--account" not in one and "#SBATCH --time=1-00:00:00\n" in one
    for option in ("--account=llm", "--qos=high", "--cpus-per-task=12", "--time=2-00:00:00"):
        assert f"#SBATCH {option}\n" in four
    assert "MAX_REQUEUES=10\n" in four and "export OMP_NUM_THREADS=12\n" in four


@pytest.mark.timeout(120)
@pytest.mark.parametrize("options, message", [
    (["--gpus-per-node", "3", "--time", "10"], "zero.global_batch_tokens"),  # 2048 tokens over 3 processes
    (["--time", "1:2:3:4"], "time: '1:2:3:4' is not a Slurm time limit"),
    (["--time", "UNLIMITED"], "time: 'UNLIMITED' is no limit, but the batch script times its own stop signal"),
    (["--time", "5", "--signal-seconds", "256"],
     "signal_seconds: must lie between 0 and 255 s for a time limit of 300 s"),
])
def test_submit_names_what_to_change(ja_shards, tmp_path, capsys, options, message):
    from hataori.cli import main as hataori_main

    assert hataori_main(["slurm", "submit", str(TOY), *TINY, "--data", str(ja_shards), "--run-dir",
                         str(tmp_path / "run"), "--dry-run", *options]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_cluster_profile_composes_with_flags_and_job_overrides(ja_shards, tmp_path, capsys):
    """A profile (configs/slurm/) gives the job's keys; slurm.KEY=VALUE and the flags set the same keys;
    a key set both by a flag and by an override is refused; without a time limit anywhere the error says
    where to put one."""
    run_dir = tmp_path / "run"
    profile = tmp_path / "site.yaml"
    profile.write_text(f"base: {REPO / 'configs/slurm/h100-example.yaml'}\npartition: big\n"
                       "setup: ['module load site/1', 'export NCCL_IB_HCA=mlx5_0']\n")
    script = dry_run(ja_shards, run_dir, "--cluster", str(profile), "slurm.job_name=ja-1b", "--nodes", "2",
                     "slurm.max_requeues=4", f"zero.global_batch_tokens={8 * 16 * SEQ_LEN}", capsys=capsys)
    for line in ("#SBATCH --partition=big\n", "#SBATCH --account=my-project\n", "#SBATCH --job-name=ja-1b\n",
                 "#SBATCH --nodes=2\n", "#SBATCH --ntasks-per-node=8\n", "#SBATCH --exclusive\n",
                 "#SBATCH --time=2-00:00:00\n", "module load site/1\nexport NCCL_IB_HCA=mlx5_0\n", "MAX_REQUEUES=4\n"):
        assert line in script, line

    from hataori.cli import main as hataori_main

    common = ["slurm", "submit", str(TOY), *TINY, "--data", str(ja_shards), "--run-dir", str(run_dir), "--dry-run"]
    assert hataori_main([*common, "--cluster", str(TEST_CLUSTER), "--nodes", "1", "slurm.nodes=2", "--time", "9"]) == 2
    assert "slurm.nodes: is set twice, by --nodes and by slurm.nodes=...; keep one of them" in capsys.readouterr().err
    assert hataori_main([*common, "--cluster", str(TEST_CLUSTER)]) == 2
    assert "slurm.time: the job's time limit is not set; pass --time" in capsys.readouterr().err
    assert hataori_main([*common, "--cluster", str(TEST_CLUSTER), "--time", "9", "slurm.nodez=2"]) == 2
    assert "slurm.nodez: unknown key" in capsys.readouterr().err and not run_dir.exists()
    # a profile among the training presets: named, with the option it belongs to
    assert hataori_main(["slurm", "submit", str(TOY), str(profile), *common[3:], "--time", "9"]) == 2
    err = capsys.readouterr().err
    assert f"{profile}: is a cluster profile (it sets account, " in err and f"pass it with --cluster {profile}" in err


# Every sbatch --time format, the seconds worked out by hand, and the D-HH:MM:SS the script is given.
@pytest.mark.parametrize("text, seconds, canonical", [
    ("90", 5400, "0-01:30:00"),                 # minutes
    ("2000", 120000, "1-09:20:00"),             # minutes past a day
    ("0:30", 30, "0-00:00:30"),                 # minutes:seconds
    ("10:30", 630, "0-00:10:30"),
    ("1:02:03", 3723, "0-01:02:03"),            # hours:minutes:seconds
    ("100:00:00", 360000, "4-04:00:00"),        # hours past a day
    ("2-3", 183600, "2-03:00:00"),              # days-hours
    ("2-03:04", 183840, "2-03:04:00"),          # days-hours:minutes
    ("1-23:59:59", 172799, "1-23:59:59"),       # days-hours:minutes:seconds
    ("0-0:0:1", 1, "0-00:00:01"),
])
def test_time_limits_in_every_slurm_format(text, seconds, canonical):
    from hataori.slurm.config import time_limit_seconds, time_limit_text

    assert time_limit_seconds(text) == seconds
    assert time_limit_text(seconds) == canonical


@pytest.mark.parametrize("text, message", [
    ("-30", "'-30' is not a Slurm time limit: it is negative"),
    ("", "its minutes field is empty"),
    ("1:", "its seconds field is empty"),
    ("1-", "its hours field is empty"),
    ("1::2", "its minutes field is empty"),
    ("1h", "its minutes field is '1h', not a whole number"),
    ("1-2-3", "its days field is '1-2', not a whole number"),
    ("1:2:3:4", "more than three colon-separated fields"),
    ("99:99:99", "minutes after hours must be below 60, got 99"),
    ("1:60", "seconds after minutes must be below 60, got 60"),
    ("1-25:00:00", "hours after days must be below 24, got 25"),
    ("1-00:60", "minutes after hours must be below 60, got 60"),
    ("0", "'0' is zero, which Slurm reads as no limit"),
    ("0-00:00:00", "is zero, which Slurm reads as no limit"),
    ("UNLIMITED", "'UNLIMITED' is no limit, but the batch script times its own stop signal from the limit"),
    ("infinite", "'infinite' is no limit"),
])
def test_time_limits_refused_with_the_formats(text, message):
    from hataori.errors import ConfigError
    from hataori.slurm.config import TIME_FORMATS, SlurmConfig

    with pytest.raises(ConfigError) as err:
        SlurmConfig(time=text)
    assert err.value.key == "time" and message in str(err.value) and TIME_FORMATS in str(err.value)


def test_script_timer_and_sbatch_limit_come_from_one_parse(tmp_path):
    from hataori.slurm.config import SlurmConfig
    from hataori.slurm.sbatch import render

    cfg = SlurmConfig(time="100:00:30", signal_seconds=600)
    script = render(cfg, run_dir=tmp_path, train_args=[], python="python", workdir=tmp_path)
    assert cfg.time == "4-04:00:30" and "#SBATCH --time=4-04:00:30\n" in script
    assert "TIME_LIMIT_S=360030\n" in script and "#SBATCH --signal=B:USR1@600\n" in script


# ----------------------------------------------------------------------------- signals


@pytest.mark.timeout(60)
def test_stop_signals_reach_the_trainer():
    code = ("import os, signal, time\n"
            "from hataori.train.signals import stop_on_signals\n"
            "class T:\n"
            "    stops = 0\n"
            "    def request_stop(self): T.stops += 1\n"
            "stop_on_signals(T())\n"
            "os.kill(os.getpid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)\n"
            "print('stops', T.stops)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stops 2"
    assert "got SIGUSR1" in result.stderr and "got SIGTERM" in result.stderr


# ----------------------------------------------------------------------------- the cluster


@pytest.mark.timeout(120)
def test_two_node_step_gets_ranks_and_the_first_nodes_address(slurm_cluster, tmp_path):
    script = tmp_path / "ranks.sh"
    script.write_text("#!/bin/bash\n"
                      "first=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)\n"
                      "export MASTER_ADDR=$(scontrol show node \"$first\" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)\n"
                      "srun bash -c 'echo rank $SLURM_PROCID local $SLURM_LOCALID of $SLURM_NTASKS "
                      "on $SLURMD_NODENAME master $MASTER_ADDR'\n")
    out = tmp_path / "ranks.out"
    job = slurm_cluster.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", f"--output={out}",
                             str(script)]).stdout.strip()
    assert slurm_cluster.wait_job(job, ENDED, timeout=60)["JobState"] == "COMPLETED", out.read_text()
    lines = sorted(out.read_text().splitlines())
    assert lines == [f"rank {r} local {r % 2} of 4 on node{r // 2 + 1} master 127.0.0.1" for r in range(4)]


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, ja_shards, tmp_path_factory) -> tuple[Path, str]:
    """A run of the tiny config that no signal interrupts: the reference of the other runs."""
    run_dir = tmp_path_factory.mktemp("slurm") / "uninterrupted"
    job = submit(slurm_cluster, run_dir, ja_shards, "--time", "10")
    info = wait_ended(slurm_cluster, job, run_dir, timeout=240)
    assert info["JobState"] == "COMPLETED", job_log(run_dir, job)[-4000:]
    return run_dir, job


@pytest.mark.timeout(300)
def test_two_node_job_pretrains_to_completion(slurm_cluster, uninterrupted):
    run_dir, job = uninterrupted
    log = job_log(run_dir, job)
    print(log)
    assert slurm_cluster.job(job)["NodeList"] == "node[1-2]"
    assert "4 process(es) on cpu" in log and "the run is complete" in log
    assert "cluster profile: test-cluster" in log  # the profile's setup line ran in the job
    assert sorted(train_records(run_dir)) == list(range(1, STEPS + 1))
    assert complete_checkpoints(run_dir) == [400, 500]
    assert json.loads((run_dir / "environment.json").read_text())["world_size"] == WORLD
    assert sorted(p.name for p in (run_dir / "slurm").iterdir()) == sorted(
        [f"job-{job}.sbatch", f"job-{job}.out", "jobs.jsonl", "train.yaml", "slurm.yaml"])
    recorded = (run_dir / "slurm" / "slurm.yaml").read_text()
    assert "nodes: 2\n" in recorded and "cpus_only: true\n" in recorded and "time: 0-00:10:00\n" in recorded
    shown = status(slurm_cluster, run_dir)
    assert f"job {job}: COMPLETED, 0 restart(s), on node[1-2]" in shown.stdout, shown.stdout + shown.stderr
    assert f"last step: {STEPS} of {STEPS}" in shown.stdout
    assert f"last complete checkpoint: step {STEPS}" in shown.stdout
    assert status(slurm_cluster, run_dir, "--finished").returncode == 0
    # nothing of the job outlives it: the batch script's timer and its sleep end with the script
    deadline = time.monotonic() + 10
    while slurm_cluster.job_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not slurm_cluster.job_processes(), [Path(f"/proc/{pid}/cmdline").read_bytes()
                                               for pid in slurm_cluster.job_processes()]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_time_limit_checkpoints_requeues_and_resumes_to_the_uninterrupted_losses(slurm_cluster, ja_shards,
                                                                               uninterrupted, tmp_path):
    """A 2-minute limit with the warning as early as allowed (45 s into an attempt, so about 35 s of
    training): the run is longer than that, so an attempt checkpoints, requeues itself and the next
    resumes; the loss of every step equals the uninterrupted run's."""
    reference = train_records(uninterrupted[0])
    reference_log = job_log(*uninterrupted)
    (started,), (finished,) = log_times(reference_log, "attempt 0"), log_times(reference_log, "the run is complete")
    assert (finished - started).total_seconds() > 50, "the run must outlast one attempt's training for this test"
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, run_dir, ja_shards, "--time", "2", "--signal-seconds", "75", "--max-requeues", "8")
    info = wait_ended(slurm_cluster, job, run_dir, timeout=540)
    log = job_log(run_dir, job)
    print(log)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    restarts = int(info["Restarts"])
    assert restarts >= 1, "the run finished before its first time limit: nothing was requeued"
    # Every requeue follows a warning; a warning may also come as the last attempt finishes.
    assert len(re.findall(r"got SIGUSR1; the training processes checkpoint", log)) >= restarts
    assert len(re.findall(r"requeueing \(requeue \d of 8\)", log)) == restarts
    resumed_at = [int(s) for s in re.findall(r"resuming after step (\d+)", log)]
    assert len(resumed_at) == restarts and resumed_at == sorted(resumed_at) and resumed_at[0] > 0

    resumed = train_records(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    mismatched = [s for s in resumed
                  if (resumed[s]["loss"], resumed[s]["lr"]) != (reference[s]["loss"], reference[s]["lr"])]
    assert not mismatched, f"steps whose loss or lr differ from the uninterrupted run: {mismatched[:10]}"
    print("resumed after steps", resumed_at, "; losses at those steps and after:",
          [(s, resumed[s]["loss"], reference[s]["loss"]) for at in resumed_at for s in (at, at + 1)])

    requeued = log_times(log, r"stopped before the last step; requeueing")
    started = log_times(log, r"attempt [1-9]")
    cycles = [(start - stop).total_seconds() for stop, start in zip(requeued, started)]
    print(f"requeue to next attempt's start: {cycles} s")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scancel_leaves_the_last_checkpoint_complete_and_resumable(slurm_cluster, ja_shards, uninterrupted,
                                                                   tmp_path):
    """Cancel a job after its first checkpoint: its newest checkpoint is complete, and a new job of the
    same run resumes from it and reproduces the uninterrupted run's losses."""
    reference = train_records(uninterrupted[0])
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, run_dir, ja_shards, "--time", "10")
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "step_00000100").is_dir():
        assert slurm_cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), job_log(run_dir, job)[-4000:]
        assert time.monotonic() < deadline, job_log(run_dir, job)[-4000:]
        time.sleep(0.2)
    slurm_cluster.run(["scancel", job])
    info = wait_ended(slurm_cluster, job, run_dir, timeout=120)
    log = job_log(run_dir, job)
    print(log)
    assert info["JobState"] == "CANCELLED" and int(info["Restarts"]) == 0, log[-4000:]
    assert "the job is ending (COMPLETING); not requeued" in log
    steps = complete_checkpoints(run_dir)
    assert steps and steps[-1] >= 100
    last = steps[-1]
    assert status(slurm_cluster, run_dir, "--finished").returncode == 1

    again = submit(slurm_cluster, run_dir, ja_shards, "--time", "10")
    info = wait_ended(slurm_cluster, again, run_dir, timeout=240)
    log = job_log(run_dir, again)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert f"resuming after step {last}" in log
    resumed = train_records(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s]["loss"] for s in resumed] == [reference[s]["loss"] for s in resumed]
