"""The Llama-style model against independent references: transformers' LlamaForCausalLM with the
same weights, plain-PyTorch attention and RoPE, separate runs of packed documents, direct counts."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from helpers import built, tiny_config

from hataori.config import load
from hataori.errors import ConfigError
from hataori.interop.hf import hf_llama_config, to_hf_llama_state_dict
from hataori.model import IGNORE_INDEX, ModelConfig, attention
from hataori.model.attention import (BACKENDS, Backend, auto_choice, cu_seqlens_from_doc_ids, doc_ids_from_cu_seqlens,
                                     document_positions)

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "model"


def tokens(batch: int, length: int, seed: int = 1, vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("tie, n_kv_heads, head_dim", [(False, 2, None), (True, 2, None), (False, 4, 32)],
                         ids=["untied-gqa", "tied-gqa", "untied-mha-wide-heads"])
def test_matches_hf_llama(tie, n_kv_heads, head_dim):
    from transformers import LlamaForCausalLM

    cfg = tiny_config(tie_embeddings=tie, n_kv_heads=n_kv_heads, head_dim=head_dim, norm_eps=1e-6)
    ours = built(cfg)
    hf = LlamaForCausalLM(hf_llama_config(cfg, attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(to_hf_llama_state_dict(cfg, ours.state_dict()), strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if tie else [])
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    x = tokens(2, 48)
    with torch.no_grad():
        logits = ours(x)
        hf_out = hf(x, labels=x)
        loss = ours(x[:, :-1], targets=x[:, 1:])  # HF shifts labels inside; we take shifted targets
    assert logits.shape == hf_out.logits.shape == (2, 48, cfg.vocab_size)
    torch.testing.assert_close(logits, hf_out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, hf_out.loss, rtol=1e-5, atol=1e-5)


def test_hf_export_refuses_qk_norm():
    cfg = tiny_config(qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm"):
        to_hf_llama_state_dict(cfg, cfg.build().state_dict())


# ----------------------------------------------------------------------------- attention and RoPE by hand


def naive_attention(q, k, v, allowed):
    """Per-head softmax(q k^T / sqrt(d)) v over an explicit (B, T, T) mask, kv heads repeated by hand."""
    group = q.shape[2] // k.shape[2]
    out = torch.empty_like(q)
    for h in range(q.shape[2]):
        qh, kh, vh = q[:, :, h], k[:, :, h // group], v[:, :, h // group]  # (B, T, Dh)
        scores = qh @ kh.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, T, T)
        out[:, :, h] = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vh
    return out


def allowed_by_loops(layouts: list[list[int]]) -> torch.Tensor:
    """(B, T, T): query t sees key s iff s <= t and no document starts in (s, t]."""
    T = len(layouts[0])
    allowed = torch.zeros(len(layouts), T, T, dtype=torch.bool)
    for b, ids in enumerate(layouts):
        for t in range(T):
            s = t
            while s >= 0 and (s == t or ids[s + 1] == ids[s]):
                allowed[b, t, s] = True
                s -= 1
    return allowed


def test_attention_backend_matches_naive_with_documents_and_gqa():
    torch.manual_seed(0)
    layouts = [[0, 0, 0, 1, 1, 1, 1, 0, 0, 2, 2, 2], [5] * 12]  # id 0 reused later: a new document
    q, k, v = torch.randn(2, 12, 6, 8), torch.randn(2, 12, 3, 8), torch.randn(2, 12, 3, 8)
    doc_ids = torch.tensor(layouts)
    expected = naive_attention(q, k, v, allowed_by_loops(layouts))
    torch.testing.assert_close(attention(q, k, v, doc_ids=doc_ids), expected, rtol=1e-5, atol=1e-5)
    causal = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 12, 12)
    torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v, causal), rtol=1e-5, atol=1e-5)


FLASH_ATTN_MISSING = BACKENDS["flash_attn"].unavailable()


@pytest.mark.skipif(FLASH_ATTN_MISSING is not None, reason=f"flash_attn backend: {FLASH_ATTN_MISSING}")
@pytest.mark.parametrize("with_documents", [False, True], ids=["causal", "documents"])
def test_flash_attn_backend_within_twice_sdpa_error(with_documents):
    """flash-attn in bf16 against an fp32 reference: at most twice SDPA's own bf16 error (plus slack)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 300, 8, 64, device="cuda", generator=gen)
    k, v = (torch.randn(2, 300, 2, 64, device="cuda", generator=gen) for _ in range(2))
    doc_ids = torch.tensor([[0] * 100 + [1] + [2] * 199, [3] * 299 + [4]], device="cuda") if with_documents else None
    exact = attention(q, k, v, doc_ids=doc_ids, backend="sdpa")
    low = [x.bfloat16() for x in (q, k, v)]
    flash_err = (attention(*low, doc_ids=doc_ids, backend="flash_attn").float() - exact).abs().max().item()
    sdpa_err = (attention(*low, doc_ids=doc_ids, backend="sdpa").float() - exact).abs().max().item()
    assert flash_err <= 2 * sdpa_err + 1e-4, (flash_err, sdpa_err)
    assert attention(*low, doc_ids=doc_ids, backend="auto").equal(attention(*low, doc_ids=doc_ids,
                                                                          backend="flash_attn"))


def test_auto_chooses_sdpa_on_a_cpu():
    for dtype in (torch.float32, torch.bfloat16):
        assert auto_choice(torch.device("cpu"), dtype, 64) == "sdpa"
    q, k, v = torch.randn(1, 9, 4, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)
    assert attention(q, k, v, backend="auto").equal(attention(q, k, v, backend="sdpa"))


def test_flash_attn_refuses_what_it_cannot_run():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="fp16/bf16 tensors on a CUDA device; got torch.float32 on cpu"):
        BACKENDS["flash_attn"].fn(q, q, q)
    if FLASH_ATTN_MISSING is not None:
        with pytest.raises(ConfigError, match="'flash_attn' cannot run here: flash-"):
            tiny_config(attention_backend="flash_attn").build()


def test_document_layout_helpers():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0], [2, 2, 2, 2, 2, 2, 3, 3]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]]
    cu = cu_seqlens_from_doc_ids(doc_ids)
    assert cu.tolist() == [0, 3, 5, 8, 14, 16]
    assert cu_seqlens_from_doc_ids(doc_ids_from_cu_seqlens(cu, 2, 8)).tolist() == cu.tolist()


def rope_by_complex(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE as complex rotation of channel pairs (i, i + Dh/2) by angle pos * base^(-2i/Dh)."""
    half = x.shape[-1] // 2
    freqs = base ** -(torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])  # (Dh/2,)
    rotation = torch.polar(torch.ones(()), (positions[:, None].double() * freqs).float())  # (T, Dh/2)
    z = torch.complex(x[..., :half], x[..., half:]) * rotation[None, :, None, :]  # (B, T, H, Dh/2)
    return torch.cat([z.real, z.imag], dim=-1)


def test_attention_layer_with_qk_norm_by_hand():
    cfg = tiny_config(qk_norm=True)
    model = built(cfg)
    layer = model.blocks[0].attn
    x = torch.randn(2, 16, cfg.d_model)
    B, T, H, H_kv, Dh = 2, 16, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def rms_norm(t, weight):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    q = rms_norm((x @ layer.wq.weight.T).view(B, T, H, Dh), layer.q_norm.weight)
    k = rms_norm((x @ layer.wk.weight.T).view(B, T, H_kv, Dh), layer.k_norm.weight)
    v = (x @ layer.wv.weight.T).view(B, T, H_kv, Dh)
    positions = torch.arange(T)
    q, k = rope_by_complex(q, positions, cfg.rope_base), rope_by_complex(k, positions, cfg.rope_base)
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    expected = naive_attention(q, k, v, causal).reshape(B, T, H * Dh) @ layer.wo.weight.T

    with torch.no_grad():
        got = layer(x, model.context(x, None))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- packing and batching


def test_doc_masking_with_one_document_is_plain_causal():
    model = built(tiny_config(qk_norm=True))
    x = tokens(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(x, doc_ids=torch.full_like(x, 7)), model(x), rtol=1e-5, atol=1e-5)


def test_packed_documents_equal_separate_documents():
    model = built(tiny_config())
    lengths = [9, 14, 1, 8]
    docs = [tokens(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)  # (1, 32)
    doc_ids = torch.cat([torch.full((1, n), i % 2) for i, n in enumerate(lengths)], dim=1)  # ids 0, 1, 0, 1
    with torch.no_grad():
        packed_logits = model(packed, doc_ids=doc_ids)
        start = 0
        for doc in docs:
            alone = model(doc)
            torch.testing.assert_close(packed_logits[:, start:start + doc.shape[1]], alone, rtol=1e-5, atol=1e-5)
            start += doc.shape[1]
        # Without doc masking the same row is one causal sequence: later documents see earlier ones.
        unmasked = built(tiny_config(doc_masking=False))(packed, doc_ids=doc_ids)
        torch.testing.assert_close(unmasked, model(packed))
        assert not torch.allclose(unmasked[:, 9:23], packed_logits[:, 9:23], atol=1e-3)


def test_batch_of_two_equals_two_singles():
    model = built(tiny_config())
    x = tokens(2, 24)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    with torch.no_grad():
        for ids in (None, doc_ids):
            both = model(x, doc_ids=ids)
            for b in range(2):
                single = model(x[b:b + 1], doc_ids=None if ids is None else ids[b:b + 1])
                torch.testing.assert_close(both[b:b + 1], single, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- loss and vocabulary


def test_padded_vocabulary_does_not_affect_loss():
    cfg = tiny_config()
    assert cfg.padded_vocab_size == 1024
    model = built(cfg).train()
    x, y = tokens(2, 20), tokens(2, 20, seed=2)
    y[0, :5] = IGNORE_INDEX
    logits = model(x)
    assert logits.shape == (2, 20, cfg.vocab_size)
    keep = y != IGNORE_INDEX
    expected = -logits.log_softmax(-1)[keep].gather(1, y[keep][:, None]).mean()
    loss = model(x, targets=y)
    torch.testing.assert_close(loss, expected)

    loss.backward()
    assert model.lm_head.weight.grad[cfg.vocab_size:].abs().max() == 0
    with torch.no_grad():
        model.lm_head.weight[cfg.vocab_size:] = 1e4  # padded rows that would dominate any softmax
    torch.testing.assert_close(model(x, targets=y), loss)


def test_loss_is_fp32_under_bf16():
    model = built(tiny_config()).to(torch.bfloat16)
    x = tokens(1, 16)
    loss = model(x, targets=x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_bf16_parameters_with_fp32_buffers_match_the_fp32_model():
    """DeepSpeed casts parameters to bf16 and leaves buffers (the RoPE tables) in fp32."""
    reference = built(tiny_config())
    model = built(tiny_config())
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for b in model.buffers())
    x = tokens(2, 32)
    doc_ids = torch.tensor([[0] * 10 + [1] * 22, [0] * 32])
    logits = model(x, doc_ids=doc_ids)
    assert logits.dtype == torch.bfloat16
    expected = reference(x, doc_ids=doc_ids)
    assert (logits.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_sequence_longer_than_max_seq_len_is_an_error():
    with pytest.raises(ValueError, match="max_seq_len=64"):
        built(tiny_config())(tokens(1, 65))


# ----------------------------------------------------------------------------- checkpointing and init


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = tiny_config(qk_norm=True)
    x, y = tokens(2, 24), tokens(2, 24, seed=3)
    doc_ids = torch.tensor([[0] * 11 + [1] * 13, [0] * 24])
    grads = []
    for checkpointing in (False, True):
        model = built(dataclasses.replace(cfg, activation_checkpointing=checkpointing)).train()
        loss = model(x, doc_ids=doc_ids, targets=y)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_plain, plain), (loss_ckpt, ckpt) = grads
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


def test_scaled_initialisation():
    cfg = tiny_config(d_model=256, n_heads=4, n_kv_heads=4, n_layers=8, tie_embeddings=True, init_std=0.02)
    torch.manual_seed(0)
    model = cfg.build()
    scaled = 0.02 / math.sqrt(16)
    assert model.lm_head.weight is model.tok_embeddings.weight
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.all(p == 1), name
        else:
            expected = scaled if name.endswith(("attn.wo.weight", "mlp.w_down.weight")) else 0.02
            assert abs(p.std().item() / expected - 1) < 0.05, (name, p.std().item(), expected)


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}, {"qk_norm": True, "n_kv_heads": 1},
                                       {"head_dim": 24, "ffn_hidden": 100}])
def test_num_params_and_flops_match_the_module(overrides):
    cfg = tiny_config(**overrides)
    model = cfg.build()
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention_term = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 50
    assert cfg.flops_per_token(50) == 6 * matmul_weights + attention_term


EXPECTED_PRESETS = {"toy": (1e6, 10e6), "125m": (0.1e9, 0.2e9), "1b": (0.9e9, 1.5e9),
                    "7b": (6e9, 8e9), "30b": (28e9, 35e9)}


def test_presets_load_and_have_their_size():
    found = {p.stem: p for p in PRESETS.glob("*.yaml") if p.stem != "base"}
    assert found.keys() == EXPECTED_PRESETS.keys()
    for name, path in found.items():
        cfg = load(ModelConfig, [path])  # counted from the shape; the large ones are never built
        low, high = EXPECTED_PRESETS[name]
        assert low <= cfg.num_params() <= high, (name, cfg.num_params())
    llama2_7b = load(ModelConfig, [found["7b"]])
    assert (llama2_7b.ffn_hidden, llama2_7b.head_dim, llama2_7b.n_kv_heads) == (11008, 128, 32)


def test_toy_preset_builds_and_runs():
    cfg = load(ModelConfig, [PRESETS / "toy.yaml"], ["n_layers=1"])
    model = cfg.build()
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    x = tokens(1, 32, vocab=cfg.vocab_size)
    assert model(x).shape == (1, 32, cfg.vocab_size)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, key, message", [
    ({"n_kv_heads": 3}, "n_kv_heads", "must divide n_heads=4"),
    ({"d_model": 66}, "n_heads", "must divide d_model=66"),
    ({"head_dim": 15}, "head_dim", "must be even"),
    ({"vocab_size": 0}, "vocab_size", "positive"),
    ({"rope_base": -1.0}, "rope_base", "positive"),
    ({"attention_backend": "flash"}, "attention_backend", "choose one of auto, flash_attn, sdpa, triton"),
    ({"fused_kernels": "cuda"}, "fused_kernels", "must be one of torch, triton, auto"),
])
def test_config_errors_name_the_key(overrides, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        tiny_config(**overrides)
    assert err.value.key == key


def test_config_errors_from_the_loader_name_the_key():
    with pytest.raises(ConfigError, match="did you mean 'n_kv_heads'"):
        load(ModelConfig, [PRESETS / "toy.yaml"], ["n_kv_head=2"])
    with pytest.raises(ConfigError, match="n_kv_heads: must divide n_heads=4"):
        load(ModelConfig, [PRESETS / "toy.yaml"], ["n_kv_heads=3"])
    with pytest.raises(ConfigError, match="d_model: is required"):
        load(ModelConfig, [PRESETS / "base.yaml"])


def test_build_allocates_on_the_given_device_in_the_given_dtype():
    cfg = tiny_config(tie_embeddings=True)
    torch.manual_seed(3)
    whole = cfg.build()
    torch.manual_seed(3)
    half = cfg.build("cpu", torch.bfloat16)
    assert half.lm_head.weight is half.tok_embeddings.weight
    assert half.rope_cos.dtype == torch.float32 and torch.equal(half.rope_cos, whole.rope_cos)
    for (name, mine), ref in zip(half.named_parameters(), whole.parameters()):
        assert mine.dtype == torch.bfloat16 and torch.equal(mine, ref.bfloat16()), name
    placed = cfg.build(torch.device("meta"))
    assert {t.device.type for t in [*placed.parameters(), *placed.buffers()]} == {"meta"}


def test_kernels_on_a_cpu():
    assert tiny_config().kernels_on(torch.device("cpu"), torch.bfloat16) == \
        "attention sdpa (auto), RMSNorm/RoPE/SwiGLU torch (auto)"
    fused = tiny_config(attention_backend="triton", fused_kernels="triton")
    assert fused.kernels_on(torch.device("cpu"), torch.float32) == \
        "attention triton (triton), RMSNorm/RoPE/SwiGLU triton (triton)"


def test_chosen_backend_that_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setitem(BACKENDS, "gpu-only", Backend(BACKENDS["sdpa"].fn, lambda: "it needs a CUDA device"))
    cfg = tiny_config(attention_backend="gpu-only")  # known name: the config is valid
    with pytest.raises(ConfigError, match="'gpu-only' cannot run here: it needs a CUDA device") as err:
        cfg.build()
    assert err.value.key == "attention_backend"
