"""``init.from_hf``: Llama-family checkpoints in transformers' layout as a run's initial weights.

The references are transformers' own models: random ``LlamaForCausalLM`` s (tied and untied,
grouped-query, a head width other than hidden / heads, sharded and single-file safetensors) saved
with ``save_pretrained``. Imported and converted back, every tensor must be bit-identical and the
logits equal; under ZeRO-3 on two processes each process must read only its own partition.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import hf_llama
from ranks import launch_ranks, log_tails

LAUNCH_TIMEOUT_S = 180
WORKER = Path(__file__).with_name("import_worker.py")
SHAPES = {
    "untied-gqa": dict(tie_word_embeddings=False, num_key_value_heads=2, head_dim=None),
    "tied-gqa": dict(tie_word_embeddings=True, num_key_value_heads=2, head_dim=None),
    "untied-mha-wide-heads": dict(tie_word_embeddings=False, num_key_value_heads=4, head_dim=24),
}


def imported(folder: Path, **model_overrides):
    """Our model built from ``folder``'s config.json and loaded from its weights (no DeepSpeed)."""
    from hataori.interop.hf import HFCheckpoint, model_fields
    from hataori.interop.load import InitConfig, load_initial_weights, open_source
    from hataori.model import ModelConfig

    fields = model_fields(HFCheckpoint(folder).config, folder / "config.json")
    cfg = ModelConfig(**{**fields, **model_overrides})
    plan = open_source(InitConfig(from_hf=str(folder)), cfg, None)
    model = cfg.build()
    load_initial_weights(model, plan)
    return model.eval()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shard", [None, "60KB"], ids=["single-file", "sharded"])
def test_hf_to_hataori_to_hf_is_bit_exact(shape, shard, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hataori.interop.hf import to_hf_llama_state_dict

    folder = hf_llama(tmp_path / "hf", shard=shard, **SHAPES[shape])
    files = sorted(folder.glob("*.safetensors"))
    assert (len(files) > 1) == (shard is not None)
    original = {name: t for f in files for name, t in load_file(f).items()}
    ours = imported(folder)
    back = to_hf_llama_state_dict(ours.config, ours.state_dict())
    assert sorted(back) == sorted(n for n in original if not (ours.config.tie_embeddings and n == "lm_head.weight"))
    for name, tensor in back.items():
        assert torch.equal(tensor, original[name]), name
    padded = ours.tok_embeddings.weight[ours.config.vocab_size:]
    assert padded.shape[0] == ours.config.padded_vocab_size - 300 and torch.all(padded == 0)

    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_source_fixes_the_models_shape(tmp_path):
    """A preset's model shape gives way to the imported config; a command-line override that
    contradicts it is an error naming the field."""
    from hataori.errors import ConfigError
    from hataori.interop.load import open_source
    from hataori.train.config import TrainConfig, load_train_config

    folder = hf_llama(tmp_path / "hf", **SHAPES["untied-mha-wide-heads"])
    toy = Path(__file__).resolve().parents[1] / "configs" / "train" / "toy.yaml"
    common = [f"init.from_hf={folder}", "data.datasets=[{path: x}]", "run_dir=r", "data.seq_len=32"]
    cfg: TrainConfig = load_train_config([toy], common)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.head_dim, cfg.model.n_kv_heads) == (64, 2, 24, 4)
    assert (cfg.model.rope_base, cfg.model.norm_eps, cfg.model.tie_embeddings) == (2500.0, 1e-6, False)
    assert (cfg.model.vocab_size, cfg.model.max_seq_len, cfg.model.ffn_hidden) == (300, 64, 96)
    bad = load_train_config([toy], [*common, "model.n_layers=4"])
    with pytest.raises(ConfigError, match="model.n_layers: is 4, but init.from_hf"):
        open_source(bad.init, bad.model, None)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type: is 'gpt2'"),
    ({"attention_bias": True}, "attention_bias: adds biases"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"sliding_window": 4096, "model_type": "mistral"}, "sliding_window: is 4096"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"hidden_act": "gelu"}, "hidden_act: is 'gelu'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
], ids=["architecture", "biases", "rope-scaling", "sliding-window", "moe", "activation", "quantized"])
def test_what_hataori_cannot_represent_is_an_error_naming_the_field(change, message, tmp_path, capsys):
    from hataori.cli import main as hataori_main

    folder = hf_llama(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    assert hataori_main(["pretrain", "configs/train/toy.yaml", f"init.from_hf={folder}",
                         "data.datasets=[{path: x}]", "run_dir=r"]) == 2
    err = capsys.readouterr().err
    assert message in err and "config.json" in err


def test_missing_and_extra_weights_are_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    from hataori.errors import InputError

    folder = hf_llama(tmp_path / "hf")
    weights = folder / "model.safetensors"
    for path in folder.glob("*.safetensors"):
        path.rename(tmp_path / path.name)
    with pytest.raises(InputError, match="no model weights"):
        imported(folder)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, weights, metadata={"format": "pt"})
    with pytest.raises(InputError, match="q_proj.bias"):
        imported(folder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(InputError, match="model.layers.1.mlp.up_proj.weight"):
        imported(folder)


def test_a_tokenizer_that_does_not_belong_to_the_model_is_refused(ja_tokenizer, tmp_path):
    from hataori.errors import ConfigError
    from hataori.interop.hf import HFCheckpoint, model_fields
    from hataori.interop.load import InitConfig, open_source
    from hataori.model import ModelConfig
    from hataori.tokenizer.model import Tokenizer

    folder = hf_llama(tmp_path / "hf")  # 300 rows
    (folder / "tokenizer.model").write_bytes(Tokenizer(ja_tokenizer).proto)  # 4,000 pieces
    cfg = ModelConfig(**model_fields(HFCheckpoint(folder).config, folder / "config.json"))
    with pytest.raises(ConfigError, match="has 4000 pieces, but the model of init.from_hf has 300 embedding rows"):
        open_source(InitConfig(from_hf=str(folder)), cfg, None)
    (folder / "tokenizer.model").unlink()
    grown = ModelConfig(**{**model_fields(HFCheckpoint(folder).config, folder / "config.json"), "vocab_size": 4000})
    with pytest.raises(ConfigError, match="init.base_tokenizer: the run's tokenizer has 4000 pieces"):
        open_source(InitConfig(from_hf=str(folder)), grown, Tokenizer(ja_tokenizer))


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
@pytest.mark.parametrize("stage", [1, 3])
def test_zero_loads_each_partition_from_the_file(stage, tmp_path):
    """Two processes load the same HF checkpoint; ZeRO-3 processes read only their partitions'
    rows (plus at most a row at each end), and the gathered weights equal the file's."""
    folder = hf_llama(tmp_path / "hf", vocab_size=1000, **SHAPES["tied-gqa"])
    out = tmp_path / "result.pt"
    codes = launch_ranks(str(WORKER), ["load", "--hf", str(folder), "--stage", str(stage), "--out", str(out)],
                         tmp_path / "logs", 2, LAUNCH_TIMEOUT_S)
    assert codes == [0, 0], f"exit codes {codes}:\n{log_tails(tmp_path / 'logs')}"
    result = torch.load(out)
    ours = imported(folder)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(result["weights"][name], tensor), name
    total = sum(t.numel() for name, t in ours.named_parameters())
    for rank, read in result["read"].items():
        if stage == 3:  # its half of each weight: within one row of each end
            assert read <= total / 2 + 2 * len(list(ours.parameters())) * 96, (rank, read, total)
        else:
            assert read >= total - (ours.config.padded_vocab_size - 1000) * 64
