"""The workers of tests/test_checkpoint.py, run on two processes: ``python tests/checkpoint_worker.py MODE --dir DIR
--out FILE [--stage N] [--inject WHAT]``. ``faults``: every damage of every kind of checkpoint file, resumed;
``nan``: NaN in the loss, a gradient or a weight; ``callbacks``: every callback call recorded. Each writes what it
found to FILE (rank 0) for the test to check."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import SEQ_LEN, TokenStream, after_each_step, build_engine

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
    from hataori.train.zero import init_distributed, leave_process, shutdown_distributed

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
    leave_process(0)  # no finalization (its docstring)


if __name__ == "__main__":
    main()
