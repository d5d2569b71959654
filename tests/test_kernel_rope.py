"""The Triton RoPE kernel (q and k in one launch, forward and backward) against plain PyTorch.

Tolerance (flash-attention's rule): the kernel's largest error against a high-precision reference
(fp64 for fp32 inputs, fp32 otherwise) is at most twice that of the same computation done by
PyTorch in the inputs' dtype, plus a small absolute slack, for q_rot, k_rot, dq and dk.

Without a GPU the kernels run on CPU through Triton's interpreter: TRITON_INTERPRET=1 is set only
while hataori.kernels.rope is imported and while this module's tests run, then restored.
"""

from __future__ import annotations

import pytest
import torch

from triton_tests import DEVICE, DTYPES, ON_GPU, SLACK, compile_for_hopper, import_kernel, max_err, reference_dtype

from hataori.model.attention import document_positions
from hataori.model.model import apply_rope, rope_tables

kernels = import_kernel("rope")
pytestmark = pytest.mark.usefixtures("triton_interpreter")


MAX_SEQ_LEN = 48


def tables(head_dim: int, max_seq_len: int = MAX_SEQ_LEN):
    cos, sin = rope_tables(head_dim, max_seq_len, 10000.0)
    return cos.to(DEVICE), sin.to(DEVICE)


def packed_positions(batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """(B, T) positions restarting at each packed document; every row starts with a 1-token document
    and holds more of them, as between two end-of-document tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (batch, seq_len), generator=gen)  # enough documents to fill a row
    lengths[:, ::3] = 1
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(seq_len), row)[:seq_len] for row in lengths])
    return document_positions(doc_ids).to(DEVICE)


def random_qk(batch, seq_len, heads, kv_heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, seq_len, heads, head_dim, generator=gen) * 3).to(DEVICE, dtype)
    k = (torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen) * 3).to(DEVICE, dtype)
    return q, k


def run(fn, q, k, cos, sin, positions, dq_rot, dk_rot, **kwargs):
    """(q_rot, k_rot, dq, dk) of fn with upstream gradients dq_rot, dk_rot."""
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_rot, k_rot = fn(q, k, cos, sin, positions, **kwargs)
    torch.autograd.backward([q_rot, k_rot], [dq_rot.to(q_rot.dtype), dk_rot.to(k_rot.dtype)])
    return q_rot.detach(), k_rot.detach(), q.grad, k.grad


def check_against_reference(q, k, cos, sin, positions, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dq_rot = torch.randn(q.shape, generator=gen).to(DEVICE, q.dtype)
    dk_rot = torch.randn(k.shape, generator=gen).to(DEVICE, k.dtype)
    ours = run(kernels.rope, q, k, cos, sin, positions, dq_rot, dk_rot)
    same_dtype = run(kernels.rope_ref, q, k, cos, sin, positions, dq_rot, dk_rot, upcast=False)
    wide = reference_dtype(q.dtype)
    exact = run(kernels.rope_ref, q.to(wide), k.to(wide), cos, sin, positions, dq_rot, dk_rot)
    for name, mine, torch_same, ref in zip(["q_rot", "k_rot", "dq", "dk"], ours, same_dtype, exact):
        assert mine.dtype == q.dtype and mine.shape == ref.shape, name
        ours_err, torch_err = max_err(mine, ref), max_err(torch_same, ref)
        assert ours_err <= 2 * torch_err + SLACK[q.dtype], (
            f"{name}: kernel error {ours_err:.3g} exceeds twice PyTorch's {torch_err:.3g} in {q.dtype}")


# (B, T, H, H_kv, Dh): T not a multiple of any block, head dims 2 to 128, H/H_kv of 1 and 4
SHAPES = {"1x37x2x2x16": (1, 37, 2, 2, 16), "2x13x4x1x64": (2, 13, 4, 1, 64), "3x5x1x1x2": (3, 5, 1, 1, 2),
          "2x7x4x4x128": (2, 7, 4, 4, 128), "1x9x8x2x32": (1, 9, 8, 2, 32)}


@pytest.mark.parametrize("packed", [False, True], ids=["arange", "packed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, dtype, packed):
    batch, seq_len, _, _, head_dim = shape
    positions = packed_positions(batch, seq_len, seed=seq_len) if packed else None
    check_against_reference(*random_qk(*shape, dtype), *tables(head_dim), positions)


def test_packed_positions_restart():
    """The packed test positions hold one-token documents and restarts inside each row."""
    positions = packed_positions(2, 13, seed=13).cpu()
    starts = positions == 0
    assert starts[:, 0].all() and (starts[:, 1:].sum(dim=1) >= 2).all()
    assert (starts[:, :-1] & starts[:, 1:]).any(), "no one-token document"


@pytest.mark.parametrize("packed", [False, True], ids=["arange", "packed"])
def test_equals_model_apply_rope(packed):
    """rope_ref (upcast) and the kernel give the model's apply_rope on fp32 inputs, with fp32 tables
    and with the tables of a model cast to bf16."""
    batch, seq_len, head_dim = 2, 11, 32
    q, k = random_qk(batch, seq_len, 4, 2, head_dim, torch.float32, seed=4)
    positions = packed_positions(batch, seq_len, seed=5) if packed else None
    for cos, sin in (tables(head_dim), [t.bfloat16() for t in tables(head_dim)]):
        if positions is None:
            cos_bt, sin_bt = cos[None, :seq_len, None], sin[None, :seq_len, None]  # (1, T, 1, Dh)
        else:
            cos_bt, sin_bt = cos[positions][:, :, None], sin[positions][:, :, None]  # (B, T, 1, Dh)
        expected = apply_rope(q, cos_bt, sin_bt), apply_rope(k, cos_bt, sin_bt)
        for got in (kernels.rope_ref(q, k, cos, sin, positions), kernels.rope(q, k, cos, sin, positions)):
            for mine, model in zip(got, expected):
                torch.testing.assert_close(mine, model, rtol=1e-6, atol=1e-6)


def test_strided_inputs_and_expanded_gradients():
    """Views of a fused projection and transposed tensors are read through their strides, a strided
    last dim is copied, int32 positions anywhere in the tables work, and so does the stride-0
    gradient of a sum."""
    batch, seq_len, heads, kv_heads, head_dim = 2, 6, 4, 2, 16
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(batch, seq_len, (heads + 2 * kv_heads) * head_dim, generator=gen).to(DEVICE)
    fused_q = qkv[..., :heads * head_dim].view(batch, seq_len, heads, head_dim)
    fused_k = qkv[..., heads * head_dim:(heads + kv_heads) * head_dim].view(batch, seq_len, kv_heads, head_dim)
    transposed = torch.randn(batch, heads, seq_len, head_dim, generator=gen).to(DEVICE).transpose(1, 2)
    strided_last = torch.randn(batch, seq_len, kv_heads, 2 * head_dim, generator=gen).to(DEVICE)[..., ::2]
    positions = torch.randint(0, MAX_SEQ_LEN, (batch, seq_len), generator=gen, dtype=torch.int32).to(DEVICE)
    cos, sin = tables(head_dim)
    for q, k in ((fused_q, fused_k), (transposed, strided_last)):
        for pos in (None, positions):
            q_leaf, k_leaf = q.detach().requires_grad_(), k.detach().requires_grad_()
            q_rot, k_rot = kernels.rope(q_leaf, k_leaf, cos, sin, pos)
            (q_rot.sum() + k_rot.sum()).backward()
            q_ref, k_ref = q.detach().requires_grad_(), k.detach().requires_grad_()
            expected = kernels.rope_ref(q_ref, k_ref, cos, sin, pos)
            (expected[0].sum() + expected[1].sum()).backward()
            for mine, ref in zip((q_rot, k_rot, q_leaf.grad, k_leaf.grad), (*expected, q_ref.grad, k_ref.grad)):
                torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
            assert q_rot.is_contiguous() and k_rot.is_contiguous()


def test_empty_input():
    cos, sin = tables(8)
    q = torch.zeros(2, 0, 3, 8, device=DEVICE, requires_grad=True)
    k = torch.zeros(2, 0, 1, 8, device=DEVICE, requires_grad=True)
    q_rot, k_rot = kernels.rope(q, k, cos, sin)
    (q_rot.sum() + k_rot.sum()).backward()
    assert q_rot.shape == q.grad.shape == (2, 0, 3, 8) and k_rot.shape == k.grad.shape == (2, 0, 1, 8)


def test_rejects_bad_inputs():
    q, k = random_qk(2, 5, 4, 2, 8, torch.float32)
    cos, sin = tables(8, max_seq_len=16)
    positions = packed_positions(2, 5, seed=0)
    with pytest.raises(ValueError, match="must be even"):
        kernels.rope(q[..., :7], k[..., :7], cos, sin)
    with pytest.raises(ValueError, match="same B, T and Dh"):
        kernels.rope(q, k[:1], cos, sin)
    with pytest.raises(ValueError, match="same B, T and Dh"):
        kernels.rope(q, k[..., :6], cos, sin)
    with pytest.raises(ValueError, match="Dh >= the head dim 8"):
        kernels.rope(q, k, cos[:, :6], sin[:, :6])
    with pytest.raises(ValueError, match="sequence length 17 exceeds the tables' max_seq_len 16"):
        kernels.rope(*random_qk(1, 17, 1, 1, 8, torch.float32), cos, sin)
    with pytest.raises(ValueError, match="positions must be \\(B, T\\)"):
        kernels.rope(q, k, cos, sin, positions[:, :4])
    with pytest.raises(TypeError, match="positions must be int32 or int64"):
        kernels.rope(q, k, cos, sin, positions.float())
    with pytest.raises(TypeError, match="q and k must be fp16, bf16 or fp32"):
        kernels.rope(q.double(), k, cos, sin)
    with pytest.raises(TypeError, match="tables must be fp16, bf16 or fp32"):
        kernels.rope(q, k, cos.double(), sin)
    with pytest.raises(ValueError, match="must be on one device"):
        kernels.rope(q, k, cos.to("meta"), sin.to("meta"))


# The kernel compiled for a Hopper GPU by Triton's compiler and ptxas (bundled with triton), which
# needs no GPU: lowering that the interpreter never does is checked on CPU, and ptxas -v reports spills.
COMPILE_FOR_SM90 = """
import json, sys
import hataori.kernels.rope as K
from triton_tests import compile_for_sm90, ptxas_spills
assert not K.INTERPRET
dtype = sys.argv[1]
types = {"COS": "*fp32", "SIN": "*fp32", "POS": "*i64"}
for head_dim in map(int, sys.argv[2:]):
    block_hq, block_hk, block_half, num_warps = K._block_sizes(32, 8, head_dim)
    for backward in (False, True):
        constants = dict(HAS_POSITIONS=True, BACKWARD=backward, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
                         BLOCK_HALF=block_half)
        kernel = compile_for_sm90(K._rope_kernel, dtype, constants, types=types, num_warps=num_warps)
        print(json.dumps([head_dim, backward, ptxas_spills(kernel)]))
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile and run the kernels")
def test_kernel_compiles_for_hopper_without_spills():
    head_dims = [64, 128]
    compiled = compile_for_hopper(COMPILE_FOR_SM90, "bf16", *map(str, head_dims))
    assert [(head_dim, backward) for head_dim, backward, _ in compiled] == [
        (head_dim, backward) for head_dim in head_dims for backward in (False, True)]
    for head_dim, backward, spills in compiled:
        assert spills == 0, f"head dim {head_dim} (backward={backward}) spills {spills} bytes of registers"
