"""A precision the device cannot run is refused before any work starts (hataori/precision.py), by pretrain,
plan, eval and generate, with the key, what the device runs and what to use instead.

What this CPU runs is checked against independent answers: DeepSpeed's CPU accelerator (which raises
``Type fp16 is not supported on your device`` where fp16 is missing) and the CPU's own flags.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from hataori.cli import main as hataori_main
from hataori.errors import ConfigError
from hataori.precision import (PRECISIONS, check, check_gpu, cpu_flags, cpu_name, cpu_precisions, gpu_precisions,
                               supported)

MISSING_ON_CPU = [p for p in PRECISIONS if p not in cpu_precisions()]


def missing_here() -> str:
    """A precision this CPU cannot run; skips where it runs them all."""
    if not MISSING_ON_CPU:
        pytest.skip(f"this CPU ({cpu_name()}) runs every precision: a refusal needs a CPU that lacks one "
                    "(fp16 on a CPU without AVX512-FP16 or AMX-FP16)")
    return MISSING_ON_CPU[-1]


def test_cpu_precisions_agree_with_deepspeed_and_the_cpu_flags():
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    runs = cpu_precisions()
    assert runs[0] == "fp32"
    assert ("fp16" in runs) == bool(CPU_Accelerator().is_fp16_supported())
    flags = cpu_flags()
    if flags["avx512_fp16"] or flags["amx_fp16"]:
        assert "fp16" in runs, flags
    if flags["avx512_bf16"] or flags["amx_bf16"]:
        assert "bf16" in runs, flags
    if not flags["avx512f"]:  # every x86 CPU oneDNN runs bf16 or fp16 on has AVX512
        assert runs == ("fp32",), flags
    assert supported("cpu") == runs


@pytest.mark.parametrize("capability, runs", [((5, 2), ("fp32",)), ((6, 1), ("fp32", "fp16")),
                                              ((7, 0), ("fp32", "fp16")), ((8, 0), PRECISIONS), ((9, 0), PRECISIONS),
                                              ((12, 0), PRECISIONS)])
def test_gpu_precisions_by_compute_capability(capability, runs):
    assert gpu_precisions(capability) == runs


def test_a_v100_refuses_bf16_and_names_what_it_runs():
    with pytest.raises(ConfigError) as err:
        check_gpu("bf16", (7, 0), "zero.precision")
    assert str(err.value) == ("zero.precision: bf16 cannot run on GPUs of compute capability 7.0: bf16 needs compute "
                              "capability 8.0 or newer; it runs fp32 and fp16: use fp32")
    check_gpu("fp16", (7, 0), "zero.precision")  # runs


def test_check_on_this_cpu_refuses_what_it_lacks_only():
    for precision in cpu_precisions():
        check(precision, "cpu", "zero.precision")
    for precision in MISSING_ON_CPU:
        with pytest.raises(ConfigError, match=rf"^zero\.precision: {precision} cannot run on this CPU \("):
            check(precision, "cpu", "zero.precision")


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_pretrain_refuses_before_any_rank_starts(nproc, ja_shards, tmp_path):
    """In a fresh process, as users start it: exit 2, the key and what to use, no traceback, no rank launched
    and no run folder made."""
    precision = missing_here()
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "hataori.cli", "pretrain", "configs/train/toy.yaml", "--data",
                           str(ja_shards), "--run-dir", str(run), "--nproc", nproc, f"zero.precision={precision}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    expected = f"hataori: error: zero.precision: {precision} cannot run on this CPU ({cpu_name()}): "
    assert done.stderr.startswith(expected), done.stderr
    assert "use bf16" in done.stderr or "use fp32" in done.stderr
    assert "Traceback" not in done.stderr and "launching" not in done.stdout
    assert not run.exists()


def test_plan_refuses_a_precision_the_planned_gpus_cannot_run(capsys):
    argv = ["plan", "configs/model/125m.yaml", "--gpus", "8", "plan.compute_capability=7.0"]
    assert hataori_main([*argv, "--precision", "bf16"]) == 2
    assert capsys.readouterr().err.strip() == (
        "hataori: error: plan.precision (--precision): bf16 cannot run on GPUs of compute capability 7.0: bf16 "
        "needs compute capability 8.0 or newer; it runs fp32 and fp16: use fp32 (the GPUs planned: "
        "plan.compute_capability=7.0)")
    assert hataori_main([*argv, "--precision", "fp16"]) == 0
    capsys.readouterr()
    # A train preset's own precision, and the H100 profile's capability.
    assert hataori_main(["plan", "configs/train/125m.yaml", "--gpus", "8", "plan.compute_capability=7.5"]) == 2
    assert "zero.precision: bf16 cannot run on GPUs of compute capability 7.5" in capsys.readouterr().err
    assert hataori_main(["plan", "configs/train/125m.yaml", "--gpus", "8", "--machine",
                         "configs/plan/8xh100-80gb.yaml"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_eval_and_generate_refuse_before_loading_the_model(command, tmp_path, capsys):
    precision = missing_here()
    task_or_prompt = ["--task", "jcommonsenseqa"] if command == "eval" else ["プロンプト"]
    argv = [command, str(tmp_path / "no-such-run"), *task_or_prompt, "--device", "cpu", "--dtype", precision]
    assert hataori_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hataori: error: --dtype: {precision} cannot run on this CPU ({cpu_name()}): "), err


def test_dtype_choices_are_the_precisions(capsys):
    with pytest.raises(SystemExit):
        hataori_main(["generate", "run", "x", "--dtype", "half"])
    assert "argument --dtype: invalid choice: 'half'" in capsys.readouterr().err

