"""``hataori plan``: model states against DeepSpeed's own estimators, activations against what autograd
keeps, LoRA's trainable parameters against a count by hand, checkpoint sizes against a DeepSpeed checkpoint,
and the printed table and errors through the command line."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capabilities import needs
from helpers import check_activation_formula, tiny_config

from hataori.cli import main as hataori_main
from hataori.config import load
from hataori.model import ModelConfig
from hataori.model.lora import LoRAConfig, apply_lora
from hataori.model.memory import (GIB, Trainable, activation_bytes_per_token, checkpoint_bytes,
                                  largest_layer_params, loss_backward_bytes, model_states, states_shortfall, trainable)
from hataori.plan.planner import SETUPS, PlanConfig, Workload, plan, recommend

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def preset(name: str) -> ModelConfig:
    return load(ModelConfig, [CONFIGS / "model" / f"{name}.yaml"])


def param_counts() -> list[tuple[str, int, int]]:
    """(name, parameters, largest layer) of the 7b and 30b presets and two made-up sizes."""
    counts = [(name, cfg.num_params(), largest_layer_params(cfg)) for name, cfg in
              (("7b", preset("7b")), ("30b", preset("30b")))]
    return counts + [("1.3e9", 1_300_000_000, 100_000_000), ("175e9", 175_000_000_000, 600_000_000)]


LAYOUTS = [(1, 1), (4, 1), (8, 1), (8, 4), (8, 16)]  # (GPUs per node, nodes)


# ----------------------------------------------------------------------------- model states vs DeepSpeed


@pytest.mark.parametrize("gpus_per_node, nodes", LAYOUTS)
@pytest.mark.parametrize("name, P, largest", param_counts(), ids=lambda x: x if isinstance(x, str) else "")
def test_zero2_matches_deepspeed_estimator(name, P, largest, gpus_per_node, nodes):
    """DeepSpeed's ZeRO-2 formulas: GPU 2P + 18P/N without offload (16-bit params replicated; 16-bit
    grads, fp32 grads, fp32 params and Adam's m, v partitioned) and 2P with offload. Its CPU figure (with
    a 1.5 buffer factor) counts the model loaded in CPU memory by every process, 4 bytes a parameter, or
    max(4N, 16) bytes with offload; hataori builds the model on the GPU, so its CPU memory is the
    offloaded states alone, never above DeepSpeed's."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    N = gpus_per_node * nodes
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
                                                         cpu_offload=offload)
        ours = model_states(P, stage=2, num_gpus=N, gpus_per_node=gpus_per_node,
                            offload="optimizer" if offload else "none")
        assert ours.gpu == pytest.approx(gpu, abs=1), f"offload={offload}"
        assert ours.cpu_states == (16 * P * gpus_per_node / N if offload else 0)  # the node's partitions of K + f
        assert ours.cpu_states * 1.5 <= cpu + 1


@pytest.mark.parametrize("gpus_per_node, nodes", LAYOUTS)
@pytest.mark.parametrize("name, P, largest", param_counts(), ids=lambda x: x if isinstance(x, str) else "")
def test_zero3_matches_deepspeed_estimator(name, P, largest, gpus_per_node, nodes):
    """DeepSpeed's ZeRO-3 formulas: 4 x largest layer + 18P/N, + 2P/N with optimizer offload, alone with
    parameter offload too. Without offload its 18 bytes are 2 fewer than its ZeRO-2 count of the same
    partitioned states (2 + 2 + 4 + 4 + 8: 16-bit params and grads, fp32 grads and params, m and v); this
    plan counts all 20, so it is 2P/N above DeepSpeed there. CPU: with zero.Init (as hataori builds ZeRO-3
    models) only the offloaded states, 16 or 18 bytes a parameter per node, x 1.5."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    N = gpus_per_node * nodes
    for offload, opt, params in (("none", False, False), ("optimizer", True, False),
                                 ("optimizer+params", True, True)):
        ours = model_states(P, stage=3, num_gpus=N, gpus_per_node=gpus_per_node, offload=offload,
                            largest_layer_params=largest)
        for zero_init in (False, True):
            cpu, gpu, largest_memory = estimate_zero3_model_states_mem_needs(
                P, largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=opt,
                cpu_offload_params=params, zero_init=zero_init)
            above = 2 * P / N if offload == "none" else 0
            assert ours.gpu - above == pytest.approx(gpu, abs=1), offload
            assert ours.gathered == largest_memory
            if zero_init and opt:
                assert ours.cpu_states * 1.5 == pytest.approx(cpu, rel=1e-12), offload
            elif zero_init:
                assert ours.cpu_states == 0, offload


def _printed_rows(fn, **kwargs) -> list[tuple[float, float, str]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(**kwargs)
    rows = re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", out.getvalue(), re.MULTILINE)
    return [(float(cpu), float(gpu), options.strip()) for cpu, gpu, options in rows]


@pytest.mark.parametrize("name", ["7b", "30b"])
@pytest.mark.parametrize("gpus_per_node, nodes", [(1, 1), (8, 1), (8, 8)])
def test_all_cold_printouts_agree(name, gpus_per_node, nodes):
    """The tables the ``*_all_cold`` estimators print (GiB, 2 decimals) for the presets' parameter counts."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    cfg = preset(name)
    P, largest, N = cfg.num_params(), largest_layer_params(cfg), gpus_per_node * nodes
    rows = _printed_rows(estimate_zero2_model_states_mem_needs_all_cold, total_params=P,
                         num_gpus_per_node=gpus_per_node, num_nodes=nodes)
    # (DeepSpeed formats the device as "cpu" or "OffloadDeviceEnum.cpu" depending on the Python version.)
    assert [options.endswith("=none") for *_, options in rows] == [False, True]
    for (_, gpu, options) in rows:
        ours = model_states(P, stage=2, num_gpus=N, gpus_per_node=gpus_per_node,
                            offload="none" if options.endswith("=none") else "optimizer")
        assert round(ours.gpu / GIB, 2) == pytest.approx(gpu, abs=0.011), options
    rows = _printed_rows(estimate_zero3_model_states_mem_needs_all_cold, total_params=P,
                         largest_layer_params=largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes)
    assert len(rows) == 6
    for (cpu, gpu, options) in rows:
        offload = ("none" if "offload_optimizer=none" in options else
                   "optimizer" if "offload_param=none" in options else "optimizer+params")
        ours = model_states(P, stage=3, num_gpus=N, gpus_per_node=gpus_per_node, offload=offload,
                            largest_layer_params=largest)
        above = 2 * P / N if offload == "none" else 0  # see test_zero3_matches_deepspeed_estimator
        assert round((ours.gpu - above) / GIB, 2) == pytest.approx(gpu, abs=0.011), options
        if "zero_init=1" in options and "offload_optimizer=none" not in options:
            assert round(ours.cpu_states * 1.5 / GIB, 2) == pytest.approx(cpu, abs=0.011), options


@pytest.mark.parametrize("tie", [False, True])
def test_largest_layer_matches_deepspeed_count(tie):
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, ffn_hidden=96, max_seq_len=16,
                      tie_embeddings=tie)
    total, largest = model_to_params(cfg.build())
    assert (total, largest) == (cfg.num_params(), largest_layer_params(cfg))
    wide = ModelConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=4, ffn_hidden=512, max_seq_len=16)
    assert model_to_params(wide.build())[1] == largest_layer_params(wide) == 32 * 512


def test_stage_arithmetic_closed_forms():
    """Stages 0 and 1 (no DeepSpeed estimator) and fp32 training, by the ZeRO paper's bytes per parameter."""
    P, N = 1_000_000, 8
    s0 = model_states(P, stage=0, num_gpus=N, gpus_per_node=8)
    assert (s0.params, s0.grads, s0.optimizer) == (2 * P, 2 * P, 16 * P)
    s1 = model_states(P, stage=1, num_gpus=N, gpus_per_node=8)
    assert (s1.params, s1.grads, s1.optimizer) == (2 * P, 2 * P, 16 * P / N)
    s1o = model_states(P, stage=1, num_gpus=N, gpus_per_node=8, offload="optimizer")
    assert (s1o.gpu, s1o.cpu_states) == (4 * P, 16 * P)  # the node's 8 partitions of 16 bytes
    f0 = model_states(P, stage=0, num_gpus=N, gpus_per_node=8, precision="fp32")
    assert f0.gpu == 16 * P
    f3 = model_states(P, stage=3, num_gpus=N, gpus_per_node=8, precision="fp32", largest_layer_params=10)
    assert f3.gpu == 16 * P / N + 8 * 10


# ----------------------------------------------------------------------------- activations vs autograd


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("doc_masking", [False, True])
def test_activation_formula_counts_what_autograd_saves(precision, dtype, qk_norm, checkpointing, doc_masking):
    check_activation_formula(precision, dtype, checkpointing, qk_norm=qk_norm, doc_masking=doc_masking,
                             attention_backend="sdpa", fused_kernels="torch")


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_with_the_chunked_loss(precision, dtype, checkpointing):
    check_activation_formula(precision, dtype, checkpointing, doc_masking=True, attention_backend="sdpa",
                             fused_kernels="torch", chunked_loss=True)


LORA_CASES = {  # id: (LoRA config, model overrides)
    "default": (LoRAConfig(rank=4), {}),
    "dropout": (LoRAConfig(rank=4, dropout=0.1), {}),
    "q-v": (LoRAConfig(rank=8, targets=("attn.wq", "attn.wv")), {}),
    "mlp-up": (LoRAConfig(rank=4, targets=("mlp.w_up",)), {}),
    "last-down-only": (LoRAConfig(rank=4, targets=("blocks.2.mlp.w_down",)), {}),
    "layer-1-k-dropout": (LoRAConfig(rank=4, dropout=0.2, targets=("blocks.1.attn.wk", "attn.wo")), {}),
    "train-also": (LoRAConfig(rank=4, targets=("attn.wv",), train_also=("tok_embeddings", "blocks.1.mlp_norm",
                                                                         "norm", "blocks.2.mlp.w_up")), {}),
    "lm-head-dropout": (LoRAConfig(rank=4, dropout=0.1, targets=("mlp.*", "lm_head")), {}),
    "tied-train-lm-head": (LoRAConfig(rank=4, targets=("attn.wq",), train_also=("lm_head",)),
                           {"tie_embeddings": True}),
    "qk-norm": (LoRAConfig(rank=4, targets=("attn.wk", "mlp.w_gate"), train_also=("blocks.0.attn.q_norm",)),
                {"qk_norm": True}),
    "chunked-loss": (LoRAConfig(rank=4, dropout=0.1), {"chunked_loss": True}),
    "whole-block": (LoRAConfig(rank=4, targets=("blocks.0.attn.wq",), train_also=("blocks.2",)), {}),
}


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("doc_masking", [False, True])
@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_activation_formula_counts_what_autograd_saves(case, precision, dtype, checkpointing, doc_masking):
    """With frozen weights autograd keeps less (only what a wanted gradient needs) and each adapter adds
    its own; the LoRA formula follows it to the byte, dropout masks, layers without adapters and all."""
    lora, overrides = LORA_CASES[case]
    check_activation_formula(precision, dtype, checkpointing, lora=lora, doc_masking=doc_masking,
                             attention_backend="sdpa", fused_kernels="torch", **overrides)


@pytest.mark.parametrize("overrides", [
    {"fused_kernels": "torch"}, {"fused_kernels": "triton"}, {"qk_norm": True, "fused_kernels": "torch"},
    {"qk_norm": True, "fused_kernels": "triton"}, {"doc_masking": False}, {"attention_backend": "sdpa"},
    {"chunked_loss": True, "fused_kernels": "triton"}, {"chunked_loss": True, "fused_kernels": "torch"},
], ids=str)
def test_lora_walk_with_every_weight_trained_is_the_full_formula(overrides):
    """The block-by-block LoRA terms with no adapter and every weight trained give the full-training
    terms, fused kernels included (which no CPU test can measure)."""
    from hataori.model.model import Transformer

    cfg = tiny_config(n_layers=3, **overrides)
    with torch.device("meta"):
        names = frozenset(name for name, m in Transformer(cfg).named_modules()
                          if isinstance(getattr(m, "weight", None), torch.nn.Parameter))
    everything = Trainable(lora=LoRAConfig(), params=cfg.num_params(), total=cfg.num_params(), adapted=frozenset(),
                           trained=names, largest_layer=0, largest_trainable_layer=0)
    for precision in ("bf16", "fp32"):
        full = activation_bytes_per_token(cfg, seq_len=48, precision=precision)
        assert activation_bytes_per_token(cfg, seq_len=48, precision=precision, lora=everything) == full
        assert loss_backward_bytes(cfg, tokens=96, precision=precision, lora=everything) == loss_backward_bytes(
            cfg, tokens=96, precision=precision)


def test_lora_keeps_less_than_full_training_plus_its_adapters():
    """The default adapters on the 7b preset: each block keeps full training's tensors less the frozen
    norms' normalised inputs (unfused) plus seven rank-r adapter outputs; fused, exactly the adapters."""
    for fused in ("torch", "triton"):
        cfg = load(ModelConfig, [CONFIGS / "model" / "7b.yaml"], [f"fused_kernels={fused}"])
        full = activation_bytes_per_token(cfg, seq_len=4096, precision="bf16")
        lora = activation_bytes_per_token(cfg, seq_len=4096, precision="bf16",
                                          lora=trainable(cfg, LoRAConfig(rank=16)))
        frozen_norms = 0 if fused == "triton" else 2 * 2 * cfg.d_model
        assert lora["block"] == full["block"] - frozen_norms + 7 * 2 * 16


# ----------------------------------------------------------------------------- LoRA: what trains, checkpoints


def adapter_params(cfg: ModelConfig, rank: int, names: list[str]) -> int:
    """rank * (in + out) for each named layer kind in every block (``lm_head`` once)."""
    D, Wq, Wkv, F = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_hidden
    widths = {"wq": (D, Wq), "wk": (D, Wkv), "wv": (D, Wkv), "wo": (Wq, D), "w_gate": (D, F), "w_up": (D, F),
              "w_down": (F, D)}
    if "lm_head" in names:
        return rank * (D + cfg.padded_vocab_size) + adapter_params(cfg, rank, [n for n in names if n != "lm_head"])
    return cfg.n_layers * sum(rank * sum(widths[name]) for name in names)


@pytest.mark.parametrize("model, lora, expected", [
    (tiny_config(n_layers=3), LoRAConfig(rank=4),
     lambda c: adapter_params(c, 4, ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"])),
    (tiny_config(n_layers=3), LoRAConfig(rank=8, targets=("attn.wq", "attn.wv", "lm_head")),
     lambda c: adapter_params(c, 8, ["wq", "wv", "lm_head"])),
    (tiny_config(n_layers=3), LoRAConfig(rank=2, targets=("blocks.1.attn.wk",),
                                         train_also=("tok_embeddings", "norm")),
     lambda c: 2 * (c.d_model + c.n_kv_heads * c.head_dim) + c.padded_vocab_size * c.d_model + c.d_model),
    (tiny_config(n_layers=3, tie_embeddings=True),
     LoRAConfig(rank=4, targets=("mlp.*",), train_also=("lm_head", "tok_embeddings")),
     lambda c: adapter_params(c, 4, ["w_gate", "w_up", "w_down"]) + c.padded_vocab_size * c.d_model),  # tied: once
], ids=["default", "q-v-lm-head", "one-layer-and-embeddings", "tied"])
def test_trainable_parameters_by_hand_and_on_the_built_model(model, lora, expected):
    """The meta-device count against rank * (in + out) a layer by hand, and against the model built on
    the CPU with the adapters applied (largest layer: DeepSpeed's own count)."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    counted = trainable(model, lora)
    torch.manual_seed(0)
    built = model.build()
    adapted = apply_lora(built, lora)
    assert counted.params == expected(model) == sum(p.numel() for p in built.parameters() if p.requires_grad)
    assert counted.adapted == set(adapted)
    assert (counted.total, counted.largest_layer) == model_to_params(built)
    assert counted.largest_trainable_layer == max(sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
                                                  for m in built.modules())


@pytest.mark.parametrize("name", ["7b", "30b"])
def test_trainable_parameters_of_the_presets(name):
    """Counted without allocating the model: rank * (in + out) for the seven projections of every block."""
    cfg = preset(name)
    counted = trainable(cfg, LoRAConfig(rank=16))
    assert counted.params == adapter_params(cfg, 16, ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"])
    assert counted.total == cfg.num_params() + counted.params
    assert len(counted.adapted) == 7 * cfg.n_layers and counted.largest_layer == largest_layer_params(cfg)


def test_lora_model_states_closed_forms():
    """T of P parameters train: every parameter's 16-bit weight, the trained ones' gradients and optimizer
    states, partitioned stage by stage; ZeRO-3 gathers the largest layer and the largest trained one's
    gradient. T = P is full training."""
    P, T, N, largest, largest_trained = 1_000_000, 10_000, 8, 50_000, 2_000
    kw = dict(num_gpus=N, gpus_per_node=8, largest_layer_params=largest, trainable_params=T,
              largest_trainable_params=largest_trained)
    s0, s1, s2, s3 = (model_states(P, stage=stage, **kw) for stage in range(4))
    assert (s0.params, s0.grads, s0.optimizer, s0.gathered) == (2 * P, 2 * T, 16 * T, 0)
    assert (s1.params, s1.grads, s1.optimizer) == (2 * P, 2 * T, 16 * T / N)
    assert (s2.params, s2.grads, s2.optimizer) == (2 * P, 2 * T / N, 16 * T / N)
    assert (s3.params, s3.grads, s3.optimizer, s3.gathered) == (2 * P / N, 2 * T / N, 16 * T / N,
                                                                 2 * largest + 2 * largest_trained)
    s3o = model_states(P, stage=3, offload="optimizer+params", **kw)
    assert (s3o.params, s3o.grads, s3o.optimizer, s3o.cpu_states) == (0, 0, 0, (16 * T / N + 2 * P / N) * 8)
    for stage in range(4):
        full = model_states(P, stage=stage, num_gpus=N, gpus_per_node=8, largest_layer_params=largest)
        assert model_states(P, stage=stage, num_gpus=N, gpus_per_node=8, largest_layer_params=largest,
                            trainable_params=P, largest_trainable_params=largest) == full


def test_a_run_whose_states_cannot_fit_is_found_before_it_starts():
    """The 7b preset with LoRA adapters of rank 16 (bf16, ZeRO-1 on 8 GPUs): 2 bytes per weight of the base and
    the adapters, 2 + 16 / 8 per adapter weight, counted by hand; refused on a GPU one byte too small, let be on
    one that holds it exactly; on a CPU run the 8 processes share the host."""
    from hataori.train.config import load_train_config

    train = load_train_config([CONFIGS / "train" / "7b.yaml"], ["run_dir=unused", "data.datasets=[{path: unused}]",
                                                                  "lora.rank=16", "zero.stage=1",
                                                                  "zero.precision=bf16"])
    model = train.model
    adapters = adapter_params(model, 16, ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"])
    per_gpu = 2 * (model.num_params() + adapters) + 2 * adapters + 16 * adapters / 8
    kw = dict(world_size=8, local_ranks=8, host_bytes=None)
    assert states_shortfall(train, device_type="cuda", device_bytes=int(per_gpu), **kw) is None
    why = states_shortfall(train, device_type="cuda", device_bytes=int(per_gpu) - 1, **kw)
    assert why.startswith(f"the weights, gradients and optimizer states of {adapters:,} trained parameters (LoRA "
                          f"adapters of lora.rank=16) and a frozen base of {model.num_params():,} under ZeRO-1 in bf16 "
                          f"on 8 processes need {per_gpu / GIB:,.1f} GiB on each GPU"), why
    on_cpu = dict(world_size=8, local_ranks=8, device_type="cpu", device_bytes=None)
    assert states_shortfall(train, host_bytes=int(8 * per_gpu), **on_cpu) is None
    assert "on this host (8 processes on it), which has available" in states_shortfall(
        train, host_bytes=int(8 * per_gpu) - 1, **on_cpu)


def test_lora_plan_recommends_less_than_full_training():
    cfg = preset("7b")
    work = Workload(model=cfg, micro_batch=2, seq_len=4096, precision="bf16", num_gpus=8, gpu_mem_gib=80,
                    gpus_per_node=8)
    lora = dataclasses.replace(work, lora=trainable(cfg, LoRAConfig(rank=16)))
    for full, adapted in zip(plan(work), plan(lora)):
        assert adapted.states.params > full.states.params or adapted.states.params == full.states.params == 0
        trained = [s.grads + s.optimizer for s in (full.states, adapted.states)]
        assert trained[1] <= trained[0] / 20 and adapted.buffers <= full.buffers / 10
        assert adapted.states.cpu_states < full.states.cpu_states or full.states.cpu_states == 0
    assert recommend(plan(lora)).setup.cost <= recommend(plan(work)).setup.cost


CHECKPOINT_SCRIPT = """
import json, sys, tempfile, torch
from pathlib import Path
from hataori.model import ModelConfig
from hataori.model.lora import LoRAConfig, apply_lora
from hataori.train.optim import OptimConfig
from hataori.train.zero import ZeroConfig, init_distributed

init_distributed()
cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=16)
found = []
precision = sys.argv[2]
for stage in (0, 1, 2, 3):
    torch.manual_seed(0)
    zero = ZeroConfig(stage=stage, precision=precision, global_batch_tokens=16)
    model = zero.build_model(cfg, torch.device("cpu"), seq_len=16, grad_clip=1.0)
    apply_lora(model, LoRAConfig(rank=4))
    trained = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    engine = zero.build(model, OptimConfig(lr=1e-3).build(model), None, seq_len=16, grad_clip=1.0)
    ids = torch.randint(0, 256, (1, 16))
    engine.backward(engine(ids, targets=ids))
    engine.step()
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag="t", exclude_frozen_parameters=True)
        saved = 0
        for file in (Path(folder) / "t").iterdir():
            storages, todo = {}, [torch.load(file, map_location="cpu", weights_only=False)]
            while todo:
                item = todo.pop()
                if isinstance(item, dict):
                    todo.extend(item.values())
                elif isinstance(item, (list, tuple)):
                    todo.extend(item)
                elif isinstance(item, torch.Tensor) and item.dim() > 0:
                    storages[item.untyped_storage().data_ptr()] = item.untyped_storage().nbytes()
            saved += sum(storages.values())
    found.append({"stage": stage, "precision": precision, "trained": trained, "saved": saved})
Path(sys.argv[1]).write_text(json.dumps(found))
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=needs("bf16")),
                                       pytest.param("fp16", marks=needs("fp16")), "fp32"])
def test_checkpoint_bytes_match_a_deepspeed_checkpoint(precision, tmp_path):
    """One process saves a LoRA toy model's DeepSpeed checkpoint (frozen weights excluded, as LoRA runs
    save) at every stage; the tensors it holds, Adam's 0-dim step counters aside, are the formula's bytes
    per trained parameter. In a subprocess: init_distributed sets RANK and WORLD_SIZE."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    out = tmp_path / "found.json"
    done = subprocess.run([sys.executable, "-c", CHECKPOINT_SCRIPT, str(out), precision], env=env,
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(out.read_text())
    assert [row["stage"] for row in found] == [0, 1, 2, 3]
    for row in found:
        assert row["saved"] == checkpoint_bytes(row["trained"], stage=row["stage"], precision=precision), row
    per_param = [row["saved"] / row["trained"] for row in found]
    assert per_param == {"bf16": [14, 14, 14, 12], "fp16": [14, 14, 14, 12], "fp32": [12, 16, 16, 12]}[precision]


# ----------------------------------------------------------------------------- plans and the command


def test_recommendation_is_the_cheapest_setup_with_room_to_spare():
    work = Workload(model=preset("7b"), micro_batch=2, seq_len=4096, precision="bf16", num_gpus=8,
                    gpu_mem_gib=80, gpus_per_node=8)
    estimates = plan(work)
    assert {e.setup for e in estimates} == set(SETUPS)
    best = recommend(estimates)
    assert best.fits and best.gpu_total <= 0.9 * 80 * GIB
    assert all(e.setup.cost >= best.setup.cost for e in estimates if e.roomy)
    # a setup that fits with less than a tenth to spare is passed over for a roomier one
    tight = [e for e in estimates if e.fits and not e.roomy]
    assert tight and min(e.setup.cost for e in tight) < best.setup.cost
    # ZeRO-0 replicates 16 bytes of every parameter's states: 7b cannot fit on 80 GiB that way.
    assert not next(e for e in estimates if e.setup.stage == 0 and not e.setup.checkpointing).fits


def run_plan(capsys, *argv: str) -> tuple[int, str, str]:
    status = hataori_main(["plan", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("name", ["7b", "30b"])
def test_cli_prints_every_setup(capsys, name):
    status, out, _ = run_plan(capsys, str(CONFIGS / "model" / f"{name}.yaml"), "--gpus", "8", "--gpu-mem", "80")
    assert status == 0
    cfg = preset(name)
    assert f"{cfg.num_params():,} parameters" in out
    assert f"{cfg.flops_per_token(cfg.max_seq_len):.3e}" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"^[0-3]\s{2,}", line)]
    assert [(int(r[0]), r[1], r[2]) for r in rows] == [
        (s.stage, {"none": "-", "optimizer": "optim", "optimizer+params": "optim+param"}[s.offload],
         "yes" if s.checkpointing else "no") for s in SETUPS]
    assert sum("<- recommended" in line for line in out.splitlines()) == 1
    assert "recommended: ZeRO-" in out
    assert re.search(r"^  set: zero\.stage=[0-3] .*model\.activation_checkpointing=(true|false)$", out, re.MULTILINE)


def test_cli_impossible_plan_says_what_would_fit(capsys):
    status, out, _ = run_plan(capsys, str(CONFIGS / "model" / "30b.yaml"), "--gpus", "1", "--gpu-mem", "40",
                              "--cpu-mem", "256")
    assert status == 0
    assert "DOES NOT FIT" in out and "<- recommended" not in out
    assert "with activation checkpointing, needs 15.1 GiB per GPU and 541.1 GiB of CPU memory per node (of 256)" in out
    assert re.search(r"\d+ GPUs of 40 GiB: ZeRO-3", out)
    status, out, _ = run_plan(capsys, str(CONFIGS / "model" / "30b.yaml"), "--gpus", "8", "--micro-batch", "8")
    assert status == 0 and "DOES NOT FIT" in out and "micro batch 1 (with more accumulation steps)" in out


def test_cli_overrides_and_options(capsys, tmp_path):
    status, out, _ = run_plan(capsys, str(CONFIGS / "model" / "7b.yaml"), "n_layers=16", "--gpus", "64",
                              "--seq-len", "2048", "--micro-batch", "4")
    assert status == 0
    cfg = load(ModelConfig, [CONFIGS / "model" / "7b.yaml"], ["n_layers=16"])
    assert f"{cfg.num_params():,} parameters" in out and "micro batch 4 x 2048" in out and "64 GPUs" in out
    layer = tmp_path / "16-layers.yaml"  # more YAML files layer on the preset, as in pretrain
    layer.write_text("n_layers: 16\n")
    assert run_plan(capsys, str(CONFIGS / "model" / "7b.yaml"), str(layer), "--gpus", "64", "--seq-len", "2048",
                    "--micro-batch", "4") == (0, out, "")


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0"], "plan.gpus (--gpus): must be a positive number of GPUs"),
    (["--gpus", "8", "n_layer=4"], "did you mean 'n_layers'"),
    (["--gpus", "8", "--seq-len", "100000"], "plan.seq_len (--seq-len): must be between 1"),
    (["--gpus", "8", "--gpus-per-node", "3"],
     "plan.gpus_per_node (--gpus-per-node): must divide the number of GPUs (8) and be >= 1, got 3"),
    (["--gpus", "-2"], "plan.gpus (--gpus): must be a positive number of GPUs, got -2"),
    (["--gpus", "8", "--gpus-per-node", "0"],
     "plan.gpus_per_node (--gpus-per-node): must divide the number of GPUs (8) and be >= 1, got 0"),
    (["--gpus", "8", "--gpus-per-node", "-8"],
     "plan.gpus_per_node (--gpus-per-node): must divide the number of GPUs (8) and be >= 1, got -8"),
    (["--gpus", "8", "--seq-len", "0"],
     "plan.seq_len (--seq-len): must be between 1 and the model's max_seq_len=4096, got 0"),
    (["--gpus", "8", "--seq-len", "-1"],
     "plan.seq_len (--seq-len): must be between 1 and the model's max_seq_len=4096, got -1"),
    (["--gpus", "8", "--micro-batch", "0"], "plan.micro_batch (--micro-batch): must be >= 1, got 0"),
    (["--gpus", "8", "--gpu-mem", "0"], "plan.gpu_mem (--gpu-mem): must be a finite number of GiB, > 0, got 0.0"),
    (["--gpus", "8", "--gpu-mem", "-80"], "plan.gpu_mem (--gpu-mem): must be a finite number of GiB, > 0, got -80.0"),
    # A flag's inf or nan reaches the key as YAML's .inf and .nan, as plan.KEY=.inf does.
    (["--gpus", "8", "--gpu-mem", "inf"], "plan.gpu_mem (--gpu-mem): must be a finite number of GiB, > 0, got inf"),
    (["--gpus", "8", "--gpu-mem", "nan"], "plan.gpu_mem (--gpu-mem): must be a finite number of GiB, > 0, got nan"),
    (["--gpus", "8", "plan.gpu_mem=.inf"], "plan.gpu_mem (--gpu-mem): must be a finite number of GiB, > 0, got inf"),
    (["--gpus", "8", "plan.gpu_mem=.nan"], "plan.gpu_mem (--gpu-mem): must be a finite number of GiB, > 0, got nan"),
    (["--gpus", "8", "--cpu-mem", "0"], "plan.cpu_mem (--cpu-mem): must be a finite number of GiB, > 0, got 0.0"),
    (["--gpus", "8", "--cpu-mem", "-1"], "plan.cpu_mem (--cpu-mem): must be a finite number of GiB, > 0, got -1.0"),
    (["--gpus", "8", "--cpu-mem", "inf"], "plan.cpu_mem (--cpu-mem): must be a finite number of GiB, > 0, got inf"),
    (["--gpus", "8", "--cpu-mem", "nan"], "plan.cpu_mem (--cpu-mem): must be a finite number of GiB, > 0, got nan"),
    (["--gpus", "8", "plan.cpu_mem=.inf"],
     "plan.cpu_mem (--cpu-mem): must be a finite number of GiB, > 0, got inf"),
    (["--gpus", "8", "--overhead", "-0.5"],
     "plan.overhead (--overhead): must be a finite number of GiB, >= 0, got -0.5"),
    (["--gpus", "8", "--overhead", "inf"], "plan.overhead (--overhead): must be a finite number of GiB, >= 0, got inf"),
    (["--gpus", "8", "--overhead", "nan"], "plan.overhead (--overhead): must be a finite number of GiB, >= 0, got nan"),
    (["--gpus", "8", "plan.overhead=.nan"],
     "plan.overhead (--overhead): must be a finite number of GiB, >= 0, got nan"),
    (["plan.gpus=8", "plan.precision=bf32"], "plan.precision (--precision): must be one of 'bf16', 'fp16', 'fp32'"),
    ([], "plan.gpus (--gpus): the number of GPUs is not set; pass --gpus N, plan.gpus=N or set gpus: in a --machine"),
    (["plan.gpus=null"], "plan.gpus (--gpus): the number of GPUs is not set"),
    (["--machine", str(CONFIGS / "plan" / "8xh100-80gb.yaml")], "plan.gpus (--gpus): the number of GPUs is not set"),
    (["--gpus", "8", "plan.gpu=8"], "plan.gpu: unknown key in override 'plan.gpu=8'; did you mean 'plan.gpus'?"),
    (["--gpus", "8", "plan.nodes=2"],
     "plan.nodes: unknown key in override 'plan.nodes=2'; valid keys here: plan.gpus, "),
    (["--gpus", "8", "plan.gpus=16"], "plan.gpus: is set twice, by --gpus and by plan.gpus=...; keep one of them"),
    (["--gpus", "8", "--gpu-mem", "40", "plan.gpu_mem=40"],
     "plan.gpu_mem: is set twice, by --gpu-mem and by plan.gpu_mem="),
    (["--gpus", "8", "--seq-len", "1024", "plan.seq_len=2048"], "plan.seq_len: is set twice, by --seq-len and by"),
    (["--gpus", "8", "--precision", "fp32", "plan.precision=fp32"], "plan.precision: is set twice, by --precision"),
])
def test_cli_errors(capsys, argv, message):
    status, out, err = run_plan(capsys, str(CONFIGS / "model" / "7b.yaml"), *argv)
    assert status == 2 and message in err and not out


@pytest.mark.parametrize("argv, message", [
    (["--micro-batch", "2", "zero.micro_batch_size=4"],
     "zero.micro_batch_size: is set twice, by --micro-batch and by zero.micro_batch_size=...; keep one of them"),
    (["--seq-len", "2048", "data.seq_len=2048"], "data.seq_len: is set twice, by --seq-len and by data.seq_len=..."),
    (["--precision", "fp32", "zero.precision=bf16"], "zero.precision: is set twice, by --precision and by zero.prec"),
    (["plan.micro_batch=2"], "plan.micro_batch: is a model preset's; a train preset has its own zero.micro_batch_size: "
                             "set that (or --micro-batch) instead"),
    (["plan.seq_len=2048"], "plan.seq_len: is a model preset's; a train preset has its own data.seq_len"),
    (["--seq-len", "100000"], "data.seq_len (--seq-len): 100000 tokens exceed model.max_seq_len=4096"),
    (["--micro-batch", "0"], "zero.micro_batch_size (--micro-batch): must be >= 1, got 0"),
    (["plan.gpus=16"], "plan.gpus: is set twice, by --gpus and by plan.gpus=..."),
])
def test_cli_errors_with_a_train_preset(capsys, argv, message):
    """A train preset's batch flags are shortcuts for its own keys, checked as pretraining checks them."""
    status, out, err = run_plan(capsys, str(CONFIGS / "train" / "7b.yaml"), "--gpus", "8", *argv)
    assert status == 2 and message in err and not out


def test_cli_train_preset_must_start_on_the_gpus_planned(capsys):
    """The 7b preset's 4,194,304 tokens a step are 2 x 4096 x 10 x 51.2 on 10 GPUs: pretrain would refuse to
    start, so the plan does too, naming the key and the GPU count; on 16 GPUs they are 32 micro-batches."""
    status, out, err = run_plan(capsys, str(CONFIGS / "train" / "7b.yaml"), "--gpus", "10")
    assert status == 2 and not out
    assert "zero.global_batch_tokens: 4194304 tokens is not a whole number of micro-batches" in err
    assert "(planned on 10 GPUs: plan.gpus, --gpus)" in err
    assert run_plan(capsys, str(CONFIGS / "train" / "7b.yaml"), "--gpus", "16")[0] == 0


def test_cli_plan_keys_and_machine_files_are_the_flags(capsys, tmp_path):
    """Every flag, its plan.KEY=VALUE and a machine profile with the key give one report; profiles apply in
    order, with plan.KEY=VALUE and the flags over them."""
    flags = {"--gpus": "16", "--gpu-mem": "40", "--gpus-per-node": "4", "--overhead": "2.5", "--cpu-mem": "20",
             "--seq-len": "2048", "--micro-batch": "2", "--precision": "fp16"}
    keys = [f"plan.{flag[2:].replace('-', '_')}={value}" for flag, value in flags.items()]
    base = tmp_path / "base.yaml"
    base.write_text("gpus: 4\ngpu_mem: 24\ngpus_per_node: 2\nprecision: fp32\n")
    machine = tmp_path / "machine.yaml"
    machine.write_text("base: base.yaml\n" + "".join(f"{key.removeprefix('plan.').replace('=', ': ')}\n"
                                                       for key in keys))
    model = str(CONFIGS / "model" / "7b.yaml")
    status, out, _ = run_plan(capsys, model, *(x for item in flags.items() for x in item))
    assert status == 0
    assert ("run: micro batch 2 x 2048 = 4,096 tokens per GPU, fp16, 16 GPUs of 40 GiB (4 per node), allowance "
            "2.5 GiB per GPU") in out
    assert run_plan(capsys, model, *keys) == (0, out, "")
    assert run_plan(capsys, model, "--machine", str(machine)) == (0, out, "")
    # 20 GiB of host memory a node: too little for the 25.1 GiB of offloaded states, so no offload fits
    assert "25.1  *" not in out
    assert "25.1  *" in run_plan(capsys, model, *(key for key in keys if not key.startswith("plan.cpu_mem")))[1]
    other = tmp_path / "other.yaml"
    other.write_text("gpu_mem: 96\n")
    assert run_plan(capsys, model, "--machine", str(other), "--machine", str(machine)) == (0, out, "")
    last = ["--machine", str(machine), "--machine", str(other)]
    assert run_plan(capsys, model, *last, "--gpu-mem", "40") == (0, out, "")
    status, changed, _ = run_plan(capsys, model, "--machine", str(machine), "plan.gpu_mem=96")
    assert status == 0 and "16 GPUs of 96 GiB (4 per node)" in changed


def test_cli_batch_flags_of_a_train_preset_are_its_keys(capsys):
    path = str(CONFIGS / "train" / "7b.yaml")
    status, out, _ = run_plan(capsys, path, "--gpus", "8", "--seq-len", "2048", "--micro-batch", "1",
                              "--precision", "fp32")
    assert status == 0 and "run: micro batch 1 x 2048 = 2,048 tokens per GPU, fp32, 8 GPUs" in out
    keys = ["data.seq_len=2048", "zero.micro_batch_size=1", "zero.precision=fp32"]
    assert run_plan(capsys, path, "plan.gpus=8", *keys) == (0, out, "")


@pytest.mark.parametrize("name, gpu_mem", [("8xh100-80gb", 79.6), ("8xh200-141gb", 140.4)])
def test_example_machine_profiles(capsys, name, gpu_mem):
    """The machine profiles of configs/plan/: 8 GPUs a node of what nvidia-smi reports (81559 MiB for an
    H100 80GB, 143771 MiB for an H200 141GB); the run's size comes from the command line."""
    profile = CONFIGS / "plan" / f"{name}.yaml"
    machine = load(PlanConfig, [profile], ["gpus=16"])
    assert (machine.gpus_per_node, machine.gpu_mem, machine.cpu_mem) == (8, gpu_mem, None)
    status, out, _ = run_plan(capsys, str(CONFIGS / "train" / "7b.yaml"), "--machine", str(profile), "--gpus", "16")
    assert status == 0 and f"16 GPUs of {gpu_mem:g} GiB (8 per node)" in out and "recommended: ZeRO-" in out


def test_cli_job_smaller_than_a_node_runs_on_one_node(capsys):
    """2 GPUs of an 8-GPU node: the plan of one node of 2 GPUs (its CPU holds 2 partitions' offloaded states)."""
    argv = [str(CONFIGS / "model" / "7b.yaml"), "--gpus", "2", "--cpu-mem", "64"]
    status, out, _ = run_plan(capsys, *argv, "--gpus-per-node", "8")
    assert status == 0 and "2 GPUs of 80 GiB (2 per node)" in out
    assert run_plan(capsys, *argv, "--gpus-per-node", "2") == (0, out, "")


def test_cli_missing_config(capsys, tmp_path):
    status, _, err = run_plan(capsys, str(tmp_path / "nope.yaml"), "--gpus", "8")
    assert status == 2 and "no such config" in err


def test_cli_plans_a_lora_run(capsys):
    """``lora.rank=16`` on a train preset creates the lora section with its defaults; the plan says what
    trains and the checkpoint of each; a pattern that matches nothing is an error naming lora.targets."""
    from hataori.train.config import TrainConfig

    path = CONFIGS / "train" / "7b.yaml"
    cfg = load(TrainConfig, [path], ["run_dir=x", "data.datasets=[{path: x}]"])
    counted = trainable(cfg.model, LoRAConfig(rank=16))
    status, out, _ = run_plan(capsys, str(path), "lora.rank=16", "--gpus", "8")
    assert status == 0
    assert (f"LoRA: rank 16 on 224 linear layers (attn.*, mlp.*): {counted.params:,} trainable parameters, "
            f"{counted.params / counted.total:.2%} of {counted.total:,}") in out
    stage = int(re.search(r"^recommended: ZeRO-(\d)", out, re.MULTILINE).group(1))
    lora_gib = checkpoint_bytes(counted.params, stage=stage, precision="bf16") / GIB
    full_gib = checkpoint_bytes(cfg.model.num_params(), stage=stage, precision="bf16") / GIB
    assert (f"checkpoint: {lora_gib:.2f} GiB a save at ZeRO-{stage} (recommended), {14 if stage < 3 else 12} "
            f"bytes a trained parameter; full training {full_gib:.1f} GiB") in out
    status, out, _ = run_plan(capsys, str(path), "lora={rank: 8, targets: [attn.wq, attn.wv]}", "--gpus", "8")
    trained = adapter_params(cfg.model, 8, ["wq", "wv"])
    assert status == 0 and f"LoRA: rank 8 on 64 linear layers (attn.wq, attn.wv): {trained:,} trainable" in out
    status, out, err = run_plan(capsys, str(path), "lora.targets=[attn.w_q]", "--gpus", "8")
    assert status == 2 and "lora.targets: pattern 'attn.w_q' matches no linear module" in err and not out


def test_cli_reads_a_train_preset(capsys):
    """A train preset gives the model, the micro batch, the sequence length and the precision."""
    from hataori.train.config import TrainConfig

    path = CONFIGS / "train" / "7b.yaml"
    cfg = load(TrainConfig, [path], ["run_dir=x", "data.datasets=[{path: x}]"])
    status, out, _ = run_plan(capsys, str(path), "--gpus", "8")
    assert status == 0
    assert f"{cfg.model.num_params():,} parameters" in out
    assert f"micro batch {cfg.zero.micro_batch_size} x {cfg.data.seq_len} " in out and cfg.zero.precision in out


@pytest.mark.parametrize("gpus, per_node", [(10, 5), (12, 6), (20, 5), (64, 8), (7, 7)])
def test_cli_gpus_that_are_not_whole_8_gpu_nodes(capsys, gpus, per_node):
    """Without --gpus-per-node the plan takes the largest node size up to 8 that divides --gpus."""
    status, out, err = run_plan(capsys, str(CONFIGS / "model" / "7b.yaml"), "--gpus", str(gpus))
    assert status == 0 and not err
    assert f"{gpus} GPUs of 80 GiB ({per_node} per node)" in out
