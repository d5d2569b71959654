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

REPO = Path(__file__).resolve().parents[1]
ON_GPU = __import__("torch").cuda.is_available()


def gpu_check(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("HATAORI_GPU_REHEARSAL", None)
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--no-install", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_rehearsal_writes_every_stage_and_figure(tmp_path):
    out = tmp_path / "results"
    result = gpu_check("--rehearse", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.json", "gpu-check.log", "gpu-check.md"]
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
    assert {(r["provider"], r["seq_len"]) for r in results["attention"]["rows"]} == {("sdpa", 64), ("sdpa", 128)}
    assert all(r["fwd_tflops"] > 0 for r in results["attention"]["rows"])
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


def test_options_are_checked_before_anything_runs(tmp_path):
    result = gpu_check("--rehearse", "--only", "attention,nope", "--out", str(tmp_path / "a"))
    assert result.returncode == 2 and "--only: unknown stage nope; choose from tests, attention" in result.stderr
    result = gpu_check("--python", sys.executable, "--wheels", str(tmp_path), "--rehearse")
    assert result.returncode == 2 and f"--wheels {tmp_path}: no .whl files there" in result.stderr
    result = gpu_check("--rehearse", "--workers", "0", "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "--workers must be at least 1" in result.stderr
    if not ON_GPU:
        result = gpu_check("--out", str(tmp_path / "c"))
        assert result.returncode == 2 and "no CUDA device here" in result.stderr and "--rehearse" in result.stderr
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing written for a refused run


def test_only_runs_the_stages_named(tmp_path):
    result = gpu_check("--rehearse", "--only", "cross_entropy", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "gpu-check.json").read_text())
    assert list(results["stages"]) == ["cross_entropy"] and "attention" not in results
