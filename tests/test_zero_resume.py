"""DeepSpeed ZeRO stages 0-3 on two real processes: resume exactness, kills mid-save, accumulation.

Each test launches two processes of tests/zero_worker.py (``python tests/zero_worker.py <mode> ...``)
with the variables torchrun would set, and compares what they write against an independent
reference: the losses of an uninterrupted run, or the same update made in one micro-batch.
Every launch has a hard time limit, so a hang fails instead of stalling.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capabilities import needs
from helpers import SEQ_LEN, tiny_config
from ranks import launch_ranks, log_tails

LAUNCH_TIMEOUT_S = 150
WORKER = Path(__file__).with_name("zero_worker.py")


# ----------------------------------------------------------------------------- launcher


def launch(mode_args: list[str], log_dir: Path, nproc: int = 2, timeout: float = LAUNCH_TIMEOUT_S) -> list[int]:
    """Run this file on ``nproc`` processes of one process group; return their exit codes."""
    return launch_ranks(str(WORKER), mode_args, log_dir, nproc, timeout)


def expect_success(codes: list[int], log_dir: Path) -> None:
    assert codes == [0] * len(codes), f"exit codes {codes}; logs:\n{log_tails(log_dir)}"


def read_steps(run_dir: Path) -> dict[int, dict]:
    """Rank 0's per-step records, by step."""
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    return {rec.pop("step"): rec for rec in map(json.loads, lines)}


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S + 30)
@pytest.mark.parametrize("stage, offload", [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (2, "cpu"),
                                           (3, "cpu+params")],
                         ids=["stage0", "stage1", "stage2", "stage3", "stage2-offload", "stage3-offload-params"])
def test_resume_after_kill_mid_checkpoint_matches_uninterrupted_run(stage, offload, tmp_path):
    """Train 6 steps (2 micro-batches each) with a checkpoint at step 3 and get killed while saving
    step 6; a fresh process group then resumes from step 3 and must reproduce steps 4-6 exactly:
    losses, learning rates, token counts and the random generators' draws."""
    run = tmp_path / "run"
    common = ["train", "--stage", str(stage), "--offload", offload, "--run-dir", str(run), "--steps", "6"]

    codes = launch([*common, "--save-every", "3", "--kill-in-save-at", "6"], tmp_path / "logs-first")
    assert all(code == -signal.SIGKILL for code in codes), f"exit codes {codes}:\n{log_tails(tmp_path / 'logs-first')}"
    checkpoints = run / "checkpoints"
    assert (checkpoints / "step_00000003").is_dir()
    assert (checkpoints / "step_00000006.incomplete").is_dir(), "the kill did not land inside the save"
    reference = read_steps(run)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    (run / "steps.jsonl").unlink()

    expect_success(launch([*common, "--save-every", "1", "--keep-last", "2"], tmp_path / "logs-resume"),
                   tmp_path / "logs-resume")
    resumed = read_steps(run)
    assert sorted(resumed) == [4, 5, 6], "did not resume from the last complete checkpoint (step 3)"
    for step in (4, 5, 6):
        for key in ("loss", "lr", "tokens_seen", "rng"):
            assert resumed[step][key] == reference[step][key], f"step {step} {key}"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_00000005", "step_00000006"]
    for name in ("config.yaml", "environment.json", "deepspeed.json"):
        assert (run / name).is_file()
    zero = json.loads((run / "deepspeed.json").read_text())["zero_optimization"]
    assert zero["stage"] == stage and ("offload_optimizer" in zero) == (offload != "none")
    assert ("offload_param" in zero) == (offload == "cpu+params")
    print(f"stage {stage} offload {offload} step seconds:",
          [round(reference[s]["seconds"], 3) for s in sorted(reference)])


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_stop_request_on_one_rank_stops_all_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    expect_success(launch(["train", "--stage", "2", "--run-dir", str(run), "--steps", "6", "--save-every", "5",
                           "--stop-at", "2"], tmp_path / "logs"), tmp_path / "logs")
    assert sorted(read_steps(run)) == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step_00000002"]


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_single_process_needs_no_launcher(tmp_path):
    """Without torchrun's or Slurm's variables the trainer runs as a world of one."""
    run = tmp_path / "run"
    launcher_vars = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    result = subprocess.run([sys.executable, str(WORKER), "train", "--stage", "1", "--run-dir", str(run), "--steps",
                             "2", "--save-every", "2"], env=env, capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(read_steps(run)) == [1, 2]
    assert (run / "checkpoints" / "step_00000002").is_dir()
    assert json.loads((run / "environment.json").read_text())["world_size"] == 1
    assert json.loads((run / "deepspeed.json").read_text())["train_batch_size"] == 4  # 2 x 2 accumulated
    assert not (tmp_path / "torch_extensions").exists()


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_grad_accumulation_matches_one_big_micro_batch(tmp_path):
    """Per stage, 4 micro-batches of 2 give the same averaged gradients and update as 1 micro-batch of 8."""
    out = tmp_path / "accum.pt"
    expect_success(launch(["accum", "--out", str(out)], tmp_path / "logs"), tmp_path / "logs")
    results = torch.load(out)
    assert sorted(results) == [0, 1, 2, 3]
    for stage, (one, four) in results.items():
        assert one["micro_batches"] == 1 and four["micro_batches"] == 4
        for step, (grads_one, grads_four) in enumerate(zip(one["grads"], four["grads"], strict=True)):
            for name, grad in grads_one.items():
                assert grad.abs().max() > 0, f"stage {stage} {name}: no gradient"
                # The first step's gradients differ only by the order of the sums. Later steps start from
                # weights that differ too: Adam's first update divides by the gradient's own scale, which
                # magnifies rounding where a gradient is tiny (see the weights below). There, tolerate
                # 1e-4 of the tensor's largest gradient; a missed average is off by the gradient itself.
                atol = 1e-7 if step == 0 else 1e-4 * float(grad.abs().max())
                torch.testing.assert_close(grads_four[name], grad, rtol=1e-5, atol=atol,
                                           msg=lambda m: f"stage {stage} step {step} grad of {name}: {m}")
        for name, param in one["params"].items():
            # Adam divides by the gradient's own scale, which magnifies rounding where a gradient is
            # tiny: compare the updates to 1% of one step's size (lr = 1e-3).
            torch.testing.assert_close(four["params"][name], param, rtol=0, atol=1e-5,
                                       msg=lambda m: f"stage {stage} {name}: {m}")


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs("bf16"))])
def test_zero3_model_built_partitioned_equals_the_whole_model(precision, tmp_path):
    """ZeroConfig.build_model against ModelConfig.build() (fp32 on the CPU, cast by DeepSpeed): under
    ZeRO-3 each of the two processes holds half the parameters from the start; the weights equal bit
    for bit (stage 1 builds them in the training precision, ZeRO-3 partitioned), and so does the
    first loss. After the first update the ZeRO-3 runs differ in the last bits of fp32 (about 6e-7 of
    the loss), so later losses are compared to 1e-5; in bf16 a weight that rounds to the neighbouring
    bf16 value (2^-8 relative) moves the loss by about 2e-5, so there to 1e-4."""
    out = tmp_path / "build.pt"
    expect_success(launch(["build", "--out", str(out), "--precision", precision], tmp_path / "logs"),
                   tmp_path / "logs")
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]
    cfg = tiny_config(max_seq_len=SEQ_LEN)
    total = cfg.num_params() - cfg.padded_vocab_size * cfg.d_model  # the output matrix is tied
    for stage in (1, 3):
        whole, partitioned = ranks[0][stage][False], ranks[0][stage][True]
        assert whole["params"].keys() == partitioned["params"].keys()
        for name, value in whole["params"].items():
            assert torch.equal(partitioned["params"][name], value), f"stage {stage} {name}"
        assert partitioned["losses"][0] == whole["losses"][0], stage
        rel = 1e-5 if precision == "fp32" else 1e-4
        assert partitioned["losses"] == pytest.approx(whole["losses"], rel=rel), stage
        held = [rank[stage][True]["held"] for rank in ranks]
        if stage == 3:  # each process holds its half (DeepSpeed pads each parameter to the world size)
            assert all(total / 2 <= h <= total / 2 + 2 * len(whole["params"]) for h in held), (held, total)
        else:
            assert held == [total, total]


@needs("bf16")
def test_stage1_model_is_built_in_the_training_precision():
    from hataori.train.zero import ZeroConfig

    cfg = tiny_config(max_seq_len=SEQ_LEN, tie_embeddings=True)
    torch.manual_seed(5)
    whole = cfg.build()
    torch.manual_seed(5)
    zero = ZeroConfig(stage=1, precision="bf16", global_batch_tokens=SEQ_LEN)
    built = zero.build_model(cfg, torch.device("cpu"), seq_len=SEQ_LEN, grad_clip=1.0)
    assert {p.dtype for p in built.parameters()} == {torch.bfloat16}
    assert built.rope_cos.dtype == torch.float32 and torch.equal(built.rope_cos, whole.rope_cos)
    assert built.lm_head.weight is built.tok_embeddings.weight
    for (name, mine), ref in zip(built.named_parameters(), whole.parameters()):
        assert torch.equal(mine, ref.bfloat16()), name
