"""Multiple-choice scoring: each choice's log-likelihood after the prompt.

Scores
    A choice's score is the summed log-probability of the tokens that cover it, given everything
    before them. ``acc`` counts the examples whose highest-scoring choice is the answer; ``acc_norm``
    the same with each score divided by the number of characters of the choice's text (as scored
    after the prompt, template text included), which removes the preference for short choices.
    Ties go to the first choice.

Token boundary
    SentencePiece may merge the last characters of the prompt with the first of a choice, so the
    prompt's own tokens need not be a prefix of the tokens of prompt + choice. The rule: encode the
    prompt and prompt + choice, take the longest common prefix of the two id sequences, and score
    every token of prompt + choice after it, given EOS and that prefix. The scored tokens are
    exactly those that cover the choice's characters (the first may also cover the prompt's last
    characters, when they merged), and the condition is a tokenization the model can produce.
    Without a merge the prefix is the prompt's tokens and this is the usual conditional likelihood.

Inputs
    Every sequence starts with EOS, as training documents do (each follows the previous one's EOS).
    A sequence longer than ``max_seq_len + 1`` tokens keeps its last ones (the prompt loses its
    start); the number of such requests is reported as ``truncated``.

Batches
    Requests are sorted by length (longest first) and run ``batch_size`` at a time, padded on the
    right. Attention is causal, so padding after a sequence does not change its logits, and positions
    start at 0 in every row: a batch computes what each sequence computes alone. Only the scored
    positions go through the log-softmax, in fp32, and are summed in fp64 one request at a time.

Processes
    Pretraining validation scores on every rank of its process group (under ZeRO-3 each forward pass
    gathers the parameters from all ranks, so every rank must run as many as the others). The
    batches above, built the same on every rank, are dealt out: batch ``b`` to rank
    ``b % world_size``; a rank with one batch fewer runs a one-token pass whose output is not used.
    Each request is scored on one rank, in the batch one process would score it in, and the ranks'
    scores (0.0 where another rank scored) are summed: the scores are one process's.

Shots
    ``k`` shots for the example at index ``i`` are drawn without replacement from the train
    examples by ``random.Random(f"{seed}-{i}")``, skipping an example with the evaluated one's
    fields: the same seed gives the same prompts in every run, whatever ``--limit`` and batch size.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from hataori.errors import ConfigError, HataoriError
from hataori.eval.tasks import Example
from hataori.eval.templates import Template
from hataori.tokenizer.model import Tokenizer


@dataclass(frozen=True, slots=True)
class Request:
    """One choice to score: the token ids it is conditioned on (EOS first) and the ids scored."""

    context: tuple[int, ...]
    target: tuple[int, ...]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def build_requests(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> list[Request]:
    """The request of each (prompt, choice) pair under the token boundary rule (module docstring)."""
    prompts = tokenizer.encode([prompt for prompt, _ in pairs])
    wholes = tokenizer.encode([prompt + choice for prompt, choice in pairs])
    requests = []
    for (prompt, choice), prompt_ids, whole in zip(pairs, prompts, wholes):
        cut = common_prefix(prompt_ids, whole)
        if cut == len(whole):
            raise ConfigError("--template", f"the choice {choice!r} adds no token after the prompt ending "
                              f"{prompt[-20:]!r}; check the template's answer text")
        requests.append(Request(context=(tokenizer.eos_id, *whole[:cut]), target=tuple(whole[cut:])))
    return requests


def batches(lengths: list[int], *, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The batches (request indices) that ``rank`` runs: the requests sorted by ``lengths``, longest first,
    cut into ``batch_size`` at a time, and batch ``b`` dealt to rank ``b % world_size``. Every rank gets
    the same number of batches; a rank short of one gets an empty batch (module docstring, Processes)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    cut = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    passes = -(-len(cut) // world_size)
    return [cut[b] if b < len(cut) else [] for b in range(rank, passes * world_size, world_size)]


@torch.no_grad()
def loglikelihoods(model: Callable[..., torch.Tensor], requests: list[Request], *, batch_size: int, pad_id: int,
                   rank: int = 0, world_size: int = 1, max_len: int | None = None,
                   device: torch.device | str | None = None) -> tuple[list[float], int]:
    """The summed log-probability of each request's target tokens, and how many were truncated.

    ``model`` is a module or a DeepSpeed engine (``model(input_ids) -> logits``); ``max_len`` and
    ``device`` default to the module's ``config.max_seq_len`` and its parameters' device. With
    ``world_size > 1`` only this rank's batches are scored (:func:`batches`) and the other requests'
    scores are 0.0: :func:`sum_over_ranks` of the ranks' lists is every score.
    """
    max_len = max_len or model.config.max_seq_len
    device = device or next(model.parameters()).device
    sequences = []
    for request in requests:
        if len(request.target) > max_len:
            raise ConfigError("--task", f"a choice of {len(request.target)} tokens does not fit the model's "
                              f"max_seq_len={max_len}")
        sequences.append((request.context + request.target)[-(max_len + 1):])
    truncated = sum(len(r.context) + len(r.target) > max_len + 1 for r in requests)
    scores = [0.0] * len(requests)
    for batch in batches([len(s) for s in sequences], batch_size=batch_size, rank=rank, world_size=world_size):
        if not batch:  # this rank's share ran out: one pass all the same, as ZeRO-3 gathers in each
            model(torch.full((1, 1), pad_id, dtype=torch.long, device=device))
            continue
        width = max(len(sequences[i]) for i in batch) - 1
        inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T), padded on the right
        for row, i in enumerate(batch):
            inputs[row, :len(sequences[i]) - 1] = torch.tensor(sequences[i][:-1])
        logits = model(inputs.to(device))  # (B, T, V)
        for row, i in enumerate(batch):
            n, length = len(requests[i].target), len(sequences[i])
            scored = logits[row, length - 1 - n:length - 1].float()  # (n, V): the positions predicting the target
            target = torch.tensor(requests[i].target, device=device)
            logprobs = torch.log_softmax(scored, dim=-1).gather(-1, target[:, None])[:, 0]  # (n,)
            scores[i] = logprobs.double().sum().item()
    return scores, truncated


def sum_over_ranks(scores: list[float], device: torch.device | str) -> list[float]:
    """Every rank's scores of :func:`loglikelihoods`, on every rank: each request is scored on one rank
    and is 0.0 on the others, so the fp64 sum is that rank's score exactly."""
    import torch.distributed as dist

    summed = torch.tensor(scores, dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def draw_shots(train: list[Example], k: int, seed: int, index: int, example: Example) -> list[Example]:
    """The ``k`` shots of the example at ``index`` (module docstring)."""
    if k == 0:
        return []
    rng = random.Random(f"{seed}-{index}")
    drawn = [train[j] for j in rng.sample(range(len(train)), min(k + 1, len(train)))]
    return [shot for shot in drawn if shot.fields != example.fields][:k]


def prompts(template: Template, examples: list[Example], *, train: list[Example], shots: int,
            seed: int) -> list[str]:
    """The prompt of each example, with its shots."""
    return [template.prompt(example, draw_shots(train, shots, seed, i, example)) for i, example in enumerate(examples)]


@dataclass(frozen=True, slots=True)
class ChoiceSet:
    """Examples ready to score, prepared once: each one's prompt (shots included), the text of each of
    its choices, and the requests of every choice of every example, in order."""

    examples: list[Example]
    prompts: list[str]
    choices: list[list[str]]
    """The text scored for each choice of each example (:meth:`Template.choice`)."""
    requests: list[Request]
    """Example by example, choice by choice."""


def prepare_choices(tokenizer: Tokenizer, template: Template, examples: list[Example], *,
                    train: list[Example] | None = None, shots: int = 0, seed: int = 0) -> ChoiceSet:
    """Draw the shots, write the prompts and tokenize every (prompt, choice) pair."""
    texts = prompts(template, examples, train=train or [], shots=shots, seed=seed)
    choices = [[template.choice(example, c) for c in range(len(example.choices))] for example in examples]
    requests = build_requests(tokenizer, [(prompt, choice) for prompt, options in zip(texts, choices)
                                          for choice in options])
    return ChoiceSet(examples=examples, prompts=texts, choices=choices, requests=requests)


def evaluate_choice(model: Callable[..., torch.Tensor], prepared: ChoiceSet, *, batch_size: int = 8, pad_id: int,
                    rank: int = 0, world_size: int = 1, max_len: int | None = None,
                    device: torch.device | str | None = None) -> dict:
    """Score every choice of every example; counts, scores (acc, acc_norm) and each example's details.

    One process scores everything; with ``world_size > 1`` every rank of the process group calls this
    with the same ``prepared``, scores its share of the batches (the same number of forward passes on
    every rank) and the scores are summed over the ranks: every rank returns the same results.
    ``seconds`` is the scoring's wall time (the preparation is not counted). The model's mode is the
    caller's to set (``eval()``: no dropout).
    """
    began = time.perf_counter()
    device = device or next(model.parameters()).device
    scores, truncated = loglikelihoods(model, prepared.requests, batch_size=batch_size, pad_id=pad_id, rank=rank,
                                       world_size=world_size, max_len=max_len, device=device)
    if world_size > 1:
        scores = sum_over_ranks(scores, device)
    bad = [i for i, score in enumerate(scores) if not math.isfinite(score)]
    if bad:  # every rank has the same scores and stops alike
        owner = next(e for e, end in zip(prepared.examples, np.cumsum([len(c) for c in prepared.choices]))
                     if bad[0] < end)
        raise HataoriError(f"the model's log-likelihoods are not finite (NaN or inf) for {len(bad):,} of "
                           f"{len(scores):,} choices, the first in the example of line {owner.line}: its weights "
                           "or activations overflow, so no score is reported")
    details, at = [], 0
    for example, prompt, choice_texts in zip(prepared.examples, prepared.prompts, prepared.choices):
        n = len(choice_texts)
        lls = scores[at:at + n]
        chars = [len(choice) for choice in choice_texts]
        details.append({
            "line": example.line, "label": example.label, "prompt": prompt, "choices": choice_texts,
            "loglikelihoods": lls, "tokens": [len(r.target) for r in prepared.requests[at:at + n]], "chars": chars,
            "prediction": int(np.argmax(lls)),
            "prediction_norm": int(np.argmax([ll / max(c, 1) for ll, c in zip(lls, chars)])),
        })
        at += n
    seconds = time.perf_counter() - began
    acc = sum(d["prediction"] == d["label"] for d in details) / len(details)
    acc_norm = sum(d["prediction_norm"] == d["label"] for d in details) / len(details)
    requests = prepared.requests
    return {
        "counts": {"examples": len(details), "requests": len(requests), "truncated": truncated,
                   "tokens_scored": sum(len(r.target) for r in requests)},
        "scores": {"acc": acc, "acc_norm": acc_norm},
        "seconds": seconds, "examples_per_second": len(details) / seconds,
        "examples": details,
    }
