"""The Triton SwiGLU kernels (forward and backward) against plain PyTorch.

Tolerance (flash-attention's rule): the kernel's largest error against a high-precision reference
(fp64 for fp32 inputs, fp32 otherwise) is at most twice that of the same computation done by
PyTorch in the inputs' dtype (``F.silu(gate) * up``), plus a small absolute slack, for the output,
dgate and dup.

Without a GPU the kernels run on CPU through Triton's interpreter: TRITON_INTERPRET=1 is set only
while hataori.kernels.swiglu is imported and while this module's tests run, then restored.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from triton_tests import DEVICE, DTYPES, ON_GPU, SLACK, compile_for_hopper, import_kernel, max_err, reference_dtype

kernels = import_kernel("swiglu")
pytestmark = pytest.mark.usefixtures("triton_interpreter")


def random_inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    """gate and up (..., N); every fifth gate column is +-20, where sigmoid saturates."""
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(shape, generator=gen) * 3
    gate[..., ::5] = torch.where(torch.rand(gate[..., ::5].shape, generator=gen) < 0.5, -20.0, 20.0)
    up = torch.randn(shape, generator=gen) * 2
    return gate.to(DEVICE, dtype), up.to(DEVICE, dtype)


def run(fn, gate, up, dy, merged, **kwargs):
    """[y, dgate, dup] of fn with upstream gradient dy. ``merged``: gate and up are the halves of one
    (..., 2N) leaf, as a merged gate/up projection produces them, and the gradients its halves."""
    if merged:
        leaf = torch.cat([gate, up], dim=-1).requires_grad_()
        g, u = leaf.chunk(2, dim=-1)
    else:
        g, u = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    y = fn(g, u, **kwargs)
    y.backward(dy.to(y.dtype))
    grads = list(leaf.grad.chunk(2, dim=-1)) if merged else [g.grad, u.grad]
    return [y.detach()] + grads


def check_against_reference(gate, up, merged, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(gate.shape, generator=gen).to(DEVICE, gate.dtype)
    ours = run(kernels.swiglu, gate, up, dy, merged)
    same_dtype = run(kernels.swiglu_ref, gate, up, dy, merged, upcast=False)
    wide = reference_dtype(gate.dtype)
    exact = run(kernels.swiglu_ref, gate.to(wide), up.to(wide), dy, merged)
    for name, mine, torch_same, ref in zip(["y", "dgate", "dup"], ours, same_dtype, exact, strict=True):
        assert mine.dtype == gate.dtype and mine.shape == ref.shape, name
        ours_err, torch_err = max_err(mine, ref), max_err(torch_same, ref)
        assert ours_err <= 2 * torch_err + SLACK[gate.dtype], (
            f"{name}: kernel error {ours_err:.3g} exceeds twice PyTorch's {torch_err:.3g} in {gate.dtype}")


# shapes (..., N): widths that are not powers of two, one column, rows that are not tile multiples,
# rows wider than one tile (2500 > MAX_BLOCK_N), 3-D inputs
SHAPES = {"7x100": (7, 100), "1x1": (1, 1), "13x1": (13, 1), "2x5x333": (2, 5, 333), "3x2500": (3, 2500),
          "40x64": (40, 64)}


@pytest.mark.parametrize("merged", [False, True], ids=["separate", "merged"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, dtype, merged):
    check_against_reference(*random_inputs(shape, dtype), merged)


def test_fp32_matches_model_activation():
    """The same values as the model's MLP activation, F.silu(gate) * up, on fp32 inputs."""
    gate, up = random_inputs((6, 48), torch.float32, seed=3)
    torch.testing.assert_close(kernels.swiglu(gate, up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


def test_merged_halves_are_read_and_saved_in_place():
    """Halves of one merged projection output: no copies, and only those two views are saved."""
    merged = torch.randn(5, 2 * 24, device=DEVICE, requires_grad=True)
    gate, up = merged.chunk(2, dim=-1)
    y = kernels.swiglu(gate, up)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 2
    assert [t.data_ptr() for t in saved] == [gate.data_ptr(), up.data_ptr()]
    assert y.is_contiguous() and y.shape == (5, 24)


def test_strided_inputs_gradients_and_empty_input():
    gate, up = random_inputs((9, 70), torch.float32, seed=2)
    wide = torch.randn(9, 140, device=DEVICE)[:, ::2]  # last dim strided: copied
    rows = torch.randn(18, 70, device=DEVICE)[::2]  # rows strided: followed
    for inp in (wide, rows):
        torch.testing.assert_close(kernels.swiglu(inp, up), kernels.swiglu_ref(inp, up), rtol=1e-6, atol=1e-6)
    # .sum() hands the backward an expanded (all strides 0) dy; only gate needs a gradient
    g = gate.clone().requires_grad_()
    kernels.swiglu(g, up).sum().backward()
    g_ref = gate.clone().requires_grad_()
    kernels.swiglu_ref(g_ref, up).sum().backward()
    torch.testing.assert_close(g.grad, g_ref.grad, rtol=1e-5, atol=1e-6)
    for shape in ((0, 70), (4, 0), (2, 0, 3)):
        empty_gate = torch.zeros(shape, device=DEVICE, requires_grad=True)
        empty_up = torch.zeros(shape, device=DEVICE, requires_grad=True)
        y = kernels.swiglu(empty_gate, empty_up)
        y.sum().backward()
        assert y.shape == shape and empty_gate.grad.shape == shape and empty_up.grad.shape == shape


def test_rejects_bad_inputs():
    gate, up = random_inputs((3, 8), torch.float32)
    with pytest.raises(ValueError, match="gate and up of one shape"):
        kernels.swiglu(gate, up[:, :4])
    with pytest.raises(ValueError, match="gate and up of one shape"):
        kernels.swiglu(gate[0, 0], up[0, 0])
    with pytest.raises(TypeError, match="must both be fp16, both bf16 or both fp32"):
        kernels.swiglu(gate, up.half())
    with pytest.raises(TypeError, match="must both be fp16, both bf16 or both fp32"):
        kernels.swiglu(gate.double(), up.double())
    with pytest.raises(ValueError, match="on one device"):
        kernels.swiglu(gate, up.to("meta"))


# The kernels compiled for a Hopper GPU by Triton's compiler and ptxas (bundled with triton), which
# needs no GPU: lowering that the interpreter never does is checked on CPU. Pointers, strides and
# widths are declared 16-divisible where they would be for aligned (rows, width) tensors, as Triton
# specialises them at launch; the widest tile (width 11008, Llama-7B's) must then load and store
# with 128-bit vector instructions.
COMPILE_FOR_SM90 = """
import json, sys
import hataori.kernels.swiglu as K
from triton_tests import compile_for_sm90
assert not K.INTERPRET
dtype = sys.argv[1]
for fn in (K._fwd_kernel, K._bwd_kernel):
    for width in (1, 100, 11008):
        attrs = {}  # pointers, and strides and widths that are, 16-byte aligned (as Triton specialises at launch)
        for i, param in enumerate(fn.params):
            aligned = param.name.startswith("stride") or param.name == "n_cols"
            if not param.is_constexpr and (param.name.isupper() or (aligned and width % 16 == 0)):
                attrs[(i,)] = [["tt.divisibility", 16]]
        block_m, block_n = K._blocks(width)
        kernel = compile_for_sm90(fn, dtype, {"BLOCK_M": block_m, "BLOCK_N": block_n}, attrs=attrs,
                                  num_warps=K.NUM_WARPS)
        ptx = kernel.asm["ptx"]
        print(json.dumps([fn.__name__, block_n, kernel.metadata.shared,
                          "ld.global.v4" in ptx and "st.global.v4" in ptx]))
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_hopper():
    compiled = compile_for_hopper(COMPILE_FOR_SM90, "bf16")
    assert len(compiled) == 6
    for name, block_n, shared, vectorised in compiled:
        assert shared <= 227 * 1024, f"{name} at {block_n} needs {shared} bytes of shared memory"
        if block_n == kernels.MAX_BLOCK_N:
            assert vectorised, f"{name} at {block_n} does not use 128-bit loads and stores"
