"""The Triton attention kernel against plain-PyTorch attention, forward and backward.

Tolerance (flash-attention's rule): the kernel's largest error against a high-precision reference
(fp64 for fp32 inputs, fp32 otherwise) is at most twice that of the same computation done by
PyTorch in the kernel's dtype, plus a small absolute slack, for the output and for dQ, dK, dV.

Without a GPU the kernels run on CPU through Triton's interpreter: TRITON_INTERPRET=1 is set only
while hataori.kernels.attention is imported (Triton picks the interpreter when it decorates the
kernels), then restored, so other tests and their subprocesses see the environment unchanged.
Shapes are small because the interpreter is slow. On a GPU the same tests run in bf16 too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import REPO, load_script
from triton_tests import (DEVICE, DTYPES, ON_GPU, SLACK, compile_for_hopper, import_kernel, max_err, reference_dtype,
                          run_without_interpreter)

from hataori.model import ModelConfig
from hataori.model.attention import BACKENDS, attention, cu_seqlens_from_doc_ids

kernels = import_kernel("attention")
pytestmark = pytest.mark.usefixtures("triton_interpreter")


def random_inputs(tokens_shape: tuple[int, ...], n_heads: int, n_kv_heads: int, head_dim: int,
                  dtype: torch.dtype, seed: int = 0, strided: bool = False):
    """q, k, v with the heads axis second to last; ``strided``: views of (heads, tokens, Dh) tensors."""
    gen = torch.Generator().manual_seed(seed)

    def make(heads):
        if strided:  # (heads, *tokens, Dh) transposed: tokens not the outer stride
            x = torch.randn(heads, *tokens_shape, head_dim, generator=gen).movedim(0, -2)
        else:
            x = torch.randn(*tokens_shape, heads, head_dim, generator=gen)
        return x.to(DEVICE, dtype)

    return make(n_heads), make(n_kv_heads), make(n_kv_heads)


def check_against_reference(q, k, v, cu_seqlens=None, causal=True, softmax_scale=None, seed=1):
    """Run the kernel, PyTorch in the same dtype and the high-precision reference, forward and
    backward, and assert the rule of the module docstring for out, dq, dk, dv."""
    dtype = q.dtype
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE, dtype)
    kwargs = dict(cu_seqlens=cu_seqlens, causal=causal, softmax_scale=softmax_scale)

    def run(fn, inputs, **extra):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        out = fn(*leaves, **kwargs, **extra)
        out.backward(dout.to(out.dtype))
        return [out.detach()] + [x.grad for x in leaves]

    ours = run(kernels.flash_attention, (q, k, v))
    same_dtype = run(kernels.attention_ref, (q, k, v), upcast=False)
    ref = run(kernels.attention_ref, [x.to(reference_dtype(dtype)) for x in (q, k, v)])
    for name, mine, torch_same, exact in zip(("out", "dq", "dk", "dv"), ours, same_dtype, ref):
        assert mine.dtype == dtype and mine.shape == exact.shape
        ours_err, torch_err = max_err(mine, exact), max_err(torch_same, exact)
        assert ours_err <= 2 * torch_err + SLACK[dtype], (
            f"{name}: kernel error {ours_err:.3g} exceeds twice PyTorch's {torch_err:.3g} in {dtype}")


# (batch, seq_len, n_heads, n_kv_heads, head_dim): lengths off the 16/32 blocks, GQA ratios 1-8
PADDED_CASES = {
    "T1-gqa2": (2, 1, 2, 1, 16),
    "T17-gqa4": (2, 17, 4, 1, 32),
    "T63-mha-d64": (1, 63, 2, 2, 64),
    "T100-gqa8": (1, 100, 8, 1, 16),
    "T40-d128": (1, 40, 2, 1, 128),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PADDED_CASES.values(), ids=PADDED_CASES.keys())
def test_padded_batch_matches_reference(case, dtype):
    batch, seq_len, n_heads, n_kv_heads, head_dim = case
    q, k, v = random_inputs((batch, seq_len), n_heads, n_kv_heads, head_dim, dtype)
    check_against_reference(q, k, v)


# document lengths of a packed batch: documents of length 1 at the start, middle and end, an empty one
PACKED_CASES = {
    "docs-gqa2-d32": ([1, 37, 1, 0, 20, 33, 1], 4, 2, 32),
    "docs-gqa8-d16": ([5, 1, 50, 1], 8, 1, 16),
}


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PACKED_CASES.values(), ids=PACKED_CASES.keys())
def test_packed_documents_match_reference(case, dtype):
    lengths, n_heads, n_kv_heads, head_dim = case
    q, k, v = random_inputs((sum(lengths),), n_heads, n_kv_heads, head_dim, dtype, strided=True)
    assert q.stride(0) == head_dim  # tokens are not the outer stride: the kernel follows strides
    check_against_reference(q, k, v, cu_seqlens=cu_seqlens_of(lengths))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_causal_with_scale_matches_reference(dtype):
    q, k, v = random_inputs((45,), 4, 2, 32, dtype)
    check_against_reference(q, k, v, cu_seqlens=cu_seqlens_of([19, 1, 25]), causal=False, softmax_scale=0.3)


def test_packed_documents_equal_separate_runs():
    """A packed batch gives each document what it gets alone: nothing crosses a boundary."""
    lengths = [3, 1, 40, 1]
    q, k, v = random_inputs((sum(lengths),), 4, 2, 16, torch.float32, seed=3)
    packed = kernels.flash_attention(q, k, v, cu_seqlens=cu_seqlens_of(lengths))
    for doc, piece in zip(torch.split(torch.arange(sum(lengths)), lengths), packed.split(lengths)):
        alone = kernels.flash_attention(q[doc][None], k[doc][None], v[doc][None])[0]
        torch.testing.assert_close(piece, alone, rtol=0, atol=0)


def test_log_sum_exp_matches_reference():
    lengths = [30, 1, 17]
    q, k, v = random_inputs((sum(lengths),), 4, 1, 32, torch.float32, seed=4)
    cu_seqlens = cu_seqlens_of(lengths)
    _, lse = kernels.flash_attention_forward(q, k, v, cu_seqlens)  # (H, total)
    token = torch.arange(sum(lengths), device=DEVICE)
    doc = torch.searchsorted(cu_seqlens[1:].long(), token, right=True)
    allowed = (doc[:, None] == doc[None, :]) & (token[None, :] <= token[:, None])  # (total, total)
    k_full = k.double().repeat_interleave(4, dim=1)  # (total, H, Dh)
    scores = torch.einsum("thd,shd->hts", q.double(), k_full) / 32 ** 0.5  # (H, total, total)
    expected = scores.masked_fill(~allowed, float("-inf")).logsumexp(dim=-1)  # (H, total)
    torch.testing.assert_close(lse.double(), expected, rtol=0, atol=2e-6)


def test_rejects_bad_inputs():
    q, k, v = random_inputs((2, 8), 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        kernels.flash_attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="head_dim 24 is not supported"):
        kernels.flash_attention(*random_inputs((2, 8), 4, 2, 24, torch.float32))
    with pytest.raises(TypeError, match="share one dtype"):
        kernels.flash_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="share one dtype"):
        kernels.flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="same B and T"):
        kernels.flash_attention(q, k[:, :5], v[:, :5])
    flat = [x.flatten(0, 1) for x in (q, k, v)]  # (16, heads, 16)
    with pytest.raises(ValueError, match="int32"):
        kernels.flash_attention(*flat, cu_seqlens=torch.tensor([0, 16], device=DEVICE))
    with pytest.raises(ValueError, match="rise from 0 to total_tokens=16"):
        kernels.flash_attention(*flat, cu_seqlens=cu_seqlens_of([4, 8]))
    with pytest.raises(ValueError, match="rise from 0 to total_tokens=16"):
        kernels.flash_attention(*flat, cu_seqlens=torch.tensor([0, 10, 6, 16], dtype=torch.int32,
                                                               device=DEVICE))


# ----------------------------------------------------------------------------- through the model


def test_triton_backend_matches_sdpa_with_documents():
    doc_ids = torch.tensor([[0] * 20 + [1] + [2] * 27, [3] * 47 + [4]], device=DEVICE)  # (2, 48)
    q, k, v = random_inputs((2, 48), 4, 2, 16, torch.float32, seed=5)
    torch.testing.assert_close(attention(q, k, v, doc_ids=doc_ids, backend="triton"),
                               attention(q, k, v, doc_ids=doc_ids, backend="sdpa"), rtol=1e-5, atol=1e-6)

    cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    ids = torch.randint(0, 1000, (2, 49), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    results = []
    for backend in ("sdpa", "triton"):
        torch.manual_seed(0)
        model = dataclasses.replace(cfg, attention_backend=backend).build().to(DEVICE)
        loss = model(ids[:, :-1], doc_ids=doc_ids, targets=ids[:, 1:])
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (sdpa_loss, sdpa_grads), (triton_loss, triton_grads) = results
    torch.testing.assert_close(triton_loss, sdpa_loss, rtol=1e-6, atol=1e-6)
    assert triton_grads.keys() == sdpa_grads.keys()
    for name, grad in triton_grads.items():
        torch.testing.assert_close(grad, sdpa_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert cu_seqlens_from_doc_ids(doc_ids).tolist() == [0, 20, 21, 48, 95, 96]


def reads_nonfinite_by_loops(q, k, v, layout: list[int]) -> torch.Tensor:
    """(T, H) bool: whether fp64 attention, position by position over the keys each query may see, is
    non-finite there (q, k, v of one row)."""
    T, H, Dh = q.shape[1:]
    group = H // k.shape[2]
    out = torch.zeros(T, H, dtype=torch.bool)
    for t in range(T):
        first = t
        while first > 0 and layout[first - 1] == layout[t]:
            first -= 1
        for h in range(H):
            keys, values = k[0, first:t + 1, h // group].double(), v[0, first:t + 1, h // group].double()
            weights = torch.softmax(keys @ q[0, t, h].double() / Dh ** 0.5, dim=0)
            out[t, h] = not torch.isfinite(weights @ values).all()
    return out


NONFINITE_BACKENDS = ["sdpa", "triton", pytest.param("flash_attn", marks=pytest.mark.skipif(
    not ON_GPU or BACKENDS["flash_attn"].unavailable() is not None, reason="flash-attn runs on a GPU, when installed"))]


@pytest.mark.slow
@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
def test_no_backend_hides_a_non_finite_input(backend):
    """NaN, inf or -inf at each position of q, k or v, with and without documents: wherever fp64 attention
    over the keys a query sees is non-finite, the backend's output is too (SDPA's fused CPU kernel returned
    finite rows for a NaN query until the sdpa backend checked)."""
    dtype = torch.bfloat16 if backend == "flash_attn" else torch.float32
    T, layout = 12, [0] * 5 + [1] * 7
    hidden = []
    for docs in (None, torch.tensor([layout], device=DEVICE)):
        for where in "qkv":
            for value in (float("nan"), float("inf"), float("-inf")):
                for position in range(T):
                    q, k, v = random_inputs((1, T), 4, 2, 16, dtype, seed=position)
                    with torch.no_grad():
                        {"q": q, "k": k, "v": v}[where][0, position, 0, 3] = value
                    expected = reads_nonfinite_by_loops(q.cpu(), k.cpu(), v.cpu(), layout if docs is not None
                                                        else [0] * T)
                    out = attention(q, k, v, doc_ids=docs, backend=backend).detach().cpu()
                    found = ~torch.isfinite(out).all(-1)  # (1, T, H)
                    if (missed := (expected & ~found[0]).nonzero().tolist()):
                        hidden.append((where, value, position, docs is not None, missed))
    assert hidden == []


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-only error")
def test_backend_without_gpu_or_interpreter_is_an_error():
    code = ("from hataori.errors import ConfigError\n"
            "from hataori.model import ModelConfig\n"
            "from hataori.model.attention import BACKENDS\n"
            "print(BACKENDS['triton'].unavailable())\n"
            "try:\n"
            "    ModelConfig(vocab_size=10, d_model=32, n_layers=1, n_heads=2, max_seq_len=8,\n"
            "                attention_backend='triton').build()\n"
            "except ConfigError as err:\n"
            "    print('ConfigError:', err)\n")
    reason, error = run_without_interpreter(code, timeout=120)
    assert "needs a CUDA device" in reason and "TRITON_INTERPRET=1" in reason
    assert error.startswith("ConfigError:") and "'triton' cannot run here" in error


# The kernels compiled for a Hopper GPU by Triton's own compiler and ptxas (bundled with triton), which
# needs no GPU: lowering that the interpreter never does (types, layouts, shared memory) is checked on CPU.
COMPILE_FOR_SM90 = """
import json, sys
import hataori.kernels.attention as A
from triton_tests import compile_for_sm90, ptxas_spills

assert not A.INTERPRET
head_dim, dtype = int(sys.argv[1]), sys.argv[2]
types = {"LSE": "*fp32", "DELTA": "*fp32", "CU_SEQLENS": "*i32", "scale": "fp32", "scale_log2": "fp32"}
stages = [(A._fwd_kernel, A.FWD_CONFIGS), (A._bwd_dkdv_kernel, A.DKDV_CONFIGS), (A._bwd_dq_kernel, A.DQ_CONFIGS)]
for fn, configs in stages:
    for block_m, block_n, warps, stages_ in configs:
        constants = dict(GROUP=2, HEAD_DIM=head_dim, CAUSAL=True, DOT_PRECISION="tf32",
                         BLOCK_M=block_m, BLOCK_N=block_n)
        kernel = compile_for_sm90(fn, dtype, constants, types=types, num_warps=warps, num_stages=stages_)
        print(json.dumps([fn.__name__, [block_m, block_n, warps, stages_], kernel.metadata.shared,
                          ptxas_spills(kernel)]))
"""


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile and run the kernels")
@pytest.mark.parametrize("head_dim, dtype", [(64, "fp16"), (128, "bf16")])
def test_kernels_compile_for_hopper(head_dim, dtype):
    compiled = compile_for_hopper(COMPILE_FOR_SM90, str(head_dim), dtype)
    assert len(compiled) == len(kernels.FWD_CONFIGS) + len(kernels.DKDV_CONFIGS) + len(kernels.DQ_CONFIGS)
    for name, config, shared, _ in compiled:
        assert shared <= 227 * 1024, f"{name} {config} needs {shared} bytes of shared memory"
    # the autotuner can always choose a config that keeps everything in registers
    for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        spills = {tuple(config): spilled for kernel, config, _, spilled in compiled if kernel == name}
        assert min(spills.values()) == 0, f"{name} spills registers in every config at head dim {head_dim}: {spills}"


def test_benchmark_needs_a_gpu(capsys):
    if ON_GPU:
        pytest.skip("the benchmark itself runs on a GPU; this checks its CPU exit")
    bench_attention = load_script(REPO / "benchmarks" / "kernel_attention.py")

    assert bench_attention.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
