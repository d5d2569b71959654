"""LoRA training through ``hataori pretrain`` on two real processes, and what leaves it.

A random Llama written by transformers is the base (``init.from_hf``), trained with adapters on
real Japanese shards. References: the uninterrupted run (a resumed run must reproduce its losses
and adapters bit for bit, under each ZeRO stage), the weights before training (frozen ones must
not change inside DeepSpeed's engine), a full-training checkpoint of the same model (size), and
transformers with PEFT (the merged export and the adapter on the exported base give the logits
hataori's own model gives).

Run as a script (``python tests/test_lora_train.py frozen --out F``) it is the worker of one test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capabilities import needs
from helpers import cpu_env

from hataori.cli import main as hataori_main
from hataori.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 64
LAUNCH_TIMEOUT_S = 150
LORA = "lora={rank: 4, alpha: 8, targets: [attn.wq, attn.wv, mlp.w_up]}"


@pytest.fixture(scope="module")
def base_model(ja_tokenizer, tmp_path_factory) -> Path:
    """A random Llama (2 layers, width 64) with the shards' tokenizer, written by transformers."""
    sys.path.insert(0, str(REPO / "scripts"))
    from small_llama import write_small_llama

    return write_small_llama(ja_tokenizer, tmp_path_factory.mktemp("base") / "llama", hidden=64, layers=2, heads=4,
                             kv_heads=2, intermediate=128, max_positions=SEQ_LEN)


def pretrain(base: Path, shards: Path, run: Path, *overrides: str, steps: int = 4, check: bool = True,
             source: str = "from_hf"):
    """``hataori pretrain`` of the continue-toy preset from ``init.{source}=base`` on 2 processes, in a
    subprocess; its result."""
    env = cpu_env(run.parent / "torch_extensions")
    command = [sys.executable, "-m", "hataori.cli", "pretrain", str(REPO / "configs/train/continue-toy.yaml"),
               f"init.{source}={base}", "--data", str(shards), "--run-dir", str(run), "--nproc", "2",
               f"data.seq_len={SEQ_LEN}", "zero.micro_batch_size=2", f"zero.global_batch_tokens={2 * 2 * 2 * SEQ_LEN}",
               f"trainer.max_steps={steps}", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
               "validation.every_steps=0", "validation.max_tokens=500", "schedule.warmup_steps=1",
               "logging.every_steps=1", *overrides]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert not (run.parent / "torch_extensions").exists()
    return result


def train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    from hataori.checkpoint.states import CheckpointWeights

    weights = CheckpointWeights(checkpoint)
    return {name: weights.tensor(name) for name in weights.shapes}


def checkpoint_bytes(checkpoint: Path) -> int:
    return sum(entry["bytes"] for entry in json.loads((checkpoint / "manifest.json").read_text())["files"].values())


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S + 30)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resumed_lora_run_equals_the_uninterrupted_run(stage, base_model, ja_shards, tmp_path):
    """4 steps with checkpoints at 2 and 4; then step 4's checkpoint is taken away and the run launched
    again: it reloads the base, resumes from step 2 and must give steps 3-4 the same losses, gradient
    norms and learning rates, and step 4 the same adapters, bit for bit. The checkpoints hold the
    adapters only, never the base."""
    run = tmp_path / "run"
    pretrain(base_model, ja_shards, run, LORA, f"zero.stage={stage}")
    uninterrupted = {r["step"]: r for r in train_records(run)}
    assert sorted(uninterrupted) == [1, 2, 3, 4]
    step4 = run / "checkpoints" / "step_00000004"
    reference = checkpoint_tensors(step4)
    adapted = [f"blocks.{i}.{name}" for i in range(2) for name in ("attn.wq", "attn.wv", "mlp.w_up")]
    assert set(reference) == {f"{m}.lora_{ab}" for m in adapted for ab in "AB"}, "the checkpoint holds the base"
    assert all(reference[f"{m}.lora_B"].abs().max() > 0 for m in adapted), "the adapters did not train"
    shutil.rmtree(step4)
    (run / "metrics.jsonl").unlink()

    result = pretrain(base_model, ja_shards, run, LORA, f"zero.stage={stage}")
    assert "resuming after step 2" in result.stdout and "initial weights from init.from_hf" in result.stdout
    resumed = {r["step"]: r for r in train_records(run)}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm", "lr", "tokens_seen"):
            assert resumed[step][key] == uninterrupted[step][key], (stage, step, key)
    again = checkpoint_tensors(step4)
    assert again.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(again[name], value), (stage, name)


# ----------------------------------------------------------------------------- one run, read many ways


@pytest.fixture(scope="module")
def lora_run(base_model, ja_shards, tmp_path_factory) -> Path:
    """ZeRO-3 (the continue-toy preset's stage), rank 4 with the embeddings and output matrix trained
    too, at a high learning rate so that the adapters move far from zero."""
    run = tmp_path_factory.mktemp("lora") / "run"
    pretrain(base_model, ja_shards, run, LORA, "lora.train_also=[tok_embeddings, lm_head]", "optim.lr=2e-2")
    return run


@pytest.fixture(scope="module")
def full_run(base_model, ja_shards, tmp_path_factory) -> Path:
    """The same model, data and processes as :func:`lora_run`, every weight trained, 2 steps."""
    run = tmp_path_factory.mktemp("full") / "run"
    pretrain(base_model, ja_shards, run, steps=2)
    return run


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S + 30)
def test_lora_checkpoint_is_a_small_fraction_of_a_full_one(lora_run, full_run, base_model, ja_shards, tmp_path):
    """Against a full-training checkpoint of the same model on the same processes: without the
    embeddings trained the LoRA checkpoint is a few percent of it, and it grows with them."""
    full_bytes = checkpoint_bytes(full_run / "checkpoints" / "step_00000002")
    with_embeddings = checkpoint_bytes(lora_run / "checkpoints" / "step_00000002")
    only = tmp_path / "only"
    pretrain(base_model, ja_shards, only, LORA, steps=2)
    only_bytes = checkpoint_bytes(only / "checkpoints" / "step_00000002")
    print(f"checkpoint bytes: full {full_bytes:,}, LoRA with embeddings {with_embeddings:,}, LoRA {only_bytes:,}")
    assert only_bytes < 0.05 * full_bytes
    assert only_bytes < with_embeddings < full_bytes


def test_export_merged_and_peft_adapter_give_hataoris_logits(lora_run, tmp_path, capsys):
    """The merged export (transformers), the exported base with the PEFT adapter (peft), and hataori's
    model read from the run (base + adapters, merged in fp32) give the same logits in fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hataori.checkpoint.record import read_config
    from hataori.interop.load import load_model

    merged, base, adapter = tmp_path / "merged", tmp_path / "base", tmp_path / "adapter"
    assert hataori_main(["export", "hf", str(lora_run), "--output", str(merged), "--dtype", "fp32"]) == 0
    assert hataori_main(["export", "hf", str(lora_run), "--output", str(base), "--adapter", str(adapter),
                         "--dtype", "fp32"]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj", "up_proj"]
    assert config["modules_to_save"] == ["model.embed_tokens", "lm_head"]

    ours, _ = load_model(lora_run)
    transformers_merged = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True).eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, local_files_only=True), adapter).eval()
    plain_base = AutoModelForCausalLM.from_pretrained(base, local_files_only=True).eval()
    vocab = transformers_merged.config.vocab_size
    x = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = ours(x)[..., :vocab]
        from_merged = transformers_merged(x).logits
        from_adapter = with_adapter(x).logits
        from_base = plain_base(x).logits
    scale = reference.abs().max()
    assert (from_base - reference).abs().max() > 1e-2 * scale, "the adapters changed nothing"
    torch.testing.assert_close(from_merged, reference, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(from_adapter, reference, rtol=0, atol=1e-5 * scale)

    # --replace writes over the earlier export and adapter, but never over the run itself, its base or a
    # model folder that hataori did not export: each refused, named, and left byte for byte.
    assert hataori_main(["export", "hf", str(lora_run), "--output", str(base), "--adapter", str(adapter),
                         "--dtype", "bf16", "--replace"]) == 0
    assert json.loads((base / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf_base = Path(read_config(lora_run)["init"]["from_hf"])
    files = {root: {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} for root in (lora_run, hf_base)}
    for argv, message in (
            (["--output", str(tmp_path / "x"), "--adapter", str(lora_run)], f"is {lora_run}, an input of this command"),
            (["--output", str(hf_base)], f"is {hf_base}, an input of this command"),
            (["--output", str(tmp_path / "y"), "--adapter", str(lora_run.parent)], "an input of this command"),
            (["--output", str(base), "--adapter", str(base / "adapter")], "must be a folder apart from --output")):
        assert hataori_main(["export", "hf", str(lora_run), *argv, "--replace"]) == 2
        assert message in capsys.readouterr().err
    assert files == {root: {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} for root in (lora_run, hf_base)}
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_lora_on_a_hataori_run_reads_back_as_its_weights_plus_the_adapters(full_run, ja_shards, tmp_path):
    """``init.from_run``: the base is another run's checkpoint (its manifest gives the fingerprint).
    The model read back from the LoRA run equals, weight for weight, the base run's weights with
    each adapter folded in by hand, W + alpha / r * B A."""
    from hataori.checkpoint.states import CheckpointWeights
    from hataori.interop.load import load_model

    run = tmp_path / "run"
    result = pretrain(full_run, ja_shards, run, LORA, "optim.lr=2e-2", steps=2, source="from_run")
    assert "base run-" in result.stdout, result.stdout[-2000:]
    base = CheckpointWeights(full_run / "checkpoints" / "step_00000002")
    adapters = CheckpointWeights(run / "checkpoints" / "step_00000002")
    model, _ = load_model(run)
    found = dict(model.named_parameters())
    assert set(found) == set(base.shapes)
    for name in found:
        expected = base.tensor(name)
        module = name.removesuffix(".weight")
        if f"{module}.lora_A" in adapters.shapes:
            a, b = adapters.tensor(f"{module}.lora_A"), adapters.tensor(f"{module}.lora_B")
            assert b.abs().max() > 0, name
            expected = expected + (8 / 4) * (b @ a)
        torch.testing.assert_close(found[name].detach(), expected, rtol=0, atol=1e-6, msg=name)


def test_resume_on_a_changed_base_is_refused(lora_run, base_model, ja_shards, tmp_path, capsys):
    """One weight of the base changed by a single ulp: relaunching the run on it is refused, naming the
    fingerprint, before any process starts; so is exporting it."""
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(base_model, changed)
    weights = load_file(changed / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name][0, 0] = torch.nextafter(weights[name][0, 0], torch.tensor(1.0))
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)

    result = pretrain(changed, ja_shards, run, LORA, "lora.train_also=[tok_embeddings, lm_head]", "optim.lr=2e-2",
                      check=False)
    assert result.returncode != 0
    assert "lora.base: checkpoint 'hf-" in result.stderr, result.stderr[-2000:]
    assert "launching" not in result.stdout
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(base_model), str(changed)))
    assert hataori_main(["export", "hf", str(run), "--output", str(tmp_path / "export")]) == 2
    assert "that base now has fingerprint" in capsys.readouterr().err


def test_lora_needs_a_base_and_patterns_that_match(ja_shards, ja_tokenizer, base_model, tmp_path, capsys):
    from hataori.tokenizer.model import Tokenizer

    common = ["--data", str(ja_shards), "--run-dir", str(tmp_path / "run"), "--nproc", "2"]
    vocab = f"model.vocab_size={Tokenizer(ja_tokenizer).vocab_size}"
    assert hataori_main(["pretrain", str(REPO / "configs/train/toy.yaml"), *common, LORA, vocab]) == 2
    assert "lora: adapts a trained model, but no init source is set" in capsys.readouterr().err
    assert hataori_main(["pretrain", str(REPO / "configs/train/continue-toy.yaml"), *common,
                         f"init.from_hf={base_model}", f"data.seq_len={SEQ_LEN}",
                         "lora={targets: [attn.wo_proj]}"]) == 2
    assert ("lora.targets: pattern 'attn.wo_proj' matches no linear module of the model; its linear modules are: "
            "blocks.*.attn.wq, blocks.*.attn.wk") in capsys.readouterr().err
    # A rank past the layers' width (64), and no rank: named by their key before anything is allocated.
    for rank, message in (("100000", "lora.rank: 100000 is above the width of blocks.0.attn.wq (64 in, 64 out, and "),
                          ("0", "lora.rank: must be a positive integer, got 0")):
        assert hataori_main(["pretrain", str(REPO / "configs/train/continue-toy.yaml"), *common,
                             f"init.from_hf={base_model}", f"data.seq_len={SEQ_LEN}", f"lora.rank={rank}"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_export_adapter_of_a_full_run_is_refused(full_run, tmp_path):
    from hataori.interop.export import export_hf

    with pytest.raises(ConfigError, match="trained no LoRA adapters"):
        export_hf(full_run, tmp_path / "out", adapter=tmp_path / "adapter")
    assert not (tmp_path / "out").exists() and not (tmp_path / "adapter").exists()


# ----------------------------------------------------------------------------- inside the engine


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=needs("bf16")), "fp32"])
def test_frozen_weights_stay_bitwise_inside_deepspeed(precision, tmp_path):
    """Under ZeRO 0-3 on two processes, three steps at a high learning rate: every frozen weight
    (gathered) equals its value before training bit for bit, no frozen parameter has a gradient or
    optimizer state, and every adapter moved."""
    from ranks import launch_ranks, log_tails

    out = tmp_path / "frozen.pt"
    codes = launch_ranks(str(Path(__file__).with_name("lora_worker.py")),
                         ["frozen", "--precision", precision, "--out", str(out)], tmp_path / "logs", 2,
                         LAUNCH_TIMEOUT_S)
    assert codes == [0, 0], log_tails(tmp_path / "logs")
    results = torch.load(out)
    assert sorted(results) == [(stage, precision) for stage in range(4)]
    for key, found in results.items():
        assert found["frozen"] > 0 and found["changed_frozen"] == [], key
        assert found["optimized"] == found["trainable"], key
        assert found["still_adapters"] == [], key
