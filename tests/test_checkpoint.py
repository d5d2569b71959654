"""Verified checkpoints and guarded training, on two real processes with real DeepSpeed engines.

Faults are injected into real checkpoints: for each kind of file (module states, a rank's optimizer
partition, a rank's loader and RNG state, the manifest) each damage (truncated, a flipped bit,
emptied, deleted). Resuming must name the file, set the checkpoint aside without deleting a byte,
fall back to the previous one, and finish with the losses of an uninterrupted run from there.
NaN injected into the loss (ZeRO-0: the update is applied) or into a gradient (ZeRO-1: the step
is skipped) must stop the run with an error and leave the last good checkpoint intact; a NaN weight under
ZeRO-2 and -3 (every step skipped) must stop it by the skip limit or at the final save, naming the weight.

The worker is tests/checkpoint_worker.py: ``python tests/checkpoint_worker.py <mode> ...`` on two processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from checkpoint_worker import FILES, SCENARIOS, damage
from ranks import launch_ranks, log_tails

LAUNCH_TIMEOUT_S = 240
WORKER = Path(__file__).with_name("checkpoint_worker.py")
# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_damaged_checkpoints_fall_back_to_the_previous_one(tmp_path):
    out = tmp_path / "faults.json"
    codes = launch_ranks(str(WORKER), ["faults", "--dir", str(tmp_path / "runs"), "--out", str(out)], tmp_path / "logs",
                         2, LAUNCH_TIMEOUT_S)
    assert codes == [0, 0], log_tails(tmp_path / "logs")
    results = json.loads(out.read_text())
    reference = results.pop("reference")
    adopted = results.pop("adopted")
    assert adopted["codes"] == [1, 0, 2] and adopted["same"] == [True, True, True], adopted
    assert "had no manifest; one was written from its files as they are now" in adopted["printed"]
    lost = tmp_path / "runs" / "lost" / "checkpoints" / "step_00000002"
    assert adopted["lost"].startswith(f"hataori: error: {lost}: was saved by 2 processes but has no rank_00001.pt, "
                                      "zero_pp_rank_1_mp_rank_00_optim_states.pt: a manifest would vouch"), adopted
    assert "manifest.json" not in adopted["lost_files"]
    every = results.pop("all-damaged")
    assert every["error"] == (f"{tmp_path}/runs/all-damaged/checkpoints: no checkpoint verifies; set aside as damaged: "
                              "step_00000002.damaged, step_00000004.damaged. Run `hataori checkpoint verify` on the "
                              "run for details; to train again from step 0 in this folder set checkpoint.resume=false")
    assert every["left"] == ["step_00000002.damaged", "step_00000004.damaged"]  # nothing new was saved
    assert sorted(results) == sorted(SCENARIOS)
    for scenario, found in results.items():
        kind, how = scenario.split("-")
        assert found["resumed"] == 2, scenario
        # Steps 3-6 after falling back equal the uninterrupted run's, exactly (fp32).
        assert found["losses"] == {step: reference[step] for step in ("3", "4", "5", "6")}, scenario
        # The damaged checkpoint is set aside, whole: every other file byte-identical to what was saved.
        assert found["aside"] == ["step_00000004.damaged"], scenario
        assert found["aside_intact"], scenario
        assert f"step_00000004/{FILES[kind]}" in found["printed"] and "set aside" in found["printed"], scenario
        reason = {"delete": "missing", "empty": "0 bytes", "truncate": "bytes, the manifest says",
                  "bitflip": "checksum"}[how] if kind != "manifest" else {"delete": "missing"}.get(how, "damaged")
        assert reason in found["printed"], (scenario, found["printed"])
        assert found["verified_after"] == ["step_00000002", "step_00000004", "step_00000006"], scenario


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
@pytest.mark.parametrize("stage, inject", [(0, "loss"), (1, "grad")])
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(stage, inject, tmp_path):
    """From step 5 on, NaN in the loss (ZeRO-0 applies the update: stop at once) or in one gradient
    (ZeRO-1 skips the step: stop after trainer.max_skipped_steps=3, and write no checkpoint meanwhile)."""
    out = tmp_path / "nan.json"
    codes = launch_ranks(str(WORKER), ["nan", "--dir", str(tmp_path / "run"), "--out", str(out), "--stage", str(stage),
                                    "--inject", inject], tmp_path / "logs", 2, LAUNCH_TIMEOUT_S)
    assert codes == [0, 0], log_tails(tmp_path / "logs")
    found = json.loads(out.read_text())
    stopped_at = 5 if inject == "loss" else 7
    assert found["error"].startswith(f"step {stopped_at}: loss"), found["error"]
    assert "training stopped without saving; checkpoint step 4 holds the last good weights" in found["error"]
    health = "holds NaN or inf" if inject == "loss" else "the weights are finite: the loss or the gradients overflowed"
    assert health in found["error"], found["error"]
    assert found["steps"] == list(range(1, stopped_at + 1))
    assert found["checkpoints"] == ["step_00000002", "step_00000004"]
    assert found["problems"] == []
    assert found["weights_at_4_equal_reference"]


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
@pytest.mark.parametrize("stage, inject", [(3, "weight"), (3, "weight-last"), (2, "weight")])
def test_a_nan_weight_stops_the_run_under_every_zero_stage_and_is_never_saved(stage, inject, tmp_path):
    """A weight turned NaN after step 4: ZeRO-2 and -3 skip every step from then on. The skip limit stops the
    run, or (a run that ends first) its final save is refused; both name the weight, and no checkpoint after
    step 4 is written."""
    out = tmp_path / "nan.json"
    codes = launch_ranks(str(WORKER), ["nan", "--dir", str(tmp_path / "run"), "--out", str(out), "--stage", str(stage),
                                    "--inject", inject], tmp_path / "logs", 2, LAUNCH_TIMEOUT_S)
    assert codes == [0, 0], log_tails(tmp_path / "logs")
    found = json.loads(out.read_text())
    stopped_at = 6 if inject == "weight-last" else 7
    assert found["steps"] == list(range(1, stopped_at + 1))
    assert found["error"].startswith(f"step {stopped_at}: "), found["error"]
    assert f"weight {found['weight']} holds NaN or inf" in found["error"], found["error"]
    assert "training stopped without saving; checkpoint step 4 holds the last good weights" in found["error"]
    if inject == "weight":
        assert "3 steps in a row skipped for non-finite gradients" in found["error"], found["error"]
    assert found["checkpoints"] == ["step_00000002", "step_00000004"]
    assert found["problems"] == []


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_callbacks_are_called_at_their_points_and_closed_on_an_error(tmp_path):
    """pre_train with the step a launch starts from (after resuming), post_step after every step,
    post_checkpoint_saved once each checkpoint (every 2 steps) is complete, close at the end, by an error too."""
    out = tmp_path / "events.json"
    codes = launch_ranks(str(WORKER), ["callbacks", "--dir", str(tmp_path / "run"), "--out", str(out)],
                         tmp_path / "logs", 2, LAUNCH_TIMEOUT_S)
    assert codes == [0, 0], log_tails(tmp_path / "logs")
    saved = lambda step: ["post_checkpoint_saved", step, f"step_{step:08d}", True]
    assert json.loads(out.read_text()) == [
        ["pre_train", 0], ["post_step", 1], ["post_step", 2], saved(2), ["post_step", 3], ["post_step", 4], saved(4),
        ["close", 4],
        ["pre_train", 4], ["post_step", 5], ["post_step", 6], saved(6), ["close", 6],
        ["pre_train", 6], ["post_step", 7], ["close", 7], ["raised", "a callback failed"]]


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_a_stop_during_skipped_steps_waits_for_the_next_applied_step(tmp_path):
    """ZeRO-1, NaN in a gradient in steps 5 and 6 (skipped), a stop requested after step 5 and a
    checkpoint due after step 6: both wait for step 7, the first applied one, which is saved."""
    out = tmp_path / "stop.json"
    codes = launch_ranks(str(WORKER), ["nan", "--dir", str(tmp_path / "run"), "--out", str(out), "--stage", "1",
                                    "--inject", "stop"], tmp_path / "logs", 2, LAUNCH_TIMEOUT_S)
    assert codes == [0, 0], log_tails(tmp_path / "logs")
    found = json.loads(out.read_text())
    assert found["steps"] == list(range(1, 8))
    assert found["checkpoints"] == ["step_00000002", "step_00000004", "step_00000007"]
    assert found["problems"] == []


def test_verify_command_reports_each_checkpoint(tmp_path, capsys):
    """`hataori checkpoint verify` on a folder of plain files with manifests written as a save writes them."""
    import binascii

    from hataori.checkpoint.manifest import MANIFEST, MANIFEST_FORMAT, checksum
    from hataori.cli import main

    folder = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        ckpt = folder / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "a.pt").write_bytes(os.urandom(1000 + step))
        files = {"a.pt": checksum(ckpt / "a.pt")}
        body = {"format": MANIFEST_FORMAT, "step": step, "world_size": 1, "identity": {}, "files": files}
        crc = binascii.crc32(json.dumps(body, sort_keys=True).encode())  # the manifest's checksum of itself
        (ckpt / MANIFEST).write_text(json.dumps({**body, "crc32": f"{crc:08x}"}))
    assert main(["checkpoint", "verify", str(tmp_path / "run")]) == 0
    assert "2 of 2 checkpoints verified" in capsys.readouterr().out
    damage(folder / "step_00000004" / "a.pt", "bitflip")
    assert main(["checkpoint", "verify", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert f"{folder}/step_00000004: DAMAGED\n  {folder}/step_00000004/a.pt: checksum" in out
    assert "1 of 2 checkpoints verified" in out
    assert main(["checkpoint", "verify", str(folder / "step_00000002")]) == 0


def test_checksum_matches_an_independent_crc(tmp_path):
    import binascii

    from hataori.checkpoint.manifest import CHUNK_BYTES, checksum

    data = np.random.default_rng(0).bytes(CHUNK_BYTES + 12345)  # more than one chunk
    (tmp_path / "f").write_bytes(data)
    assert checksum(tmp_path / "f") == {"bytes": len(data), "crc32": f"{binascii.crc32(data):08x}"}
