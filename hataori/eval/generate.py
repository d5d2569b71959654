"""``hataori generate``: continue a prompt with a trained checkpoint.

    hataori generate RUN_DIR_OR_CHECKPOINT "プロンプト" [--max-new-tokens N] [--temperature T]
        [--top-k K] [--top-p P] [--seed S] [--greedy] [--tokenizer DIR] [--device cpu|cuda]
        [--dtype fp32|bf16|fp16] [--chat]

CHECKPOINT is a run folder (its latest complete checkpoint is used) or one ``checkpoints/step_N``
folder of it. The model's shape comes from the run folder's ``config.yaml`` (its ``model`` section);
the tokenizer from ``--tokenizer``, else the config's ``tokenizer``, else the one recorded in the
first dataset's ``dataset.json``; it must be the tokenizer the run was trained with
(:func:`hataori.checkpoint.record.run_tokenizer`).

Weights are read with :func:`hataori.checkpoint.states.run_weights`, from any ZeRO stage: the fp32
master weights where the checkpoint has them, else the module's own; a LoRA run's with its
adapters folded into its base.

With ``--chat`` the prompt is a user's turn of a conversation: it is rendered with the chat template a
fine-tuning run trained with (``chat_template.jinja`` in the run folder, :mod:`hataori.tokenizer.chat`),
followed by the assistant's opening, and the reply stops at the piece that ends an assistant turn
(``<|im_end|>`` in the ChatML preset) or EOS; only the reply is printed.

Decoding. The prompt is encoded after one EOS, as training documents begin (the packed loader's
documents are preceded by the previous one's EOS). The prompt goes through the model once, filling
the key/value cache (:mod:`hataori.model.cache`), then each new token takes one forward pass of one
position (:func:`generate_batch`; several prompts of different lengths go together, left-padded).
Context rule (:func:`fit_context`): prompt and new tokens together fit ``max_seq_len``. A prompt keeps
its last ``max_seq_len - min(max_new_tokens, max_seq_len // 2)`` tokens (room for the new ones, but
never less than half the context), and generation stops at EOS, at a stop id (``--chat``), after
``--max-new-tokens``, or when the context is full.
:func:`generate_uncached` (a full forward pass over the context for every new token) is the
reference the cache is tested against.

The model computes in ``--dtype`` (fp32 by default; a precision the device cannot run is refused,
:mod:`hataori.precision`), its rotary tables in fp32 as in training; sampling reads fp32 logits.

Sampling (:func:`next_token`): logits / temperature, then top-k, then top-p (nucleus), then a draw
from the softmax with a seeded generator. ``--greedy`` or temperature 0 take the argmax.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from hataori.errors import ConfigError, HataoriError
from hataori.interop.load import open_run
from hataori.model.cache import KVCache, left_pad
from hataori.precision import DTYPES, PRECISIONS, torch_device
from hataori.precision import check as check_precision

# ----------------------------------------------------------------------------- sampling


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits (..., V) with all but the ``k`` largest of each row set to -inf (exactly k kept, ties
    broken by index as ``torch.topk`` breaks them). ``k`` <= 0 or >= V: unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(k, dim=-1).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits (..., V) keeping the smallest set of most probable tokens whose probability sums to at
    least ``p`` (always the most probable one); the rest set to -inf. ``p`` >= 1: unchanged."""
    if p >= 1.0:
        return logits
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)  # (..., V)
    mass_before = probs.cumsum(dim=-1) - probs  # (..., V): probability of the more probable tokens
    keep_sorted = mass_before < p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


@dataclass(frozen=True, slots=True)
class Sampling:
    """How the next token is chosen."""

    temperature: float = 1.0
    """Divides the logits; 0 (or greedy) takes the argmax."""
    top_k: int = 0
    """Keep the k most probable tokens; 0: all."""
    top_p: float = 1.0
    """Keep the smallest most-probable set with this much probability; 1: all."""
    greedy: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError("--temperature", f"must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError("--top-k", f"must be >= 0 (0: no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p", f"must be in (0, 1], got {self.top_p}")


def filtered_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution (..., V) that :func:`next_token` draws from (temperature > 0)."""
    logits = logits.float() / sampling.temperature
    logits = top_p_filter(top_k_filter(logits, sampling.top_k), sampling.top_p)
    return logits.softmax(dim=-1)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids (...,) chosen from logits (..., V)."""
    if sampling.greedy or sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, sampling)
    flat = probs.reshape(-1, probs.shape[-1])  # (rows, V)
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def check_finite(logits: torch.Tensor, new_token: int, dtype: torch.dtype) -> None:
    if not torch.isfinite(logits).all():
        raise HataoriError(f"the model's logits for new token {new_token} hold NaN or inf: its activations "
                           f"overflowed in {dtype}, or its weights are damaged; run in a wider dtype (--dtype "
                           "fp32), and check the checkpoint (hataori checkpoint verify)")


def fit_context(prompt: list[int], max_seq_len: int, max_new_tokens: int) -> tuple[list[int], int]:
    """(the prompt's tokens kept, how many new tokens fit after them) within ``max_seq_len``: its last
    ``max_seq_len - min(max_new_tokens, max_seq_len // 2)`` tokens (module docstring)."""
    if max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", f"must be >= 1, got {max_new_tokens}")
    kept = prompt[-(max_seq_len - min(max_new_tokens, max_seq_len // 2)):]
    return kept, min(max_new_tokens, max_seq_len - len(kept))


@torch.no_grad()
def generate_batch(model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | None,
                   sampling: Sampling, generator: torch.Generator | None = None, stop_ids: tuple[int, ...] = (),
                   pad_id: int = 0, until: Callable[[list[int]], bool] | None = None,
                   sync: Callable[[bool], bool] | None = None) -> list[list[int]]:
    """Each prompt's new tokens (EOS, or one of ``stop_ids``, included if reached), with the key/value cache:
    the prompts (each at least one token) left-padded with ``pad_id`` and run through the model together,
    then one position a step for every row until each has stopped (module docstring's context rule).
    ``until(new_tokens)`` may stop a row too (a stop string in its decoded text).

    ``model`` may be a DeepSpeed engine. Under ZeRO-3 every rank must run as many forward passes as the
    others: ``sync(this rank goes on)`` returns whether any rank does, and a rank that has stopped runs a
    one-token pass whose output is not used until none goes on."""
    if not prompts or not all(prompts):
        raise ValueError("every prompt needs at least one token")
    first = next(model.parameters())
    cfg = getattr(model, "module", model).config
    fitted = [fit_context(p, cfg.max_seq_len, max_new_tokens) for p in prompts]
    prompts, budgets = [kept for kept, _ in fitted], [budget for _, budget in fitted]
    ids, valid = left_pad(prompts, pad_id)
    max_new_tokens = max(budgets)  # every row's budget fits the cache: its prompt is padded to the longest
    cache = KVCache.empty(cfg, len(prompts), min(ids.shape[1] + max_new_tokens, cfg.max_seq_len),
                          device=first.device, dtype=first.dtype)
    logits = model(ids.to(first.device), cache=cache, valid=valid.to(first.device), last=1)[:, -1].float()  # (B, V)
    new: list[list[int]] = [[] for _ in prompts]
    going = [True] * len(prompts)
    step = 0
    while True:
        if any(going):
            rows = [row for row in range(len(prompts)) if going[row]]
            check_finite(logits[rows], step + 1, first.dtype)
            tokens = next_token(logits, sampling, generator)  # (B,)
            for row, token in enumerate(tokens.tolist()):
                if going[row]:
                    new[row].append(token)
                    going[row] = (token != eos_id and token not in stop_ids and len(new[row]) < budgets[row]
                                  and not (until is not None and until(new[row])))
            if cache.length == cache.capacity:
                going = [False] * len(prompts)
        step += 1
        mine = any(going)
        if not (sync(mine) if sync is not None else mine):
            return new
        if mine:
            logits = model(tokens[:, None], cache=cache)[:, -1].float()
        else:  # in step with the ranks still generating (ZeRO-3 gathers weights in every pass)
            idle = KVCache.empty(cfg, 1, 1, device=first.device, dtype=first.dtype)
            model(torch.zeros((1, 1), dtype=torch.long, device=first.device), cache=idle)


def generate(model: torch.nn.Module, prompt: list[int], *, max_new_tokens: int, eos_id: int | None,
             sampling: Sampling, generator: torch.Generator | None = None, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """The new tokens after ``prompt`` (EOS, or one of ``stop_ids``, included if reached), with the cache."""
    return generate_batch(model, [prompt], max_new_tokens=max_new_tokens, eos_id=eos_id, sampling=sampling,
                          generator=generator, stop_ids=stop_ids)[0]


@torch.no_grad()
def generate_uncached(model: torch.nn.Module, prompt: list[int], *, max_new_tokens: int, eos_id: int | None,
                      sampling: Sampling, generator: torch.Generator | None = None,
                      stop_ids: tuple[int, ...] = ()) -> list[int]:
    """:func:`generate` without the cache: one full forward pass over the context for every new token (the
    same context rule); the reference the cache is checked against, and the benchmark's baseline."""
    first = next(model.parameters())
    tokens, budget = fit_context(list(prompt), model.config.max_seq_len, max_new_tokens)
    new: list[int] = []
    for _ in range(budget):
        logits = model(torch.tensor([tokens], device=first.device))[0, -1].float()  # (V,)
        check_finite(logits, len(new) + 1, first.dtype)
        token = int(next_token(logits, sampling, generator))
        tokens.append(token)
        new.append(token)
        if token == eos_id or token in stop_ids:
            break
    return new


# ----------------------------------------------------------------------------- `hataori generate`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a run folder or its checkpoints/step_N folder")
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: no limit")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: no limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", action="store_true", help="always take the most probable token")
    parser.add_argument("--tokenizer", help="tokenizer folder or .model file (default: the run's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda where there is one)")
    parser.add_argument("--dtype", default="fp32", choices=PRECISIONS, help="the precision the model computes in")
    parser.add_argument("--chat", action="store_true", help="the prompt is a user's turn, rendered with the run's "
                        "chat template (a model fine-tuned with `hataori sft`); print the assistant's reply")


def main(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", f"must be >= 1, got {args.max_new_tokens}")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy)
    device = torch_device(args.device)
    check_precision(args.dtype, device, "--dtype")
    run = open_run(args.checkpoint)
    tokenizer = run.tokenizer(args.tokenizer)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's progress prints; stdout carries only the text
        model = run.model(device, DTYPES[args.dtype])
    stops: tuple[int, ...] = ()
    if args.chat:
        template = run.chat_template()
        if template is None:
            raise ConfigError("--chat", f"the run {run.run_dir} has no chat template (chat_template.jinja): it was "
                              "not fine-tuned on conversations (`hataori sft`); generate without --chat")
        messages = [{"role": "user", "content": args.prompt}]
        prompt = template.encode(messages, tokenizer, add_generation_prompt=True, where="--chat's prompt").ids
        stops = tuple(template.stop_ids(tokenizer))
    else:
        prompt = [tokenizer.eos_id] + tokenizer.encode([args.prompt])[0]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    new = generate(model, prompt, max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id, sampling=sampling,
                   generator=generator, stop_ids=stops)
    text = tokenizer.decode([t for t in new if t != tokenizer.eos_id and t not in stops])
    print(text if args.chat else args.prompt + text)
    return 0
