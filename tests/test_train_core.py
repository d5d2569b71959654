"""Optimizer groups, LR schedules against their closed forms, the generated DeepSpeed config, the
batch arithmetic and its errors, and the run folder records. Single process, no process group."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import tiny_config

from hataori.checkpoint.record import git_commit, record_run
from hataori.config import load
from hataori.errors import ConfigError
from hataori.train.optim import OptimConfig, ScheduleConfig, lr_at
from hataori.train.zero import ZeroConfig, deepspeed_config, grad_accum_steps

PEAK, MIN, TOTAL = 6e-4, 6e-5, 1000


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("step, expected", [
    (0, PEAK * 1 / 100),
    (49, PEAK * 50 / 100),
    (99, PEAK),  # the last warmup step runs at the peak
    (100, PEAK),  # cosine starts at the peak
    (100 + 450, MIN + (PEAK - MIN) * 0.5),  # half way through the cosine
    (100 + 225, MIN + (PEAK - MIN) * (1 + math.cos(math.pi / 4)) / 2),
    (999, MIN + (PEAK - MIN) * (1 + math.cos(math.pi * 899 / 900)) / 2),
    (1000, MIN),
    (5000, MIN),
])
def test_cosine_schedule_matches_closed_form(step, expected):
    schedule = ScheduleConfig(kind="cosine", warmup_steps=100, min_lr=MIN)
    assert lr_at(step, schedule=schedule, peak_lr=PEAK, total_steps=TOTAL) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("shape, fraction_done, factor", [
    ("linear", 0.25, 0.75),
    ("cosine", 0.25, (1 + math.cos(math.pi / 4)) / 2),
    ("1-sqrt", 0.25, 0.5),
    ("1-sqrt", 0.64, 0.2),
])
def test_wsd_schedule_matches_closed_form(shape, fraction_done, factor):
    """Warmup 50, stable until step 800 (decay_fraction 0.2 of 1000), then the decay shape."""
    schedule = ScheduleConfig(kind="wsd", warmup_steps=50, min_lr=MIN, decay_fraction=0.2, decay_shape=shape)
    lr = lambda step: lr_at(step, schedule=schedule, peak_lr=PEAK, total_steps=TOTAL)  # noqa: E731
    assert lr(24) == pytest.approx(PEAK * 25 / 50, rel=1e-12)
    assert lr(50) == lr(400) == lr(799) == PEAK
    assert lr(800) == pytest.approx(PEAK, rel=1e-12)
    step = 800 + round(fraction_done * 200)
    assert lr(step) == pytest.approx(MIN + (PEAK - MIN) * factor, rel=1e-12)
    assert lr(1000) == MIN


def test_torch_scheduler_follows_lr_at_and_restores_its_position():
    model = torch.nn.Linear(4, 4)
    schedule = ScheduleConfig(kind="wsd", warmup_steps=3, min_lr=1e-5, decay_fraction=0.5, decay_shape="cosine")
    optimizer = OptimConfig(lr=1e-3).build(model)
    scheduler = schedule.build(optimizer, total_steps=12)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == [lr_at(s, schedule=schedule, peak_lr=1e-3, total_steps=12) for s in range(7)]
    state = scheduler.state_dict()
    assert "schedule" not in state and state["last_epoch"] == 7

    fresh_optimizer = OptimConfig(lr=1e-3).build(model)
    fresh = schedule.build(fresh_optimizer, total_steps=12)
    fresh.load_state_dict(state)
    fresh_optimizer.step()
    fresh.step()
    scheduler.step()
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == \
        lr_at(8, schedule=schedule, peak_lr=1e-3, total_steps=12)


def test_schedule_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="decay_fraction"):
        ScheduleConfig(kind="wsd", decay_fraction=0.0)
    with pytest.raises(ConfigError, match="overlaps the final decay"):
        ScheduleConfig(kind="wsd", warmup_steps=90, decay_fraction=0.2).check(peak_lr=1e-3, total_steps=100)
    with pytest.raises(ConfigError, match="min_lr"):
        ScheduleConfig(min_lr=1e-2).check(peak_lr=1e-3, total_steps=100)
    with pytest.raises(ConfigError, match="did you mean 'decay_shape'"):
        load(ScheduleConfig, overrides=["decay_shap=linear"])


# ----------------------------------------------------------------------------- optimizer


@pytest.mark.parametrize("tie", [False, True])
def test_weight_decay_skips_norms_and_embeddings_unless_asked(tie):
    model = tiny_config(tie_embeddings=tie).build()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in OptimConfig(weight_decay=0.1).param_groups(model)}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert "tok_embeddings.weight" in no_decay
    assert ("lm_head.weight" in decay) != tie  # a tied output matrix is the embedding table
    assert all(n.endswith("norm.weight") for n in no_decay - {"tok_embeddings.weight"})
    assert all(model.get_parameter(n).ndim == 2 for n in decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))

    everything = OptimConfig(decay_norms_and_biases=True, decay_embeddings=True).param_groups(model)
    assert [g["name"] for g in everything] == ["decay"]


# ----------------------------------------------------------------------------- batch and DeepSpeed config


def test_global_batch_in_tokens_sets_gradient_accumulation():
    assert grad_accum_steps(2**20, micro_batch_size=4, seq_len=2048, world_size=8) == 16
    zero = ZeroConfig(stage=2, micro_batch_size=4, global_batch_tokens=2**20)
    config = deepspeed_config(zero, world_size=8, seq_len=2048, grad_clip=1.0)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 16
    assert config["train_batch_size"] * 2048 == 2**20


def test_indivisible_global_batch_names_the_nearest_valid_values():
    with pytest.raises(ConfigError) as err:
        grad_accum_steps(10_000, micro_batch_size=4, seq_len=128, world_size=2)
    message = str(err.value)
    assert message.startswith("zero.global_batch_tokens")
    assert "4 * 128 * 2 = 1024" in message
    assert "9216 (9 accumulation steps) or 10240 (10 accumulation steps)" in message
    with pytest.raises(ConfigError, match=r"Nearest valid values: 1024 \(1 accumulation step\)"):
        grad_accum_steps(100, micro_batch_size=4, seq_len=128, world_size=2)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_deepspeed_config_is_derived_from_ours(precision):
    zero = ZeroConfig(stage=3, precision=precision, offload_optimizer="cpu", micro_batch_size=2,
                      global_batch_tokens=2 * 64 * 2 * 3)
    config = deepspeed_config(zero, world_size=2, seq_len=64, grad_clip=0.5, num_params=12345)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in config["zero_optimization"]
    params = deepspeed_config(dataclasses.replace(zero, offload_params="cpu"), world_size=2, seq_len=64, grad_clip=0.5)
    assert params["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["zero_force_ds_cpu_optimizer"] is False  # the client AdamW, no compiled Adam
    assert config["zero_optimization"]["reduce_bucket_size"] == 12345  # capped at the model's size
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] == (precision == "bf16")
    assert config["fp16"]["enabled"] == (precision == "fp16")
    assert config["fp16"].get("loss_scale") == (0 if precision == "fp16" else None)  # 0: dynamic
    assert "optimizer" not in config and "scheduler" not in config
    json.dumps(config)


def test_zero_config_errors():
    with pytest.raises(ConfigError, match="offload_optimizer: optimizer offload needs ZeRO stage"):
        load(ZeroConfig, overrides=["stage=0", "offload_optimizer=cpu", "global_batch_tokens=1024"])
    for overrides in (["stage=2", "offload_optimizer=cpu"], ["stage=3"]):
        with pytest.raises(ConfigError, match="offload_params: parameter offload needs ZeRO stage 3 with "
                                              "offload_optimizer: cpu"):
            load(ZeroConfig, overrides=[*overrides, "offload_params=cpu", "global_batch_tokens=1024"])
    with pytest.raises(ConfigError, match="stage: must be one of 0, 1, 2, 3"):
        load(ZeroConfig, overrides=["stage=4", "global_batch_tokens=1024"])
    with pytest.raises(ConfigError, match="global_batch_tokens: is required"):
        load(ZeroConfig, overrides=["stage=1"])


# ----------------------------------------------------------------------------- run folder


def test_run_folder_records_config_code_packages_and_device(tmp_path):
    zero = ZeroConfig(stage=1, micro_batch_size=2, global_batch_tokens=4096)
    run = record_run(tmp_path / "run", zero, world_size=2)
    assert load(ZeroConfig, [run / "config.yaml"]) == zero
    env = json.loads((run / "environment.json").read_text())
    assert set(env["packages"]) == {"torch", "deepspeed", "sentencepiece", "numpy", "hataori"}
    assert env["packages"]["torch"] == torch.__version__
    assert env["world_size"] == 2 and env["python"].count(".") == 2
    assert env["device"]["type"] in ("cpu", "cuda")
    if env["device"]["type"] == "cpu":
        assert env["device"]["cores"] >= 1 and env["device"]["model"]
    here = Path(__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert env["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")


def test_git_commit_outside_a_checkout_is_unknown(tmp_path):
    assert git_commit(tmp_path) == ("unknown", None)
