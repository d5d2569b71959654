"""Resuming a checkpoint on another number of processes (checkpoint/reshard.py), ZeRO stages 0-3.

A run trains 4 steps on N processes and saves; ``load_resharded`` loads that checkpoint into an
engine built on M processes (2 -> 1 and 1 -> 2). Two independent references:

* the state the N-process engine held when it saved, gathered whole with DeepSpeed's
  ``safe_get_full_*``: every parameter's fp32 master weight, Adam moments and low-precision
  weight, the optimizer's step and param groups, the LR scheduler, the engine's counters and the
  loss scaler must be the same bits after the load;
* a run on M processes that was never interrupted, over the same global batches: the resumed
  steps' losses must equal its steps 5-7 exactly.

Exact, not within a tolerance, because the N- and M-process runs make the same arithmetic (the
test checks that too, on steps 1-4): every step is two micro-batches of the same shape, one per
process on two or both accumulated on one, and averaging two gradients (a/2 + b/2 on one process,
(a + b)/2 on two) rounds the same way since halving is exact. Gradient clipping is off because its
norm is summed in another order over another partitioning.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capabilities import needs
from ranks import launch_ranks, log_tails

WORKER = str(Path(__file__).with_name("reshard_worker.py"))
LAUNCH_TIMEOUT_S = 120
STEPS, MORE = 4, 3

CASES = [pytest.param(stage, "fp32", "none", saved_on, resumed_on, False, id=f"stage{stage}-{saved_on}to{resumed_on}")
         for stage in (0, 1, 2, 3) for saved_on, resumed_on in ((2, 1), (1, 2))]
CASES += [pytest.param(3, "bf16", "none", 2, 1, False, id="stage3-bf16-2to1", marks=needs("bf16")),
          # the dynamic loss scaler's state
          pytest.param(2, "fp16", "none", 2, 1, False, id="stage2-fp16-2to1", marks=needs("fp16")),
          pytest.param(3, "fp32", "cpu+params", 1, 2, False, id="stage3-offload-params-1to2"),
          # LoRA: the checkpoint holds the adapters only; the frozen base is the engine's own
          pytest.param(0, "fp32", "none", 2, 1, True, id="lora-stage0-2to1"),
          pytest.param(3, "fp32", "none", 1, 2, True, id="lora-stage3-1to2")]


def launch(mode: str, args: list[str], log_dir: Path, nproc: int) -> None:
    codes = launch_ranks(WORKER, [mode, *args], log_dir, nproc, LAUNCH_TIMEOUT_S)
    assert codes == [0] * nproc, f"{mode}: exit codes {codes}; logs:\n{log_tails(log_dir)}"


def differences(saved, loaded, path: str = "") -> list[str]:
    """Where two nested structures of tensors and plain values differ (tensors: dtype, shape, bits)."""
    if torch.is_tensor(saved):
        same = (torch.is_tensor(loaded) and saved.dtype == loaded.dtype and saved.shape == loaded.shape
                and torch.equal(saved, loaded))
        return [] if same else [f"{path}: {saved.flatten()[:4].tolist()} != {loaded.flatten()[:4].tolist()}"]
    if isinstance(saved, dict):
        if not isinstance(loaded, dict) or saved.keys() != loaded.keys():
            return [f"{path}: keys {sorted(saved)} != {sorted(loaded) if isinstance(loaded, dict) else loaded}"]
        return [d for key in saved for d in differences(saved[key], loaded[key], f"{path}/{key}")]
    if isinstance(saved, (list, tuple)):
        if not isinstance(loaded, (list, tuple)) or len(saved) != len(loaded):
            return [f"{path}: {saved} != {loaded}"]
        return [d for i, (a, b) in enumerate(zip(saved, loaded)) for d in differences(a, b, f"{path}/{i}")]
    return [] if saved == loaded else [f"{path}: {saved!r} != {loaded!r}"]


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S + 30)
@pytest.mark.parametrize("stage, precision, offload, saved_on, resumed_on, lora", CASES)
def test_resume_on_another_world_size_continues_exactly(stage, precision, offload, saved_on, resumed_on, lora,
                                                        tmp_path):
    common = ["--stage", str(stage), "--precision", precision, "--offload", offload, "--run-dir",
              str(tmp_path / "run"), "--steps", str(STEPS), "--more", str(MORE), *(["--lora"] if lora else [])]
    launch("save", [*common, "--out", str(tmp_path / "saved.pt")], tmp_path / "logs-save", saved_on)
    launch("load", [*common, "--out", str(tmp_path / "loaded.pt")], tmp_path / "logs-load", resumed_on)
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=False)
    if lora:  # the module state holds the adapters only, not the frozen base (nor its tied output matrix)
        states = next((tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}").glob("*model_states.pt"))
        module = torch.load(states, weights_only=False)["module"]
        assert module and all(name.endswith((".lora_A", ".lora_B")) for name in module), sorted(module)

    assert loaded["client_state"] == {"step": STEPS, "tokens_seen": 123, "world_size": saved_on}
    state = saved["state"]
    assert state["steps"] == [STEPS] and state["global_steps"] == STEPS  # the saved state is a trained one
    assert differences(state, loaded["state"]) == []
    assert loaded["uninterrupted"][:STEPS] == saved["losses"], "the reference run does not make the same arithmetic"
    assert loaded["resumed"] == loaded["uninterrupted"][STEPS:]
