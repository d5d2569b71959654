"""Chunked cross-entropy of the output projection against materialised logits, and in the model.

Tolerance: for fp32 inputs the loss and gradients match ``cross_entropy_ref`` in fp32 to fp32
rounding. For fp16/bf16 inputs (flash-attention's rule) the chunked result's largest error against
an fp32 reference computed from the same (rounded) inputs is at most twice that of the plain
computation done by PyTorch in the input dtype, plus a small absolute slack, for the loss,
grad_hidden and grad_weight. Pure PyTorch, so no interpreter: everything runs on CPU as is.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import REPO, load_script
from triton_tests import max_err

from hataori.kernels import cross_entropy as ce
from hataori.model import ModelConfig

IGNORE = -100


def random_inputs(n_rows: int, width: int, padded_vocab: int, vocab_size: int, dtype: torch.dtype,
                  n_ignored: int = 0, seed: int = 0):
    """hidden (N, D), weight (V_padded, D) and targets (N,) with ``n_ignored`` rows set to IGNORE.

    The weight's padded rows are large, so a kernel that let them into the softmax would fail."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, width, generator=gen)
    weight = torch.randn(padded_vocab, width, generator=gen) / width ** 0.5
    weight[vocab_size:] = 10.0
    targets = torch.randint(0, vocab_size, (n_rows,), generator=gen)
    targets[torch.randperm(n_rows, generator=gen)[:n_ignored]] = IGNORE
    return hidden.to(dtype), weight.to(dtype), targets


def run(fn, hidden, weight, targets, grad_scale=1.0, **kwargs):
    """Loss and (grad_hidden, grad_weight) of ``grad_scale * fn(...)``."""
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets, ignore_index=IGNORE, **kwargs)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


# (N, D, V_padded, vocab_size, chunk_size, ignored rows): odd sizes, chunks not dividing N,
# a chunk larger than N, one-row chunks, padded and unpadded vocabularies
CASES = {
    "N37-chunk8": (37, 24, 128, 101, 8, 5),
    "N64-chunk64": (64, 16, 96, 96, 64, 0),
    "N5-chunk1": (5, 8, 16, 11, 1, 2),
    "N50-chunk1000": (50, 33, 300, 257, 1000, 7),
    "N129-chunk17": (129, 40, 512, 499, 17, 31),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fp32_matches_materialised_logits(case):
    n_rows, width, padded, vocab, chunk, ignored = case
    hidden, weight, targets = random_inputs(n_rows, width, padded, vocab, torch.float32, ignored)
    loss, dh, dw = run(ce.chunked_cross_entropy, hidden, weight, targets, grad_scale=1.7,
                       vocab_size=vocab, chunk_size=chunk)
    ref_loss, ref_dh, ref_dw = run(ce.cross_entropy_ref, hidden, weight, targets, grad_scale=1.7,
                                   vocab_size=vocab)
    assert loss.dtype == torch.float32 and dh.dtype == dw.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dh, ref_dh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-7)
    assert torch.equal(dw[vocab:], torch.zeros_like(dw[vocab:])), "padded vocabulary rows got a gradient"
    ignored_rows = targets == IGNORE
    assert ignored_rows.sum() == ignored
    # an ignored row reaches neither the loss nor the gradients
    assert torch.equal(dh[ignored_rows], torch.zeros_like(dh[ignored_rows]))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_token_losses_match_unreduced_cross_entropy(case):
    """Each row's loss against F.cross_entropy(reduction="none") of the materialised fp32 logits, and the
    gradients of a weighted sum of the rows (a different weight per row, as a per-sequence objective gives)."""
    import torch.nn.functional as F

    n_rows, width, padded, vocab, chunk, ignored = case
    hidden, weight, targets = random_inputs(n_rows, width, padded, vocab, torch.float32, ignored, seed=7)
    row_weights = torch.randn(n_rows, generator=torch.Generator().manual_seed(8))

    def unreduced(h, w, t, *, ignore_index, vocab_size):
        return F.cross_entropy(F.linear(h, w[:vocab_size]).float(), t, ignore_index=ignore_index, reduction="none")

    results = []
    for fn, kwargs in ((ce.chunked_token_losses, {"chunk_size": chunk}), (unreduced, {})):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        rows = fn(h, w, targets, ignore_index=IGNORE, vocab_size=vocab, **kwargs)
        (rows * row_weights).sum().backward()
        results.append((rows.detach(), h.grad, w.grad))
    (rows, dh, dw), (ref_rows, ref_dh, ref_dw) = results
    assert rows.shape == (n_rows,) and rows.dtype == torch.float32
    assert torch.equal(rows[targets == IGNORE], torch.zeros(ignored))
    torch.testing.assert_close(rows, ref_rows, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dh, ref_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-6)
    assert torch.equal(dw[vocab:], torch.zeros_like(dw[vocab:]))


def test_fp32_gradients_against_fp64():
    """Independent of F.cross_entropy's backward: the analytic (softmax - onehot) gradient in fp64."""
    hidden, weight, targets = random_inputs(23, 12, 64, 50, torch.float32, n_ignored=3, seed=4)
    loss, dh, dw = run(ce.chunked_cross_entropy, hidden, weight, targets, vocab_size=50, chunk_size=6)
    h, w = hidden.double(), weight.double()[:50]
    logits = h @ w.T
    valid = targets != IGNORE
    probs = logits.softmax(-1)
    onehot = torch.zeros_like(probs)
    onehot[valid, targets[valid]] = 1.0
    grad_logits = (probs - onehot) * valid[:, None] / valid.sum()
    exact_loss = -(logits.log_softmax(-1)[valid, targets[valid]]).mean()
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(dh.double(), grad_logits @ w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw[:50].double(), grad_logits.T @ h, rtol=1e-5, atol=1e-7)


SLACK = {torch.float16: 1e-5, torch.bfloat16: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES["N37-chunk8"], CASES["N129-chunk17"]], ids=["N37", "N129"])
def test_low_precision_within_twice_pytorch_error(dtype, case):
    n_rows, width, padded, vocab, chunk, ignored = case
    hidden, weight, targets = random_inputs(n_rows, width, padded, vocab, dtype, ignored, seed=2)
    ours = run(ce.chunked_cross_entropy, hidden, weight, targets, vocab_size=vocab, chunk_size=chunk)
    same_dtype = run(ce.cross_entropy_ref, hidden, weight, targets, vocab_size=vocab)
    exact = run(ce.cross_entropy_ref, hidden.float(), weight.float(), targets, vocab_size=vocab)
    for name, mine, torch_same, ref in zip(("loss", "grad_hidden", "grad_weight"), ours, same_dtype, exact):
        expected_dtype = torch.float32 if name == "loss" else dtype
        assert mine.dtype == expected_dtype and mine.shape == ref.shape
        ours_err, torch_err = max_err(mine, ref), max_err(torch_same, ref)
        assert ours_err <= 2 * torch_err + SLACK[dtype], (
            f"{name}: chunked error {ours_err:.3g} exceeds twice PyTorch's {torch_err:.3g} in {dtype}")
    assert torch.equal(ours[2][vocab:], torch.zeros_like(ours[2][vocab:]))


def test_saves_no_logits():
    """Autograd keeps hidden, weight, targets and N fp32 log-sum-exps, nothing of size N x V."""
    n_rows, width, vocab = 64, 8, 1000
    hidden, weight, targets = random_inputs(n_rows, width, 1024, vocab, torch.float32)
    hidden.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ce.chunked_cross_entropy(hidden, weight, targets, vocab_size=vocab, chunk_size=16)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(n_rows, width), (1024, width), (n_rows,), (n_rows,)]), shapes


def test_all_targets_ignored_gives_nan_like_pytorch():
    hidden, weight, targets = random_inputs(6, 8, 16, 16, torch.float32, n_ignored=6)
    ours = ce.chunked_cross_entropy(hidden, weight, targets, vocab_size=16, ignore_index=IGNORE)
    ref = ce.cross_entropy_ref(hidden, weight, targets, vocab_size=16, ignore_index=IGNORE)
    assert ours.isnan() and ref.isnan()


def test_input_errors():
    hidden, weight, targets = random_inputs(6, 8, 16, 12, torch.float32)
    call = ce.chunked_cross_entropy
    with pytest.raises(ValueError, match="same width"):
        call(hidden, weight[:, :4], targets, vocab_size=12)
    with pytest.raises(ValueError, match="one entry per hidden row"):
        call(hidden, weight, targets[:5], vocab_size=12)
    with pytest.raises(ValueError, match="vocab_size must be in"):
        call(hidden, weight, targets, vocab_size=17)
    with pytest.raises(ValueError, match="chunk_size"):
        call(hidden, weight, targets, vocab_size=12, chunk_size=0)
    with pytest.raises(TypeError, match="share one dtype"):
        call(hidden, weight.half(), targets, vocab_size=12)
    with pytest.raises(TypeError, match="targets must be"):
        call(hidden, weight, targets.float(), vocab_size=12)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 12\)"):
        call(hidden, weight, torch.full_like(targets, 12), vocab_size=12)
    with pytest.raises(ValueError, match="hidden \\(N, D\\)"):
        call(hidden[None], weight, targets, vocab_size=12)


# ----------------------------------------------------------------------------- in the model


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_model_chunked_loss_matches_plain_loss(tie, monkeypatch):
    """Same loss and the same gradient of every parameter, with chunks not dividing B * T."""
    monkeypatch.setattr(ce, "DEFAULT_CHUNK_SIZE", 7)
    cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      tie_embeddings=tie, qk_norm=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 1000, (2, 24), generator=gen)
    y = torch.randint(0, 1000, (2, 24), generator=gen)
    y[0, :5] = IGNORE
    y[1, -3:] = IGNORE
    doc_ids = torch.tensor([[0] * 11 + [1] * 13, [0] * 24])
    results = []
    for chunked in (False, True):
        torch.manual_seed(0)
        model = dataclasses.replace(cfg, chunked_loss=chunked).build().train()
        loss = model(x, doc_ids=doc_ids, targets=y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_plain, plain), (loss_chunked, chunked) = results
    torch.testing.assert_close(loss_chunked, loss_plain, rtol=1e-6, atol=1e-6)
    assert plain.keys() == chunked.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(chunked[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_model_chunked_loss_leaves_logits_unchanged():
    cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=1, n_heads=4, max_seq_len=64)
    x = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = cfg.build()
    torch.manual_seed(0)
    chunked = dataclasses.replace(cfg, chunked_loss=True).build()
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), plain(x), rtol=0, atol=0)


def test_benchmark_runs_on_cpu(capsys):
    """The saved-bytes part runs anywhere (meta tensors); the GPU part only says it needs a GPU."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the benchmark allocates GBs; run it by hand")
    bench_cross_entropy = load_script(REPO / "benchmarks" / "kernel_cross_entropy.py")

    assert bench_cross_entropy.main(["--tokens", "512", "--width", "256"]) == 0
    out = capsys.readouterr().out
    assert "V=100000: plain" in out and "no CUDA device" in out
