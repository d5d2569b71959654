"""LoRA adapters against independent references: the base model's own output at initialisation, a plain
model holding the merged weights, an explicit ``x W^T + s x A^T B^T``, and Hugging Face PEFT's
LoraModel on transformers' LlamaForCausalLM loading the exported adapter."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import built, tiny_config  # built: the model with weights far from init

from hataori.errors import ConfigError
from hataori.interop.hf import hf_llama_config, to_hf_llama_state_dict
from hataori.interop.peft import peft_config, peft_state_dict
from hataori.model import LoRAConfig, LoRALinear, apply_lora, merged_state_dict
from hataori.model.lora import lora_modules


def randomize_adapters(model, seed: int = 1) -> None:
    """Adapters far from their init (B is zero there, which would hide any mistake in A or B)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=generator) * 0.1)
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)


def tokens(batch: int, length: int, seed: int = 2, vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_output_equals_the_base_at_initialisation_and_names_are_kept():
    model = built(tiny_config(n_layers=3))
    x = tokens(2, 16)
    with torch.no_grad():
        before = model(x)
    base_state = model.state_dict()
    wq = model.blocks[0].attn.wq.weight
    cfg = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=("attn.wq", "blocks.1.attn.wk", "mlp.*"))
    adapted = apply_lora(model, cfg)

    layers = range(3)
    assert adapted == [name for i in layers for name in
                       [f"blocks.{i}.attn.wq", *([f"blocks.{i}.attn.wk"] if i == 1 else []),
                        f"blocks.{i}.mlp.w_gate", f"blocks.{i}.mlp.w_up", f"blocks.{i}.mlp.w_down"]]
    assert isinstance(model.blocks[0].attn.wq, LoRALinear) and model.blocks[0].attn.wq.weight is wq
    adapter_keys = {f"{name}.{ab}" for name in adapted for ab in ("lora_A", "lora_B")}
    assert set(model.state_dict()) == set(base_state) | adapter_keys
    assert not model.blocks[0].attn.wq.lora_B.any()
    with torch.no_grad():
        after = model(x)  # eval: no dropout
    assert torch.equal(after, before)


def test_plain_model_with_merged_weights_gives_the_lora_logits():
    cfg = tiny_config(n_layers=3)
    model = built(cfg)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("attn.*", "mlp.*", "lm_head")))
    randomize_adapters(model)
    plain = cfg.build()
    plain.load_state_dict(merged_state_dict(model))  # strict: exactly the plain model's keys
    x = tokens(2, 24)
    with torch.no_grad():
        lora_logits, merged_logits, base_logits = model(x), plain.eval()(x), built(cfg)(x)
    torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-5, atol=1e-5)
    assert (lora_logits - base_logits).abs().max() > 1e-2  # the adapters do change the output


def test_frozen_base_gets_no_gradient_and_stays_bitwise_while_adapters_train():
    model = built(tiny_config(n_layers=3))
    model.train()
    cfg = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=("attn.wq", "attn.wv"), train_also=("norm",))
    adapted = apply_lora(model, cfg)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{ab}" for name in adapted for ab in ("lora_A", "lora_B")} | {"norm.weight"}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # frozen ones included
    x = tokens(2, 16)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        model(x[:, :-1], targets=x[:, 1:]).backward()
        for name, p in model.named_parameters():
            assert (p.grad is None) == (name not in trainable), name
        optimizer.step()
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


@pytest.mark.parametrize("rslora, scaling", [(False, 8.0 / 16), (True, 8.0 / 4)], ids=["alpha-over-r", "rslora"])
def test_scale_and_output_match_the_formula(rslora, scaling):
    cfg = LoRAConfig(rank=16, alpha=8.0, rslora=rslora)
    assert cfg.scaling == scaling
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=True)
    layer = LoRALinear(linear, rank=cfg.rank, scaling=cfg.scaling)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 24)
    expected = x @ linear.weight.T + linear.bias + scaling * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x @ layer.merged_weight().T + linear.bias, expected, rtol=1e-5, atol=1e-5)


def test_pattern_matching_nothing_names_the_models_modules():
    model = built(tiny_config(n_layers=3))
    with pytest.raises(ConfigError, match="'attn.q_proj'") as err:
        apply_lora(model, LoRAConfig(targets=("attn.wq", "attn.q_proj")))
    assert err.value.key == "targets"
    for name in ("blocks.*.attn.wq", "blocks.*.attn.wo", "blocks.*.mlp.w_down", "lm_head"):
        assert name in err.value.message
    with pytest.raises(ConfigError, match="'output'.*tok_embeddings") as err:
        apply_lora(model, LoRAConfig(targets=("attn.wq",), train_also=("output",)))
    assert err.value.key == "train_also"
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())  # left untouched


@pytest.mark.parametrize("model_overrides, lora, key, message", [
    ({}, dict(targets=("attn.wq",), train_also=("blocks.0.attn",)), "train_also", "blocks.0.attn.wq.weight"),
    ({"tie_embeddings": True}, dict(targets=("lm_head",)), "targets", "tie_embeddings"),
    ({"chunked_loss": True}, dict(targets=("lm_head",)), "targets", "chunked_loss"),
    ({}, dict(rank=0), "rank", "positive"),
    ({}, dict(dropout=1.0), "dropout", r"\[0, 1\)"),
    ({}, dict(targets=()), "targets", "empty"),
], ids=["train-also-holds-adapted", "tied-lm-head", "chunked-lm-head", "rank", "dropout", "no-targets"])
def test_refuses_what_it_cannot_do(model_overrides, lora, key, message):
    model = built(tiny_config(n_layers=3, **model_overrides))
    with pytest.raises(ConfigError, match=message) as err:
        apply_lora(model, LoRAConfig(**lora))
    assert err.value.key == key


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_peft_adapter_on_hf_llama_gives_the_same_logits(tie, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    cfg = tiny_config(n_layers=3, tie_embeddings=tie)
    model = built(cfg)
    hf = LlamaForCausalLM(hf_llama_config(cfg, attn_implementation="eager"))
    hf.load_state_dict(to_hf_llama_state_dict(cfg, model.state_dict()), strict=not tie)
    targets = ("attn.wq", "attn.wv", "blocks.1.attn.wk", "mlp.*") + (() if tie else ("lm_head",))
    lora = LoRAConfig(rank=4, alpha=4.0, dropout=0.05, rslora=True, targets=targets,
                      train_also=("tok_embeddings", "blocks.2.mlp_norm"))
    apply_lora(model, lora)
    randomize_adapters(model)
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0.0, 0.1)
        model.blocks[2].mlp_norm.weight.uniform_(0.5, 1.5)

    config = peft_config(model, lora, base_model_name_or_path="hataori-tiny")
    assert set(config["target_modules"]) == {"q_proj", "model.layers.1.self_attn.k_proj", "v_proj", "gate_proj",
                                             "up_proj", "down_proj", *([] if tie else ["lm_head"])}
    assert set(config["modules_to_save"]) == {"model.embed_tokens", "model.layers.2.post_attention_layernorm",
                                              *(["lm_head"] if tie else [])}
    state = peft_state_dict(model, lora)
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "adapter_model.safetensors"))
    x = tokens(2, 24)
    with torch.no_grad():
        base = hf.eval()(input_ids=x).logits
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    with torch.no_grad():
        ours, theirs = model.eval()(x), peft_model(input_ids=x).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (theirs - base).abs().max() > 1e-2  # the adapter was loaded and does change the output
