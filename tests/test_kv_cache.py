"""The key/value cache (hataori/model/cache.py) and cached generation (hataori/eval/generate.py): logits equal to
the model's forward over each row's unpadded tokens, greedy tokens equal to the uncached path and to
transformers' generate of the same weights, whatever the batch's composition, and the cache's memory per token."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_config

from hataori.errors import ConfigError
from hataori.eval.generate import Sampling, generate, generate_batch, generate_uncached
from hataori.interop.hf import hf_llama_config, to_hf_llama_state_dict
from hataori.model.cache import KVCache, bytes_per_token, left_pad

GREEDY = Sampling(greedy=True)
PROMPTS = [[3, 14, 15, 92, 65], [7], list(range(1, 30)), [5, 5, 5, 9], [999, 1, 998, 2, 997, 3]]
"""Prompts of 1 to 29 tokens: a batch of them is left-padded by up to 28 positions."""
SHAPES = {"gqa": {}, "gqa-qk_norm": dict(qk_norm=True), "mha-tied": dict(n_kv_heads=4, tie_embeddings=True),
          "one-kv-head": dict(n_kv_heads=1, n_heads=4)}


def model_of(**fields) -> torch.nn.Module:
    """The tests' tiny model, weights far enough from zero that its tokens depend on the whole context."""
    torch.manual_seed(0)
    return tiny_config(init_std=0.2, **fields).build().eval()


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cached_logits_equal_the_forward_over_each_unpadded_row(shape):
    """A left-padded batch through the cache (prefill, then three one-token steps) gives every real position the
    logits of the model's plain forward over that row's tokens alone, to fp32 rounding."""
    model = model_of(**shape)
    ids, valid = left_pad(PROMPTS, pad_id=0)
    cache = KVCache.empty(model.config, len(PROMPTS), 40, device="cpu", dtype=torch.float32)
    rows = [list(p) for p in PROMPTS]
    with torch.no_grad():
        got = [model(ids, cache=cache, valid=valid)]
        for step in range(3):
            new = torch.tensor([[11 + 7 * row + step] for row in range(len(PROMPTS))])
            got.append(model(new, cache=cache))
            for row, token in enumerate(new[:, 0].tolist()):
                rows[row].append(token)
        assert cache.length == ids.shape[1] + 3 and cache.positions.tolist() == [len(r) for r in rows]
        for row, tokens in enumerate(rows):
            want = model(torch.tensor([tokens]))[0]  # (T, V)
            cached = torch.cat([got[0][row, valid[row]]] + [step[row] for step in got[1:]])  # (T, V)
            torch.testing.assert_close(cached, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_greedy_tokens_equal_the_uncached_path_in_every_batch_composition(shape):
    """Greedy decoding of each prompt: cached alone, in one batch of all, and in two batches of other orders all
    give the tokens of the uncached path (a full forward for every new token)."""
    model = model_of(**shape)
    want = [generate_uncached(model, p, max_new_tokens=16, eos_id=None, sampling=GREEDY) for p in PROMPTS]
    assert [generate(model, p, max_new_tokens=16, eos_id=None, sampling=GREEDY) for p in PROMPTS] == want
    assert generate_batch(model, PROMPTS, max_new_tokens=16, eos_id=None, sampling=GREEDY) == want
    order = [4, 2, 0]
    assert generate_batch(model, [PROMPTS[i] for i in order], max_new_tokens=16, eos_id=None,
                          sampling=GREEDY) == [want[i] for i in order]
    assert generate_batch(model, [PROMPTS[3], PROMPTS[1]], max_new_tokens=16, eos_id=None,
                          sampling=GREEDY, pad_id=17) == [want[3], want[1]]  # the pad's id does not matter


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_greedy_tokens_equal_transformers_generate(tie):
    """transformers' LlamaForCausalLM with the same weights, given the same left-padded batch and its attention
    mask, generates greedily the same tokens as hataori, for the batch and for each prompt alone."""
    from transformers import LlamaForCausalLM

    model = model_of(tie_embeddings=tie)
    cfg = model.config
    hf = LlamaForCausalLM(hf_llama_config(cfg, bos_token_id=None, eos_token_id=None, pad_token_id=0)).eval()
    hf.load_state_dict(to_hf_llama_state_dict(cfg, model.state_dict()), strict=not tie)
    ours = generate_batch(model, PROMPTS, max_new_tokens=24, eos_id=None, sampling=GREEDY)
    ids, valid = left_pad(PROMPTS, pad_id=0)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=24, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    assert out[:, ids.shape[1]:].tolist() == ours
    for prompt, tokens in zip(PROMPTS[:2], ours):
        with torch.no_grad():
            alone = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
        assert alone[0, len(prompt):].tolist() == tokens


def test_rows_stop_at_their_own_eos_or_stop_id_and_the_rest_go_on():
    """Each row ends at its first EOS or stop id (included), the others keep going to max_new_tokens."""
    model = model_of()
    free = generate_batch(model, PROMPTS, max_new_tokens=12, eos_id=None, sampling=GREEDY)
    eos, stop = free[0][3], free[2][5]
    stopped = generate_batch(model, PROMPTS, max_new_tokens=12, eos_id=eos, sampling=GREEDY, stop_ids=(stop,))
    for tokens, got in zip(free, stopped):
        ends = [i for i, t in enumerate(tokens) if t in (eos, stop)]
        assert got == (tokens[:ends[0] + 1] if ends else tokens)
    assert len(stopped[0]) <= 4 and len(stopped[2]) <= 6 and len({len(t) for t in stopped}) > 1


def test_seeded_sampling_repeats():
    model = model_of()
    sampling = Sampling(temperature=0.8, top_k=20, top_p=0.9)
    runs = [generate_batch(model, PROMPTS, max_new_tokens=10, eos_id=None, sampling=sampling,
                           generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_the_context_rule():
    """A prompt and its new tokens fit max_seq_len: a prompt keeps its last max_seq_len - min(max_new_tokens,
    max_seq_len / 2) tokens, cached and uncached alike, and generation stops when the context is full."""
    model = model_of()
    n = model.config.max_seq_len  # 64
    long_prompt = [(7 * i) % 1000 for i in range(1, 91)]
    new = generate(model, long_prompt, max_new_tokens=8, eos_id=None, sampling=GREEDY)
    assert len(new) == 8
    assert new == generate(model, long_prompt[-(n - 8):], max_new_tokens=8, eos_id=None, sampling=GREEDY)
    assert new == generate_uncached(model, long_prompt, max_new_tokens=8, eos_id=None, sampling=GREEDY)
    half = generate(model, long_prompt, max_new_tokens=100, eos_id=None, sampling=GREEDY)  # keeps the last 32
    assert half == generate_uncached(model, long_prompt[-n // 2:], max_new_tokens=100, eos_id=None, sampling=GREEDY)
    assert len(half) == n // 2  # then the context is full
    assert len(generate(model, [1, 2], max_new_tokens=100, eos_id=None, sampling=GREEDY)) == n - 2
    with pytest.raises(ConfigError, match="--max-new-tokens: must be >= 1, got 0"):
        generate(model, [1, 2], max_new_tokens=0, eos_id=None, sampling=GREEDY)
    cache = KVCache.empty(model.config, 1, 4, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="the cache holds 4 positions; 0 are filled and 5 more do not fit"):
        model(torch.ones((1, 5), dtype=torch.long), cache=cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_memory_per_token_is_what_the_cache_allocates(dtype):
    """bytes_per_token (2 x layers x key/value heads x head width x element size) against the bytes the cache's
    tensors hold, per row and position; GQA keeps only the key/value heads."""
    for shape in SHAPES.values():
        cfg = tiny_config(**shape)
        cache = KVCache.empty(cfg, 3, 40, device="cpu", dtype=dtype)
        held = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
        assert held == 3 * 40 * bytes_per_token(cfg, dtype)
        assert bytes_per_token(cfg, dtype) == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize


def test_a_non_finite_value_in_the_cache_is_never_hidden():
    """A token whose embedding is NaN makes its own and every later position of its row NaN, in the prefill and
    in every step after it (the queries read its key and value from the cache), as the plain forward does; the
    other rows of the batch stay finite. (Positions before it may turn NaN too, a masked NaN times a zero
    weight: spreading is allowed, hiding is not; hataori.model.attention's rule.)"""
    model = model_of()
    with torch.no_grad():
        model.tok_embeddings.weight[777] = float("nan")
        prompts = [[3, 14, 777, 92, 65], [5, 6, 7]]
        ids, valid = left_pad(prompts, pad_id=0)
        cache = KVCache.empty(model.config, 2, 16, device="cpu", dtype=torch.float32)
        first = model(ids, cache=cache, valid=valid)
        step = model(torch.tensor([[8], [9]]), cache=cache)
        plain = model(torch.tensor([prompts[0] + [8]]))[0]
    assert torch.isnan(first[0, 2:]).all() and torch.isnan(step[0]).all()
    assert torch.isnan(plain[2:]).all()
    assert torch.isfinite(first[1, valid[1]]).all() and torch.isfinite(step[1]).all()
