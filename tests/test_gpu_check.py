"""scripts/gpu_check.sh rehearsed on the CPU: its options, every stage's command line, and the results
files it writes, so that a GPU's first minute is not spent on a mistake in the script. The figures of a
rehearsal are the CPU's at toy sizes and are not checked; what is checked is that they arrive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hataori.outputs import MARKER

REPO = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available()


def gpu_check(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("HATAORI_GPU_REHEARSAL", None)
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--no-install", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_rehearsal_writes_every_stage_and_figure(tmp_path):
    out = tmp_path / "results"
    result = gpu_check("--rehearse", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "gpu-check.json", "gpu-check.log", "gpu-check.md"]
    results = json.loads((out / "gpu-check.json").read_text())

    assert results["mode"] == "rehearsal on the CPU"
    env = results["environment"]
    assert env["packages"]["torch"] and env["packages"]["deepspeed"] and env["python"]
    assert list(results["stages"]) == ["tests", "attention", "cross_entropy", "model_step"]
    assert all(stage["status"] == "passed" for stage in results["stages"].values()), results["stages"]
    # tests/test_gpu.py ran under the rehearsal: the CPU-runnable step choices and the pretraining run
    tests = results["tests"]
    assert tests["failed"] == tests["errors"] == 0 and tests["passed"] >= 3, tests
    pretrain = results["pretrain"]
    assert [record["step"] for record in pretrain["train"]] == [1, 2]
    assert pretrain["val"]["loss"] == pytest.approx(pretrain["reference_val_loss"], rel=1e-5)
    # each benchmark's rows, with the keys the targets read
    rows = {(r["provider"], r["seq_len"]): r for r in results["attention"]["rows"]}
    assert set(rows) == {(provider, t) for provider in ("sdpa", "sdpa-flash", "sdpa-cudnn") for t in (64, 128)}
    assert all(rows[provider, t]["fwd_tflops"] > 0 for provider in ("sdpa", "sdpa-flash") for t in (64, 128))
    assert rows["sdpa-cudnn", 64]["note"].startswith("cannot run: ")  # a backend that cannot run is a row saying so
    assert {(r["vocab"], r["loss"]) for r in results["cross_entropy"]["rows"]} == {
        (v, loss) for v in (1000, 64000) for loss in ("plain", "chunked")}
    model_rows = results["model_step"]["rows"]
    assert [r["name"] for r in model_rows] == ["sdpa+torch", "sdpa+torch+chunked", "auto+auto"]
    assert all(r["tokens_per_s"] > 0 for r in model_rows)
    assert len(results["targets"]) == 6 and all(row["met"] is None for row in results["targets"])
    report = (out / "gpu-check.md").read_text()
    for heading in ("| stage | status | seconds |", "| target | wanted | measured | met |", "Attention (CPU",
                    "Cross-entropy (N=256", "Training step (toy.yaml", "125m pretrain, step 2"):
        assert heading in report
    log = (out / "gpu-check.log").read_text()
    assert all(f"===== {name}: passed" in log for name in results["stages"])


@pytest.mark.slow
def test_options_are_checked_before_anything_runs(tmp_path):
    result = gpu_check("--rehearse", "--only", "attention,nope", "--out", str(tmp_path / "a"))
    assert result.returncode == 2 and "--only: unknown stage nope; choose from tests, attention" in result.stderr
    result = gpu_check("--python", sys.executable, "--wheels", str(tmp_path), "--rehearse")
    assert result.returncode == 2 and f"--wheels {tmp_path}: no .whl files there" in result.stderr
    result = gpu_check("--rehearse", "--workers", "0", "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "--workers must be at least 1" in result.stderr
    result = gpu_check("--rehearse", "--time-budget", "-5", "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "--time-budget must be a positive number of seconds, got -5" in result.stderr
    if not ON_GPU:
        result = gpu_check("--out", str(tmp_path / "c"))
        assert result.returncode == 2 and "no CUDA device here" in result.stderr and "--rehearse" in result.stderr
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing written for a refused run
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "gpu-check.json").write_text("{}")  # an earlier check's results
    result = gpu_check("--rehearse", "--only", "cross_entropy", "--out", str(tmp_path / "d"))
    assert result.returncode == 2 and "holds a GPU check's results folder (scripts/gpu_check.sh); pass --replace" in \
        result.stderr
    assert (tmp_path / "d" / "gpu-check.json").read_text() == "{}"


@pytest.mark.slow
def test_only_runs_the_stages_named_and_the_budget_stops_stages(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "gpu-check.json").write_text("{}")
    result = gpu_check("--rehearse", "--only", "cross_entropy", "--out", str(tmp_path / "a"), "--replace")
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "a" / "gpu-check.json").read_text())
    assert list(results["stages"]) == ["cross_entropy"] and "attention" not in results
    # 10 s for the whole check: no stage has the 20 s a stage needs to start, each says so, and the check fails
    result = gpu_check("--rehearse", "--only", "attention,cross_entropy", "--time-budget", "10",
                       "--out", str(tmp_path / "b"))
    assert result.returncode == 1
    stages = json.loads((tmp_path / "b" / "gpu-check.json").read_text())["stages"]
    assert [(name, stage["status"]) for name, stage in stages.items()] == [("attention", "not run"),
                                                                           ("cross_entropy", "not run")]
    assert stages["attention"]["note"].endswith(" s of --time-budget left")


def test_targets_read_the_right_figures():
    """The targets on made-up GPU figures, worked out by hand: attention at head dim 128 and 4k-8k only,
    SDPA's best backend (a backend that could not run left out), the fastest 1b variant, the 64k loss."""
    from helpers import load_script

    gpu_check = load_script(REPO / "scripts" / "gpu_check.py")

    def row(provider, head_dim, seq_len, fwd, bwd):
        return {"provider": provider, "head_dim": head_dim, "seq_len": seq_len, "fwd_tflops": fwd, "bwd_tflops": bwd}

    attention = [row("triton", 128, 4096, 400.0, 280.0), row("triton", 128, 8192, 460.0, 250.0),
                 row("triton", 128, 16384, 999.0, 999.0), row("triton", 64, 8192, 999.0, 999.0),
                 row("sdpa", 128, 8192, 300.0, 200.0), row("sdpa-flash", 128, 4096, 500.0, 240.0),
                 {"provider": "sdpa-cudnn", "head_dim": 128, "seq_len": 8192, "note": "cannot run: no"}]
    model = [{"name": "sdpa+torch", "tokens_per_s": 40_000.0, "mfu": 0.4},
             {"name": "triton+triton", "tokens_per_s": 50_000.0, "mfu": 0.5}, {"name": "flash", "tokens_per_s": None}]
    ce = [{"vocab": 64000, "loss": "plain", "peak_gib": 4.0}, {"vocab": 64000, "loss": "chunked", "peak_gib": 0.9},
          {"vocab": 32000, "loss": "chunked", "peak_gib": 0.1}]
    got = {row["what"].split(" (")[0]: row for row in gpu_check.targets(
        {"attention": {"rows": attention}, "model_step": {"rows": model}, "cross_entropy": {"rows": ce}})}
    assert [(r["measured"], r["met"]) for r in got.values()] == [
        (460.0, True), (280.0, False), (460.0 / 500.0, False), (280.0 / 240.0, True), (50_000.0, True),
        (0.9 / 4.0, True)]
    assert "triton+triton, MFU 50.0%" in got["1b preset, seq 4096, bf16, one GPU"]["note"]
    assert all(r["measured"] is None and r["met"] is None for r in gpu_check.targets({}))
