"""``hataori pretrain`` end to end on real shards: two CPU processes through the command line.

Every launch goes through ``hataori pretrain --nproc 2`` (torch's elastic launcher, gloo, fp32,
real DeepSpeed engines) with a hard time limit, on a ~0.4M-parameter model and the Debian
Japanese shards of the ``ja_shards`` fixture. References are independent of what they check:
bits per character against the model run on each document alone in a plain loop; resumed and
killed runs against an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import bpc_one_by_one, cpu_env, records, tail, val_documents

from hataori.cli import main as hataori_main

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "train" / "toy.yaml"
LAUNCH_TIMEOUT_S = 150
SEQ_LEN = 64

# The toy preset shrunk for tests: 2 x 2 sequences of 64 tokens a step on 2 processes (no accumulation).
TINY = ["model.vocab_size=4000", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        f"model.max_seq_len={SEQ_LEN}", f"data.seq_len={SEQ_LEN}", "zero.micro_batch_size=2",
        f"zero.global_batch_tokens={2 * 2 * SEQ_LEN}", "schedule.warmup_steps=3", "schedule.min_lr=1e-4",
        "validation.max_tokens=3000"]


def start(run_dir: Path, shards: Path, overrides: list[str], out, *, nproc: int = 2) -> subprocess.Popen:
    """Start ``hataori pretrain`` on ``nproc`` processes, its output to the open file ``out``.

    Nothing may be JIT-compiled: the processes get an empty TORCH_EXTENSIONS_DIR (beside ``out``)
    that must stay absent.
    """
    env = cpu_env(Path(out.name).with_suffix(".torch_extensions"))
    command = [sys.executable, "-m", "hataori.cli", "pretrain", str(TOY), *TINY, *overrides, "--data", str(shards),
               "--run-dir", str(run_dir), "--nproc", str(nproc)]
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def launch(run_dir: Path, shards: Path, overrides: list[str], log: Path, *, nproc: int = 2,
           kill_rank_after_step: tuple[int, int] | None = None) -> int:
    """Run ``hataori pretrain`` on ``nproc`` processes and return its exit code; fail after the time limit.

    ``kill_rank_after_step=(rank, step)`` SIGKILLs that rank's process once rank 0 has logged ``step``.
    """
    with open(log, "w") as out:
        proc = start(run_dir, shards, overrides, out, nproc=nproc)
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        try:
            if kill_rank_after_step is not None:
                rank, step = kill_rank_after_step
                wait_for_step(proc, run_dir, step, log, deadline)
                os.kill(worker_pid(proc.pid, rank), signal.SIGKILL)
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"launch did not finish in {LAUNCH_TIMEOUT_S} s:\n{tail(log)}")
    assert not log.with_suffix(".torch_extensions").exists(), "a C++ extension was compiled"
    return code


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, log: Path, deadline: float) -> None:
    while logged_steps(run_dir).get("train", 0) < step:
        assert proc.poll() is None, f"the run ended before step {step}:\n{tail(log)}"
        assert time.monotonic() < deadline, f"step {step} not reached:\n{tail(log)}"
        time.sleep(0.01)


def worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the launcher's child process that runs ``rank``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under launcher {launcher_pid}")


def logged_steps(run_dir: Path) -> dict[str, int]:
    train = records(run_dir, "train")
    return {"train": max(train, default=0)}


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every TensorBoard scalar of the run, read back with tensorboard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {event.step: event.value for event in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


def test_validation_matches_documents_scored_one_by_one(ja_shards, ja_tokenizer):
    """Packed, masked, split across two ranks: the sums equal each document run alone."""
    from hataori.model import ModelConfig
    from hataori.tokenizer.model import Tokenizer
    from hataori.train.config import ValidationConfig
    from hataori.train.validate import Validator

    torch.manual_seed(0)
    model = ModelConfig(vocab_size=4000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        max_seq_len=SEQ_LEN).build().eval()
    tokenizer = Tokenizer(ja_tokenizer)
    cfg = ValidationConfig(max_tokens=3000, batch_size=3)
    parts = [Validator.build(cfg, [str(ja_shards)], tokenizer, seq_len=SEQ_LEN, rank=rank, world_size=2)
             for rank in (0, 1)]
    results = [part.evaluate(model) for part in parts]  # no process group: each rank's own sum
    docs, eos_id = val_documents(ja_shards, 3000)
    assert results[0].documents == len(docs) >= 3
    assert any(len(doc) > SEQ_LEN for doc in docs), "no document longer than a window"
    assert len(parts[0].inputs) == len(parts[1].inputs) > 1  # padded to the same number of passes

    loss, bpc = bpc_one_by_one(model, docs, eos_id, tokenizer, SEQ_LEN)
    nll = sum(r.nll for r in results)
    assert nll / results[0].tokens == pytest.approx(loss, rel=1e-5)
    assert nll / math.log(2) / results[0].chars == pytest.approx(bpc, rel=1e-5)
    assert results[0].tokens == sum(len(doc) for doc in docs)


@pytest.mark.parametrize("device", ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
                                    "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"])
def test_mfu_peak_of_a_gpu_is_its_most_specific_entry(device):
    """``peak_flops`` takes the first entry whose name the device's contains: a general name listed
    before a more specific one (H100 before H100 PCIe) would give the PCIe card the SXM's peak. The
    reference: the longest listed name the device's name contains."""
    from hataori.train.metrics import PEAK_FLOPS, peak_flops

    names = dict(PEAK_FLOPS)
    longest = max((name for name in names if name in device), key=len)
    assert peak_flops(device, "bf16") == peak_flops(device, "fp16") == names[longest]
    assert peak_flops(device, "fp32") is None  # the tensor-core peak does not apply


def test_mfu_peak_is_unknown_off_the_list():
    from hataori.train.metrics import peak_flops

    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16") is None
    assert peak_flops(None, "bf16") is None  # CPU


# ----------------------------------------------------------------------------- config mistakes


@pytest.mark.parametrize("overrides, nproc, expected", [
    (["zero.global_batch_tokens=384"], 2, "zero.global_batch_tokens: 384 tokens is not a whole number"),
    (["zero.global_batch_tokens=100"], 1, "zero.global_batch_tokens: 100 tokens is not a whole number"),
    (["zero.stagee=2"], 2, "did you mean 'zero.stage'"),
    (["model.vocab_size=32000"], 2, "set model.vocab_size=4000"),
], ids=["batch-for-world-size", "batch-for-sequence", "unknown-key", "vocab-size"])
def test_config_mistakes_are_named(ja_shards, tmp_path, capsys, overrides, nproc, expected):
    run_dir = tmp_path / "run"
    status = hataori_main(["pretrain", str(TOY), *TINY, *overrides, "--data", str(ja_shards), "--run-dir",
                           str(run_dir), "--nproc", str(nproc)])
    assert status == 2
    assert expected in capsys.readouterr().err
    assert not run_dir.exists()


def test_missing_dataset_is_named(tmp_path, capsys):
    missing = tmp_path / "no-such-dataset"
    status = hataori_main(["pretrain", str(TOY), "--data", str(missing), "--run-dir", str(tmp_path / "run"),
                           "--nproc", "2"])
    assert status == 2
    err = capsys.readouterr().err
    assert str(missing / "dataset.json") in err and "hataori data prepare" in err


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_pretrain_two_processes_end_to_end(ja_shards, ja_tokenizer, tmp_path):
    run = tmp_path / "run"
    code = launch(run, ja_shards, ["trainer.max_steps=30", "checkpoint.every_steps=10", "validation.every_steps=10",
                                   "logging.every_steps=5"], tmp_path / "launch.log")
    assert code == 0, tail(tmp_path / "launch.log")

    for name in ("config.yaml", "environment.json", "deepspeed.json", "validation.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "environment.json").read_text())["world_size"] == 2
    assert json.loads((run / "deepspeed.json").read_text())["gradient_accumulation_steps"] == 1
    assert checkpoints(run) == ["step_00000020", "step_00000030"]

    steps, vals = records(run, "train"), records(run, "val")
    assert sorted(steps) == list(range(1, 31)) and sorted(vals) == [0, 10, 20, 30]
    assert all(math.isfinite(v["bpc"]) for v in vals.values())
    assert vals[30]["bpc"] < vals[0]["bpc"] - 0.5, {s: v["bpc"] for s, v in vals.items()}

    tb = scalars(run)
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "mem/rss", "val/loss",
            "val/bpc"} <= set(tb)
    assert "perf/mfu" not in tb  # no known peak on a CPU
    assert sorted(tb["train/loss"]) == [5, 10, 15, 20, 25, 30]
    for step in tb["train/loss"]:
        window = [steps[s] for s in range(step - 4, step + 1)]
        assert tb["train/loss"][step] == pytest.approx(np.mean([r["loss"] for r in window]), rel=1e-6)
        assert tb["train/lr"][step] == pytest.approx(steps[step]["lr"], rel=1e-6)
        tokens_per_s = sum(r["tokens"] for r in window) / sum(r["seconds"] for r in window)
        assert tb["perf/tokens_per_s"][step] == pytest.approx(tokens_per_s, rel=1e-5)
    assert {s: pytest.approx(v["bpc"], rel=1e-6) for s, v in vals.items()} == tb["val/bpc"]
    assert 0.01 < tb["mem/rss"][30] < 8

    # The final validation against the trained weights run on each document alone.
    from hataori.config import load
    from hataori.tokenizer.model import Tokenizer
    from hataori.train.config import TrainConfig

    cfg = load(TrainConfig, [run / "config.yaml"])
    model = cfg.model.build()
    state = torch.load(run / "checkpoints" / "step_00000030" / "mp_rank_00_model_states.pt", weights_only=False)
    model.load_state_dict(state["module"])
    docs, eos_id = val_documents(ja_shards, cfg.validation.max_tokens)
    loss, bpc = bpc_one_by_one(model.eval(), docs, eos_id, Tokenizer(ja_tokenizer), SEQ_LEN)
    assert vals[30]["loss"] == pytest.approx(loss, rel=1e-5)
    assert vals[30]["bpc"] == pytest.approx(bpc, rel=1e-5)
    log = (tmp_path / "launch.log").read_text()
    assert f"validation bits per character: {vals[0]['bpc']:.4f} at step 0 -> {vals[30]['bpc']:.4f}" in log
    assert "kernels: attention sdpa (auto), RMSNorm/RoPE/SwiGLU torch (auto)" in log  # auto on a CPU

    # config.yaml edited after training: the checkpoint's manifest records what trained, and readers refuse.
    from hataori.cli import main as hataori_main

    recorded = (run / "config.yaml").read_text()
    edited = re.sub(r"(?m)^  norm_eps: .*$", "  norm_eps: 0.1",
                    re.sub(r"(?m)^  rope_base: .*$", "  rope_base: 500000.0", recorded))
    assert edited.count("rope_base: 500000.0") == 1 and edited.count("norm_eps: 0.1") == 1
    (run / "config.yaml").write_text(edited)
    for argv in (["export", "hf", str(run), "--output", str(tmp_path / "hf")], ["generate", str(run), "吾輩は"]):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            assert hataori_main(argv) == 2
        assert (f"{run / 'config.yaml'}: does not describe the model that step_00000030 was trained as "
                f"(model.rope_base: config.yaml 500000.0, the checkpoint {cfg.model.rope_base!r}; model.norm_eps: "
                f"config.yaml 0.1, the checkpoint {cfg.model.norm_eps!r})") in err.getvalue(), err.getvalue()
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
@pytest.mark.timeout(4 * LAUNCH_TIMEOUT_S + 60)
def test_resume_and_killed_rank_continue_the_uninterrupted_run(ja_shards, tmp_path):
    """ZeRO-2, 8 steps with a checkpoint every 3. The same run in pieces: 3 steps and a clean stop;
    a fresh launch resumes, one rank is SIGKILLed after step 4 and the launcher ends the other; a
    third launch resumes from the last complete checkpoint. Losses, learning rates, gradient norms
    and token counts equal the uninterrupted run's exactly (fp32), through the real packed loader."""
    common = ["trainer.max_steps=8", "checkpoint.every_steps=3", "validation.every_steps=0", "logging.every_steps=1",
              "zero.stage=2"]
    reference_run = tmp_path / "reference"
    assert launch(reference_run, ja_shards, common, tmp_path / "reference.log") == 0, tail(tmp_path / "reference.log")
    reference = records(reference_run, "train")
    assert sorted(reference) == list(range(1, 9))

    def same_as_reference(steps: dict[int, dict]) -> None:
        for step, record in steps.items():
            for key in ("loss", "lr", "grad_norm", "tokens_seen"):
                assert record[key] == reference[step][key], f"step {step} {key}"

    run = tmp_path / "run"
    assert launch(run, ja_shards, [*common, "trainer.launch_steps=3"], tmp_path / "first.log") == 0
    assert sorted(records(run, "train")) == [1, 2, 3] and checkpoints(run) == ["step_00000003"]
    same_as_reference(records(run, "train"))

    began = time.monotonic()
    code = launch(run, ja_shards, common, tmp_path / "killed.log", kill_rank_after_step=(1, 4))
    assert code != 0, tail(tmp_path / "killed.log")
    assert time.monotonic() - began < LAUNCH_TIMEOUT_S
    killed = records(run, "train")
    assert 4 in killed
    same_as_reference(killed)
    saved = [int(name.split("_")[1]) for name in checkpoints(run) if name.endswith(tuple("0123456789"))]
    last_complete = max(saved)
    assert last_complete in (3, 6), checkpoints(run)  # 6 only if the kill landed after that save

    assert launch(run, ja_shards, common, tmp_path / "resumed.log") == 0, tail(tmp_path / "resumed.log")
    assert f"resuming after step {last_complete}" in (tmp_path / "resumed.log").read_text()
    resumed = records(run, "train")
    assert sorted(resumed) == list(range(1, 9))
    same_as_reference(resumed)
    assert not any(name.endswith(".incomplete") for name in checkpoints(run))

    tb = scalars(run)["train/loss"]  # the killed launch's steps after the checkpoint are purged
    assert sorted(tb) == list(range(1, 9))
    assert tb == {step: pytest.approx(reference[step]["loss"], rel=1e-6) for step in range(1, 9)}


# ----------------------------------------------------------------------------- faults


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(3 * LAUNCH_TIMEOUT_S)
def test_one_owner_per_run_folder_and_ranks_die_with_the_launcher(ja_shards, tmp_path):
    """A second launch into a running run's folder is refused, naming the holder; kill -9 of the
    launcher takes both ranks with it; the next launch takes the dead launcher's lock over and resumes."""
    import socket

    run = tmp_path / "run"
    common = ["trainer.max_steps=300", "checkpoint.every_steps=2", "validation.every_steps=0", "logging.every_steps=1"]
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:
        first = start(run, ja_shards, common, out)
        try:
            wait_for_step(first, run, 3, first_log, time.monotonic() + LAUNCH_TIMEOUT_S)
            ranks = [worker_pid(first.pid, rank) for rank in (0, 1)]
            assert launch(run, ja_shards, common, tmp_path / "second.log") == 2
            refused = (tmp_path / "second.log").read_text()
            assert f"hataori: error: {run} is in use by PID {first.pid} on {socket.gethostname()}" in refused
            assert f"remove {run / 'run.lock'}" in refused
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
            deadline = time.monotonic() + 15
            while any(map(running, ranks)):
                assert time.monotonic() < deadline, f"a rank outlived its launcher:\n{tail(first_log)}"
                time.sleep(0.05)
        finally:
            first.kill()
    last = max(int(name.split("_")[1]) for name in checkpoints(run) if name.endswith(tuple("0123456789")))
    assert launch(run, ja_shards, [*common, "trainer.launch_steps=2"], tmp_path / "third.log") == 0
    third = (tmp_path / "third.log").read_text()
    assert f"{run / 'run.lock'}: held by PID {first.pid} on this host, which is no longer running; taking" in third
    assert f"resuming after step {last}" in third
    assert not (run / "run.lock").exists()  # released when the launch ended


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.timeout(5 * LAUNCH_TIMEOUT_S)
def test_disk_full_during_a_checkpoint_save_loses_nothing(ja_shards, tmp_path):
    """The run folder on a tmpfs with room for one checkpoint: the second save fails with a message
    naming the checkpoint and the free space, the first stays verified; a relaunch with the disk still
    full clears the incomplete save before writing anything and fails the same way; with room again
    the run resumes and steps 3-4 equal an uninterrupted run's."""
    import subprocess as sp

    from hataori.checkpoint.manifest import verify

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    common = ["trainer.max_steps=4", "checkpoint.every_steps=2", "validation.every_steps=0", "logging.every_steps=1"]
    reference = tmp_path / "reference"
    assert launch(reference, ja_shards, common, tmp_path / "reference.log", nproc=1) == 0
    one = checkpoint_bytes(reference / "checkpoints" / "step_00000002")
    rest = checkpoint_bytes(reference) - checkpoint_bytes(reference / "checkpoints")
    run = tmp_path / "run"
    run.mkdir()
    if sp.run(["mount", "-t", "tmpfs", "-o", f"size={rest + one * 3 // 2}", "tmpfs", str(run)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        for attempt in ("full", "still-full"):
            log = tmp_path / f"{attempt}.log"
            assert launch(run, ja_shards, common, log, nproc=1) == 2, tail(log)
            text = log.read_text()
            assert f"hataori: error: {run}/checkpoints/step_00000004.incomplete: writing the checkpoint failed" in text
            assert "bytes free on that filesystem" in text
            assert checkpoints(run) == ["step_00000002", "step_00000004.incomplete"]
            assert verify(run / "checkpoints" / "step_00000002") == []
        sp.run(["mount", "-o", f"remount,size={rest + one * 4}", str(run)], check=True)
        assert launch(run, ja_shards, common, tmp_path / "room.log", nproc=1) == 0, tail(tmp_path / "room.log")
        assert "resuming after step 2" in (tmp_path / "room.log").read_text()
        resumed, expected = records(run, "train"), records(reference, "train")
        assert [resumed[step]["loss"] for step in (3, 4)] == [expected[step]["loss"] for step in (3, 4)]
    finally:
        sp.run(["umount", "-l", str(run)])


@pytest.mark.slow
@pytest.mark.timeout(3 * LAUNCH_TIMEOUT_S)
def test_disk_full_while_the_run_is_recorded_is_an_error_naming_the_run_folder(ja_shards, tmp_path):
    """The run folder on a tmpfs with pages for the lock, config.yaml and environment.json only: writing
    provenance.json fails with a message naming the run folder and leaves no temporary file."""
    import subprocess as sp

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    common = ["trainer.max_steps=1", "schedule.warmup_steps=0", "validation.every_steps=0"]
    reference = tmp_path / "reference"
    assert launch(reference, ja_shards, common, tmp_path / "reference.log", nproc=1) == 0
    page = 4096
    pages = 1 + sum(-(-(reference / name).stat().st_size // page) for name in ("config.yaml", "environment.json"))
    run = tmp_path / "run"
    run.mkdir()
    if sp.run(["mount", "-t", "tmpfs", "-o", f"size={pages * page}", "tmpfs", str(run)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        log = tmp_path / "full.log"
        assert launch(run, ja_shards, common, log, nproc=1) == 2, tail(log)
        assert f"hataori: error: {run}: the disk is full (No space left on device)" in log.read_text(), tail(log)
        assert "Traceback" not in log.read_text()
        assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "environment.json"]
    finally:
        sp.run(["umount", "-l", str(run)])


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_model_whose_states_cannot_fit_is_refused_before_the_run_folder_is_touched(nproc, ja_shards, tmp_path,
                                                                                    capsys):
    """Width 32768 and 128 layers (1.6e12 parameters, 16 bytes each in fp32 before ZeRO shards anything):
    refused in this process, before any rank starts, the run folder never made."""
    run = tmp_path / "run"
    huge = ["model.d_model=32768", "model.n_heads=256", "model.n_kv_heads=256", "model.n_layers=128"]
    argv = ["pretrain", str(TOY), *TINY, *huge, "--data", str(ja_shards), "--run-dir", str(run), "--nproc", str(nproc)]
    assert hataori_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hataori: error: zero.stage: the weights, gradients and optimizer states of "), err
    assert f"under ZeRO-1 in fp32 on {nproc} process" in err and "GiB on this host" in err
    assert "`hataori plan` with this config shows what fits" in err
    assert not run.exists()


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S)
def test_resuming_with_another_shape_says_what_differs(ja_shards, tmp_path, capsys):
    """Checked before any rank starts (--nproc 2, in this process) and by the rank itself (one process)."""
    run = tmp_path / "run"
    common = ["trainer.max_steps=4", "trainer.launch_steps=2", "checkpoint.every_steps=2", "validation.every_steps=0"]
    assert launch(run, ja_shards, common, tmp_path / "first.log", nproc=1) == 0, tail(tmp_path / "first.log")
    changed = [*common, "model.n_layers=3", "zero.stage=2"]
    expected = (f"hataori: error: {run}/checkpoints/step_00000002 was saved by a run that differs from this one:\n"
                "  model.n_layers: checkpoint 2, this run 3\n  zero.stage: checkpoint 1, this run 2\n")
    argv = ["pretrain", str(TOY), *TINY, *changed, "--data", str(ja_shards), "--run-dir", str(run), "--nproc", "2"]
    assert hataori_main(argv) == 2
    assert expected in capsys.readouterr().err
    # One process trains in the launching process: run it apart, so that this one never joins a group.
    assert launch(run, ja_shards, changed, tmp_path / "one.log", nproc=1) == 2
    assert expected in (tmp_path / "one.log").read_text()
    assert checkpoints(run) == ["step_00000002"]


@pytest.mark.slow
@pytest.mark.timeout(6 * LAUNCH_TIMEOUT_S)
@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(ja_shards, tmp_path, saved_on, resumed_on):
    """ZeRO-2 and the real packed loader: 3 steps on one number of processes, the rest on another.
    The same global batches, so token counts and learning rates equal the uninterrupted run's exactly;
    losses and gradient norms to float32 rounding (one process accumulates two micro-batches where two
    processes average over the group)."""
    common = ["trainer.max_steps=6", "checkpoint.every_steps=3", "validation.every_steps=0", "logging.every_steps=1",
              "zero.stage=2"]
    reference_run = tmp_path / "reference"
    assert launch(reference_run, ja_shards, common, tmp_path / "reference.log", nproc=resumed_on) == 0
    reference = records(reference_run, "train")
    run = tmp_path / "run"
    assert launch(run, ja_shards, [*common, "trainer.launch_steps=3"], tmp_path / "first.log", nproc=saved_on) == 0
    assert launch(run, ja_shards, common, tmp_path / "resumed.log",
                  nproc=resumed_on) == 0, tail(tmp_path / "resumed.log")
    log = (tmp_path / "resumed.log").read_text()
    assert f"step_00000003 was saved by {saved_on} processes; resharding it onto {resumed_on}" in log
    assert "resuming after step 3" in log
    resumed = records(run, "train")
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step]["tokens_seen"] == reference[step]["tokens_seen"]
        assert resumed[step]["lr"] == reference[step]["lr"]
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), step
        assert resumed[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-4), step


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S)
def test_a_diverged_run_fails_and_keeps_its_good_checkpoints(ja_shards, tmp_path):
    """optim.lr=1e4 wrecks the weights at the first update; from then on every step overflows and is
    skipped. The launch fails (a non-zero exit that Slurm and scripts see) after
    trainer.max_skipped_steps of them, and writes no checkpoint while they run."""
    log = tmp_path / "run.log"
    overrides = ["optim.lr=1e4", "trainer.max_steps=40", "trainer.max_skipped_steps=4", "checkpoint.every_steps=2",
                 "validation.every_steps=0", "logging.every_steps=1"]
    assert launch(tmp_path / "run", ja_shards, overrides, log) != 0
    text = log.read_text()
    steps = records(tmp_path / "run", "train")
    first_skipped = min(step for step, record in steps.items() if not math.isfinite(record["grad_norm"]))
    stopped = first_skipped + 3
    assert max(steps) == stopped
    assert (f"hataori: error: step {stopped}: loss" in text
            and "4 steps in a row skipped for non-finite gradients (trainer.max_skipped_steps=4)" in text), tail(log)
    saved = [int(name.split("_")[1]) for name in checkpoints(tmp_path / "run")]
    assert saved and max(saved) < first_skipped
