"""The model with every Triton kernel (attention, RMSNorm, RoPE, SwiGLU) against the plain PyTorch model.

A training step of the model with ``attention_backend: triton`` and ``fused_kernels: triton`` gives
the loss and every parameter gradient of the same model with SDPA and plain PyTorch ops, and keeps
for the backward pass what the plan's activation formula says. On a CPU the kernels run through
Triton's interpreter (TRITON_INTERPRET=1 is set only while they are imported and while this module's
tests run); ``auto`` there chooses SDPA and plain ops without loading any of our Triton kernels.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import check_activation_formula, tiny_config

from triton_tests import DEVICE, ON_GPU, import_kernel, run_without_interpreter

from hataori.model import ModelConfig

for name in ("attention", "rmsnorm", "rope", "swiglu"):
    import_kernel(name)
pytestmark = pytest.mark.usefixtures("triton_interpreter")


def training_step(cfg: ModelConfig, ids: torch.Tensor, doc_ids: torch.Tensor | None):
    torch.manual_seed(0)
    model = cfg.build().to(DEVICE)
    loss = model(ids[:, :-1], doc_ids=doc_ids, targets=ids[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


CASES = {
    "documents-qk_norm": dict(qk_norm=True),
    "checkpointing-tied-chunked_loss": dict(activation_checkpointing=True, tie_embeddings=True, chunked_loss=True),
    "no-documents": dict(doc_masking=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_triton_model_step_matches_plain_pytorch(options):
    # documents of 10, 1 and 29 tokens in one row, 39 and 1 in the other
    doc_ids = torch.tensor([[0] * 10 + [1] + [2] * 29, [3] * 39 + [4]], device=DEVICE)  # (2, 40)
    ids = torch.randint(0, 500, (2, 41), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    plain = tiny_config(attention_backend="sdpa", fused_kernels="torch", **options)
    fused = dataclasses.replace(plain, attention_backend="triton", fused_kernels="triton")
    plain_loss, plain_grads = training_step(plain, ids, doc_ids)
    fused_loss, fused_grads = training_step(fused, ids, doc_ids)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_triton_model_generates_with_the_cache_as_plain_pytorch():
    """Generation through the key/value cache with the Triton kernels (rotary at each row's own positions, the
    norms, SwiGLU; attention over the cache is SDPA's for every backend): the cached logits of a left-padded
    batch and its greedy tokens equal the plain PyTorch model's."""
    from hataori.eval.generate import Sampling, generate_batch
    from hataori.model.cache import KVCache, left_pad

    prompts = [[3, 14, 15, 92, 65], [7], list(range(1, 12))]
    plain = tiny_config(attention_backend="sdpa", fused_kernels="torch", init_std=0.2)
    models = []
    for cfg in (plain, dataclasses.replace(plain, attention_backend="triton", fused_kernels="triton")):
        torch.manual_seed(0)
        models.append(cfg.build().to(DEVICE).eval())
    logits = []
    for model in models:
        ids, valid = left_pad(prompts, pad_id=0)
        cache = KVCache.empty(model.config, len(prompts), 16, device=DEVICE, dtype=torch.float32)
        with torch.no_grad():
            first = model(ids.to(DEVICE), cache=cache, valid=valid.to(DEVICE))[valid.to(DEVICE)]
            logits.append(torch.cat([first, model(torch.tensor([[5], [6], [7]], device=DEVICE), cache=cache)[:, 0]]))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    tokens = [generate_batch(model, prompts, max_new_tokens=4, eos_id=None, sampling=Sampling(greedy=True))
              for model in models]
    assert tokens[1] == tokens[0]


@pytest.mark.slow
@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("fp16", torch.float16)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_with_triton_kernels(precision, dtype, checkpointing):
    """What the fused kernels keep for the backward pass (model/memory.py's "fused" terms), counted by autograd."""
    if ON_GPU:
        pytest.skip("the activation count runs the model on the CPU")
    check_activation_formula(precision, dtype, checkpointing, qk_norm=True, doc_masking=True,
                             attention_backend="triton", fused_kernels="triton")


# The CPU without the interpreter: run in a fresh process, as triton decides at import.
NO_INTERPRETER = """
import sys
import torch
from hataori.errors import ConfigError
from hataori.model import ModelConfig
cfg = dict(vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
model = ModelConfig(**cfg).build()  # auto, auto
loss = model(torch.zeros(1, 8, dtype=torch.long), targets=torch.zeros(1, 8, dtype=torch.long))
loss.backward()
print("kernels loaded:", sorted(name for name in sys.modules if name.startswith("hataori.kernels.")))
try:
    ModelConfig(**cfg, fused_kernels="triton").build()
except ConfigError as err:
    print("ConfigError:", err)
"""


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-only choices")
def test_auto_on_cpu_runs_plain_pytorch_and_explicit_triton_is_an_error():
    imported, error = run_without_interpreter(NO_INTERPRETER, timeout=120)
    assert imported == "kernels loaded: ['hataori.kernels.cross_entropy']"  # plain PyTorch, imported by the model
    assert error.startswith("ConfigError: fused_kernels: the Triton kernels cannot run here: needs a CUDA device")
    assert "choose fused_kernels: auto or torch" in error
