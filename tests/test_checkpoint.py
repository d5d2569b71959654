"""Verified checkpoints and guarded training, on two real processes with real DeepSpeed engines.

Faults are injected into real checkpoints: for each kind of file (module states, a rank's optimizer
partition, a rank's loader and RNG state, the manifest) each damage (truncated, a flipped bit,
emptied, deleted). Resuming must name the file, set the checkpoint aside without deleting a byte,
fall back to the previous one, and finish with the losses of an uninterrupted run from there.
NaN injected into the loss (ZeRO-0: the update is applied) or into a gradient (ZeRO-1: the step
is skipped) must stop the run with an error and leave the last good checkpoint intact; a NaN weight under
ZeRO-2 and -3 (every step skipped) must stop it by the skip limit or at the final save, naming the weight.

The worker is this file: ``python tests/test_checkpoint.py <mode> ...`` on two processes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SEQ_LEN, TokenStream, after_each_step, build_engine
from ranks import launch_ranks, log_tails

LAUNCH_TIMEOUT_S = 240
FILES = {"model": "mp_rank_00_model_states.pt", "optimizer": "zero_pp_rank_1_mp_rank_00_optim_states.pt",
         "loader": "rank_00000.pt", "manifest": "manifest.json"}
DAMAGES = ("truncate", "bitflip", "empty", "delete")
SCENARIOS = [f"{kind}-{damage}" for kind in FILES for damage in DAMAGES]


def damage(path: Path, how: str) -> None:
    """Damage one file in place."""
    if how == "delete":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "bitflip":
        data = bytearray(path.read_bytes())
        data[len(data) * 2 // 3] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        raise ValueError(how)


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_damaged_checkpoints_fall_back_to_the_previous_one(tmp_path):
    out = tmp_path / "faults.json"
    codes = launch_ranks(__file__, ["faults", "--dir", str(tmp_path / "runs"), "--out", str(out)], tmp_path / "logs",
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
    codes = launch_ranks(__file__, ["nan", "--dir", str(tmp_path / "run"), "--out", str(out), "--stage", str(stage),
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
    codes = launch_ranks(__file__, ["nan", "--dir", str(tmp_path / "run"), "--out", str(out), "--stage", str(stage),
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
    codes = launch_ranks(__file__, ["callbacks", "--dir", str(tmp_path / "run"), "--out", str(out)],
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
    codes = launch_ranks(__file__, ["nan", "--dir", str(tmp_path / "run"), "--out", str(out), "--stage", "1",
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


# ----------------------------------------------------------------------------- workers


def train(run_dir: Path, *, stage: int, max_steps: int, max_skipped: int = 10, before=None,
          losses: dict[int, float] | None = None) -> dict[int, float]:
    """Train with checkpoints every 2 steps in ``run_dir``; the losses by step (into ``losses``)."""
    import torch.distributed as dist

    from hataori.checkpoint.checkpointer import CheckpointConfig, Checkpointer
    from hataori.train.trainer import Trainer, TrainerConfig

    engine = build_engine(stage, micro_batch=2, global_batch_tokens=2 * 2 * SEQ_LEN * dist.get_world_size(),
                          total_steps=6, build_model=True)
    checkpointer = Checkpointer(CheckpointConfig(every_steps=2, keep_last=3), run_dir / "checkpoints", engine,
                                identity={"test": "faults"})
    losses = {} if losses is None else losses
    trainer = Trainer(TrainerConfig(max_steps=max_steps, max_skipped_steps=max_skipped),
                      engine=engine, loader=TokenStream(seed=7, rank=dist.get_rank(), rows=2),
                      checkpointer=checkpointer,
                      callbacks=[after_each_step(lambda m: losses.__setitem__(m.step, m.loss))])
    if before is not None:
        before(trainer)
    try:
        trainer.fit()
    finally:
        engine.destroy()
    return losses


def worker_faults(args) -> None:
    import torch.distributed as dist

    from hataori.checkpoint.manifest import verify

    rank = dist.get_rank()
    root = Path(args.dir)
    reference = train(root / "reference", stage=1, max_steps=6)
    saved = root / "reference" / "checkpoints"
    results = {"reference": reference}
    for scenario in SCENARIOS:
        kind, how = scenario.split("-")
        run = root / scenario
        if rank == 0:
            for step in (2, 4):
                shutil.copytree(saved / f"step_{step:08d}", run / "checkpoints" / f"step_{step:08d}")
            damage(run / "checkpoints" / "step_00000004" / FILES[kind], how)
        dist.barrier()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            losses = train(run, stage=1, max_steps=6)
        folder = run / "checkpoints"
        aside = folder / "step_00000004.damaged"
        intact = all((aside / p.name).read_bytes() == p.read_bytes()
                     for p in (saved / "step_00000004").iterdir() if p.name != FILES[kind])
        results[scenario] = {
            "resumed": min(losses) - 1, "losses": losses, "printed": printed.getvalue(),
            "aside": sorted(p.name for p in folder.iterdir() if p.name.endswith(".damaged")), "aside_intact": intact,
            "verified_after": sorted(p.name for p in folder.iterdir() if p.name.startswith("step_") and not verify(p))}
        dist.barrier()
    # Every checkpoint damaged: the run stops instead of starting again from step 0.
    from hataori.checkpoint.manifest import CheckpointDamaged

    run = root / "all-damaged"
    if rank == 0:
        for step in (2, 4):
            shutil.copytree(saved / f"step_{step:08d}", run / "checkpoints" / f"step_{step:08d}")
            damage(run / "checkpoints" / f"step_{step:08d}" / FILES["model"], "bitflip")
    dist.barrier()
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(CheckpointDamaged) as stopped:
        train(run, stage=1, max_steps=6)
    results["all-damaged"] = {"error": str(stopped.value),
                              "left": sorted(p.name for p in (run / "checkpoints").iterdir())}
    if rank == 0:  # a checkpoint saved before checkpoints had manifests, adopted
        from hataori.cli import main as hataori_main

        old = root / "adopted" / "checkpoints" / "step_00000002"
        shutil.copytree(saved / "step_00000002", old)
        (old / "manifest.json").unlink()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            refused = hataori_main(["checkpoint", "verify", str(old)])
            adopted = hataori_main(["checkpoint", "verify", str(old), "--adopt"])
        written, original = (json.loads((p / "manifest.json").read_text()) for p in (old, saved / "step_00000002"))
        # One rank's files gone as well: no manifest is written for what cannot be resumed.
        lost = root / "lost" / "checkpoints" / "step_00000002"
        shutil.copytree(saved / "step_00000002", lost)
        (lost / "manifest.json").unlink()
        (lost / "rank_00001.pt").unlink()
        for name in [p.name for p in lost.iterdir() if "zero_pp_rank_1_" in p.name]:
            (lost / name).unlink()
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            lost_code = hataori_main(["checkpoint", "verify", str(lost), "--adopt"])
        results["adopted"] = {"codes": [refused, adopted, lost_code], "printed": printed.getvalue(),
                              "same": [written[k] == original[k] for k in ("step", "world_size", "files")],
                              "lost": errors.getvalue(), "lost_files": sorted(p.name for p in lost.iterdir())}
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))


def worker_nan(args) -> None:
    import torch.distributed as dist

    from hataori.checkpoint.manifest import verify
    from hataori.checkpoint.states import CheckpointWeights
    from hataori.train.trainer import TrainingFailed

    run = Path(args.dir)
    if args.inject.startswith("weight"):
        return worker_nan_weight(args)
    train(run.with_name("reference"), stage=args.stage, max_steps=4)

    def inject(trainer) -> None:
        engine = trainer.engine
        if args.inject == "loss":
            forward = engine.forward
            engine.forward = lambda *a, **k: forward(*a, **k) * (float("nan") if trainer.step >= 4 else 1.0)
        else:  # from step 5 on, or (stop) in steps 5 and 6 only, with a stop requested after step 5
            bad = range(4, 6) if args.inject == "stop" else range(4, 1000)
            weight = next(p for name, p in engine.module.named_parameters() if name.endswith("mlp.w_gate.weight"))
            weight.register_hook(lambda grad: grad * float("nan") if trainer.step in bad else grad)
            if args.inject == "stop":
                trainer.callbacks.append(after_each_step(lambda m: trainer.request_stop() if m.step == 5 else None))

    steps: dict[int, float] = {}
    if args.inject == "stop":
        train(run, stage=args.stage, max_steps=8, max_skipped=3, before=inject, losses=steps)
        if dist.get_rank() == 0:
            folder = run / "checkpoints"
            names = sorted(p.name for p in folder.iterdir() if p.name.startswith("step_"))
            Path(args.out).write_text(json.dumps({"steps": sorted(steps), "checkpoints": names,
                                                  "problems": [x for name in names for x in verify(folder / name)]}))
        return
    with pytest.raises(TrainingFailed) as failed:
        train(run, stage=args.stage, max_steps=8, max_skipped=3, before=inject, losses=steps)
    dist.barrier()
    if dist.get_rank() == 0:
        folder = run / "checkpoints"
        names = sorted(p.name for p in folder.iterdir() if p.name.startswith("step_"))
        theirs = CheckpointWeights(folder / "step_00000004").state_dict()
        ours = CheckpointWeights(run.with_name("reference") / "checkpoints" / "step_00000004").state_dict()
        equal = theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
        Path(args.out).write_text(json.dumps({
            "error": str(failed.value), "checkpoints": names, "steps": sorted(steps),
            "problems": [problem for name in names for problem in verify(folder / name)],
            "weights_at_4_equal_reference": equal}))


def worker_callbacks(args) -> None:
    """Record every callback call over a fresh launch of 4 steps, a resumed one up to 6, and one whose callback
    raises at step 7 of 8."""
    import torch.distributed as dist

    from hataori.train.trainer import Callback

    events: list = []

    class Record(Callback):
        def pre_train(self, trainer, step):
            events.append(["pre_train", step])

        def post_step(self, trainer, metrics):
            events.append(["post_step", metrics.step])
            if metrics.step == 7:
                raise RuntimeError("a callback failed")

        def post_checkpoint_saved(self, trainer, step, path):
            events.append(["post_checkpoint_saved", step, Path(path).name, (Path(path) / "manifest.json").is_file()])

        def close(self, trainer):
            events.append(["close", trainer.step])

    run = Path(args.dir)
    for max_steps in (4, 6, 8):
        try:
            train(run, stage=1, max_steps=max_steps, before=lambda trainer: trainer.callbacks.append(Record()))
        except RuntimeError as err:
            events.append(["raised", str(err)])
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(events))


def worker_nan_weight(args) -> None:
    """From step 5 on one weight holds NaN (in rank 0's partition under ZeRO-3): every step overflows
    and is skipped. ``weight``: 8 steps, the skip limit (3) stops step 7; ``weight-last``: 6 steps, the run
    ends within the limit and its final save is refused. Both name the weight and save nothing after step 4."""
    import torch.distributed as dist

    from hataori.checkpoint.manifest import verify
    from hataori.train.trainer import TrainingFailed

    run = Path(args.dir)

    def inject(trainer) -> None:
        engine, forward = trainer.engine, trainer.engine.forward
        name, weight = next((n, p) for n, p in engine.module.named_parameters() if n.endswith("mlp.w_gate.weight"))
        local = getattr(weight, "ds_tensor", weight)

        def poisoned(*a, **k):
            if trainer.step == 4:
                with torch.no_grad():
                    if weight.data.numel():  # ZeRO-0/1/2, and a small ZeRO-3 parameter that stays gathered
                        weight.data.view(-1)[0] = float("nan")
                    if local is not weight and dist.get_rank() == 0:
                        local.view(-1)[0] = float("nan")
            return forward(*a, **k)

        engine.forward = poisoned
        found["weight"] = name

    found: dict = {}
    with pytest.raises(TrainingFailed) as failed:
        train(run, stage=args.stage, max_steps=6 if args.inject == "weight-last" else 8, max_skipped=3,
              before=inject, losses=(steps := {}))
    dist.barrier()
    if dist.get_rank() == 0:
        folder = run / "checkpoints"
        names = sorted(p.name for p in folder.iterdir() if p.name.startswith("step_"))
        Path(args.out).write_text(json.dumps({
            **found, "error": str(failed.value), "checkpoints": names, "steps": sorted(steps),
            "problems": [problem for name in names for problem in verify(folder / name)]}))


def main() -> None:
    from hataori.train.zero import init_distributed, shutdown_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["faults", "nan", "callbacks"])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--inject", default="loss")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    init_distributed()
    {"faults": worker_faults, "nan": worker_nan, "callbacks": worker_callbacks}[args.mode](args)
    shutdown_distributed()


if __name__ == "__main__":
    main()
