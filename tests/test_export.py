"""``hataori export hf``: DeepSpeed checkpoints of every ZeRO stage as Hugging Face model folders.

Two processes save checkpoints of one model under ZeRO 0, 1, 2 and 3 (one AdamW step at learning
rate 0, so every stage holds the weights the model was built with, stored four different ways).
The exports must be byte-identical, hold exactly the weights of the model built the same way in
one process (an independent reference), load offline in transformers, and give hataori's logits.
A real ``hataori pretrain`` run checks what the run folder records for the model card.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from export_worker import STAGES, model_config
from ranks import launch_ranks, log_tails

from hataori.cli import main as hataori_main

LAUNCH_TIMEOUT_S = 240
WORKER = Path(__file__).with_name("export_worker.py")


@pytest.fixture(scope="module")
def stage_runs(ja_tokenizer, tmp_path_factory) -> Path:
    """Run folders ``stage0`` .. ``stage3``, each with one checkpoint of the same weights."""
    root = tmp_path_factory.mktemp("stages")
    codes = launch_ranks(str(WORKER), ["save", "--root", str(root), "--tokenizer", str(ja_tokenizer)], root / "logs",
                         2, LAUNCH_TIMEOUT_S)
    assert codes == [0, 0], f"exit codes {codes}:\n{log_tails(root / 'logs')}"
    return root


def export(run: Path, out: Path, *extra: str) -> None:
    assert hataori_main(["export", "hf", str(run), "--output", str(out), *extra]) == 0


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 120)
def test_exports_of_every_stage_are_identical_and_hold_the_built_weights(stage_runs, ja_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from hataori.interop.hf import to_hf_llama_state_dict
    from hataori.tokenizer.model import Tokenizer

    outputs = []
    for stage in STAGES:
        out = tmp_path / f"export{stage}"
        export(stage_runs / f"stage{stage}", out, "--dtype", "fp32", "--max-shard-size", "40KB")
        outputs.append(out)
    weight_files = sorted(p.name for p in outputs[0].glob("*.safetensors"))
    assert len(weight_files) > 1, "the 40KB limit should have made several shards"
    for out in outputs[1:]:
        for name in weight_files + ["model.safetensors.index.json", "config.json", "tokenizer.json"]:
            assert (out / name).read_bytes() == (outputs[0] / name).read_bytes(), f"{out.name}/{name} differs"

    torch.manual_seed(7)
    reference = model_config(Tokenizer(ja_tokenizer).vocab_size).build()
    expected = to_hf_llama_state_dict(reference.config, reference.state_dict())
    loaded = {}
    for name in weight_files:
        loaded.update(load_file(outputs[0] / name))
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    index = json.loads((outputs[0] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in expected.values())


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 120)
def test_transformers_loads_the_export_offline_with_our_logits(stage_runs, ja_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from hataori.interop.load import load_model
    from hataori.tokenizer.model import Tokenizer

    out = tmp_path / "export"
    export(stage_runs / "stage3", out, "--dtype", "fp32")
    ours, _ = load_model(stage_runs / "stage3")
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, attn_implementation="eager").eval()
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    tok = Tokenizer(ja_tokenizer)
    text = "Debian のパッケージは、 apt-get で 2 つ入れます。"
    ids = hf_tok(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [tok.eos_id] + tok.encode([text])[0]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    generation = GenerationConfig.from_pretrained(out, local_files_only=True)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (
        tok.bos_id, tok.eos_id, tok.pad_id)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 5000.0 and config["head_dim"] == 24 and config["vocab_size"] == tok.vocab_size
    card = (out / "README.md").read_text()
    assert tok.fingerprint in card and "tokens seen" in card


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 120)
def test_bf16_export_is_the_rounded_weights(stage_runs, tmp_path):
    from safetensors.torch import load_file

    export(stage_runs / "stage1", tmp_path / "fp32", "--dtype", "fp32")
    export(stage_runs / "stage1", tmp_path / "bf16", "--dtype", "bf16")
    full = {k: v for p in sorted((tmp_path / "fp32").glob("*.safetensors")) for k, v in load_file(p).items()}
    half = {k: v for p in sorted((tmp_path / "bf16").glob("*.safetensors")) for k, v in load_file(p).items()}
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], v.to(torch.bfloat16)) for k, v in full.items())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 120)
def test_export_errors(stage_runs, ja_tokenizer, ja_bpe_tokenizer, tmp_path, capsys):
    from hataori.tokenizer.model import Tokenizer

    run = stage_runs / "stage0"
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    for replace in ([], ["--replace"]):
        assert hataori_main(["export", "hf", str(run), "--output", str(occupied), *replace]) == 2
        assert "holds files that no hataori command wrote (notes.txt), not a model folder" in capsys.readouterr().err
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"] and (occupied / "notes.txt").read_text() == "keep me"

    # Another tokenizer of the run's size: refused by its fingerprint, naming both tokenizers.
    ours, other = Tokenizer(ja_tokenizer), Tokenizer(ja_bpe_tokenizer)
    assert ours.vocab_size == other.vocab_size
    assert hataori_main(["export", "hf", str(run), "--output", str(tmp_path / "x"), "--tokenizer",
                         str(ja_bpe_tokenizer)]) == 2
    assert (f"--tokenizer: {other.path} has fingerprint {other.fingerprint}, but the run {run} was trained with "
            f"{ours.path} (fingerprint {ours.fingerprint})") in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    assert hataori_main(["export", "hf", str(run), "--output", str(tmp_path / "y"), "--step", "9"]) == 2
    assert "no complete checkpoint of step 9" in capsys.readouterr().err
    assert hataori_main(["export", "hf", str(run), "--output", str(tmp_path / "y"), "--max-shard-size", "lots"]) == 2
    assert "max-shard-size" in capsys.readouterr().err

    # An earlier export is kept unless --replace, which replaces it whole.
    export(run, tmp_path / "again", "--dtype", "fp32")
    assert hataori_main(["export", "hf", str(run), "--output", str(tmp_path / "again"), "--dtype", "bf16"]) == 2
    assert "pass --replace to replace it" in capsys.readouterr().err
    assert json.loads((tmp_path / "again" / "config.json").read_text())["torch_dtype"] == "float32"
    export(run, tmp_path / "again", "--dtype", "bf16", "--replace")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "temporary folders left"
