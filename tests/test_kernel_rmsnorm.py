"""The Triton RMSNorm kernels (with and without the residual add) against plain PyTorch.

Tolerance (flash-attention's rule): the kernel's largest error against a high-precision reference
(fp64 for fp32 inputs, fp32 otherwise) is at most twice that of the same computation done by
PyTorch in the inputs' dtype, plus a small absolute slack, for y, the residual sum, dx, dweight and
dresidual.

Without a GPU the kernels run on CPU through Triton's interpreter: TRITON_INTERPRET=1 is set only
while hataori.kernels.rmsnorm is imported and while this module's tests run, then restored.
"""

from __future__ import annotations

import pytest
import torch

from triton_tests import DEVICE, DTYPES, ON_GPU, SLACK, compile_for_hopper, import_kernel, max_err, reference_dtype

kernels = import_kernel("rmsnorm")
pytestmark = pytest.mark.usefixtures("triton_interpreter")


def random_inputs(shape: tuple[int, ...], dtype: torch.dtype, residual: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(DEVICE, dtype)
    res = torch.randn(shape, generator=gen).to(DEVICE, dtype) if residual else None
    return x, weight, res


def run(fn, x, weight, res, dy, dres, **kwargs):
    """Outputs and gradients (dx, dweight, dresidual) of fn, with upstream gradients dy (and dres)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, res)]
    out = fn(leaves[0], leaves[1], eps=1e-5, residual=leaves[2], **kwargs)
    outs = list(out) if isinstance(out, tuple) else [out]
    grads_in = [dy.to(outs[0].dtype)] + ([dres.to(outs[1].dtype)] if res is not None else [])
    torch.autograd.backward(outs, grads_in)
    return [o.detach() for o in outs] + [t.grad for t in leaves if t is not None]


def check_against_reference(x, weight, res, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(x.shape, generator=gen).to(DEVICE, x.dtype)
    dres = torch.randn(x.shape, generator=gen).to(DEVICE, x.dtype)
    names = ["y", "s", "dx", "dweight", "dresidual"] if res is not None else ["y", "dx", "dweight"]
    ours = run(kernels.rmsnorm, x, weight, res, dy, dres)
    same_dtype = run(kernels.rmsnorm_ref, x, weight, res, dy, dres, upcast=False)
    wide = reference_dtype(x.dtype)
    exact = run(kernels.rmsnorm_ref, *[t.to(wide) if t is not None else None for t in (x, weight, res)],
                dy, dres)
    assert len(ours) == len(names)
    for name, mine, torch_same, ref in zip(names, ours, same_dtype, exact):
        assert mine.dtype == x.dtype and mine.shape == ref.shape, name
        ours_err, torch_err = max_err(mine, ref), max_err(torch_same, ref)
        assert ours_err <= 2 * torch_err + SLACK[x.dtype], (
            f"{name}: kernel error {ours_err:.3g} exceeds twice PyTorch's {torch_err:.3g} in {x.dtype}")


# shapes (..., N): widths that are not powers of two, a single row, one column, 3-D inputs
SHAPES = {"7x100": (7, 100), "1x1": (1, 1), "2x5x333": (2, 5, 333), "11x1000": (11, 1000), "4x64": (4, 64)}


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, dtype, residual):
    check_against_reference(*random_inputs(shape, dtype, residual))


def test_fp32_close_to_model_norm():
    """The same values as the model's RMSNorm module on fp32 inputs."""
    from hataori.model.model import RMSNorm

    x, weight, _ = random_inputs((6, 48), torch.float32, False, seed=3)
    norm = RMSNorm(48, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(weight)
        torch.testing.assert_close(kernels.rmsnorm(x, weight), norm(x), rtol=1e-6, atol=1e-6)


def test_strided_rows_and_empty_input():
    x, weight, res = random_inputs((9, 70), torch.float32, True, seed=2)
    wide = torch.randn(9, 140, device=DEVICE)[:, ::2]  # last dim strided: copied
    rows = torch.randn(18, 70, device=DEVICE)[::2]  # rows strided: followed
    for inp in (wide, rows):
        torch.testing.assert_close(kernels.rmsnorm(inp, weight, residual=res)[0],
                                   kernels.rmsnorm_ref(inp, weight, residual=res)[0], rtol=1e-5, atol=1e-6)
    empty = torch.zeros(0, 70, device=DEVICE, requires_grad=True)
    y = kernels.rmsnorm(empty, weight)
    y.sum().backward()
    assert y.shape == (0, 70) and empty.grad.shape == (0, 70)


def test_rejects_bad_inputs():
    x, weight, res = random_inputs((3, 8), torch.float32, True)
    with pytest.raises(ValueError, match="x \\(..., N\\) and weight \\(N,\\)"):
        kernels.rmsnorm(x, weight[:4])
    with pytest.raises(ValueError, match="residual .* must have x's shape"):
        kernels.rmsnorm(x, weight, residual=res[:2])
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        kernels.rmsnorm(x.double(), weight)
    too_wide = kernels.MAX_WIDTH + 1
    with pytest.raises(ValueError, match=f"row width {too_wide} is not supported"):
        kernels.rmsnorm(torch.ones(1, too_wide, device=DEVICE), torch.ones(too_wide, device=DEVICE))


# The kernels compiled for a Hopper GPU by Triton's compiler and ptxas (bundled with triton), which
# needs no GPU: lowering that the interpreter never does is checked on CPU.
COMPILE_FOR_SM90 = """
import json, sys
import hataori.kernels.rmsnorm as K
from triton_tests import compile_for_sm90
assert not K.INTERPRET
dtype = sys.argv[1]
types = {"RSTD": "*fp32", "DW_PARTIAL": "*fp32", "eps": "fp32"}
for fn, flag in ((K._fwd_kernel, "HAS_RESIDUAL"), (K._bwd_kernel, "HAS_DRES_OUT")):
    for block_n in (128, 4096, K.MAX_WIDTH):
        kernel = compile_for_sm90(fn, dtype, {flag: True, "BLOCK_N": block_n}, types=types,
                                  num_warps=K._num_warps(block_n))
        print(json.dumps([fn.__name__, block_n, kernel.metadata.shared]))
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_hopper():
    compiled = compile_for_hopper(COMPILE_FOR_SM90, "bf16")
    assert len(compiled) == 6
    for name, block_n, shared in compiled:
        assert shared <= 227 * 1024, f"{name} at {block_n} needs {shared} bytes of shared memory"
