"""Generation tasks: an answer generated after each prompt and scored against the gold answers.

Prompts
    As for multiple-choice tasks (:mod:`hataori.eval.templates`): the description, ``k`` shots drawn by the
    seeded rule of :func:`hataori.eval.choice.draw_shots`, each with its first gold answer, then the
    example's prompt. Every prompt starts with EOS, as training documents do. With a chat template (a
    fine-tuned model's, ``hataori eval --chat``) the whole prompt is instead one user turn rendered by it,
    followed by the assistant's opening, and the answer also ends at the token that ends an assistant turn.

Generation
    Greedy, with the key/value cache (:func:`hataori.eval.generate.generate_batch`), up to the template's
    ``max_new_tokens`` or until the text holds a ``stop`` string; a prompt longer than the model's context
    keeps its last tokens by the generator's context rule (counted as ``truncated``). Prompts are sorted
    by length (longest first) and generated ``batch_size`` at a time, left-padded; greedy decoding gives
    each prompt the tokens it gets alone, so the batch size does not change a score.

Processes
    Pretraining validation generates on every rank of its process group: batch ``b`` goes to rank
    ``b % world_size`` (a rank with a batch fewer generates for a one-token prompt it does not use), every
    rank runs as many forward passes as the others at each step (:func:`generate_batch`'s ``sync``: under
    ZeRO-3 each pass gathers the weights from all ranks), and the answers are gathered, so every rank returns
    the results one process gives.

Scores
    The answer is the generated text before the first of the template's ``stop`` strings (and before EOS),
    stripped; ``exact_match`` and ``char_f1`` (:mod:`hataori.eval.answers`) are its best against the gold
    answers, averaged over the examples. A ``correlation`` task (JSTS) reads the first number of each answer
    (one without a number counts as 0, the scale's floor, and is counted as ``invalid``) and reports
    Pearson's and Spearman's correlation with the gold values. The results keep every example's prompt,
    output, answer, gold answers and scores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hataori.eval.answers import char_f1, exact_match, first_line, parse_number, pearson, spearman
from hataori.eval.choice import draw_shots
from hataori.eval.generate import Sampling, generate_batch
from hataori.eval.tasks import Example
from hataori.eval.templates import Template
from hataori.tokenizer.chat import ChatTemplate
from hataori.tokenizer.model import Tokenizer


@dataclass(frozen=True, slots=True)
class GenerationSet:
    """Examples ready to generate for, prepared once: each one's prompt (shots included), its token ids (EOS
    first) and its gold answers."""

    examples: list[Example]
    prompts: list[str]
    ids: list[list[int]]
    golds: list[list[str]]
    max_new_tokens: int
    stop: tuple[str, ...]
    metric: str = "match"
    stop_ids: tuple[int, ...] = ()
    """Token ids that end an answer besides EOS (a chat template's end of turn)."""


def prepare_generation(tokenizer: Tokenizer, template: Template, examples: list[Example], *,
                       train: list[Example] | None = None, shots: int = 0, seed: int = 0,
                       metric: str = "match", chat: ChatTemplate | None = None) -> GenerationSet:
    """Draw the shots, write the prompts and tokenize them (as a user turn of ``chat``, where given)."""
    texts = [template.prompt(example, draw_shots(train or [], shots, seed, i, example))
             for i, example in enumerate(examples)]
    if chat is None:
        ids = [[tokenizer.eos_id] + tokens for tokens in tokenizer.encode(texts)]
        stop_ids: tuple[int, ...] = ()
    else:
        ids = [chat.encode([{"role": "user", "content": text}], tokenizer, add_generation_prompt=True,
                           where=f"the prompt of line {example.line}").ids for text, example in zip(texts, examples)]
        stop_ids = tuple(chat.stop_ids(tokenizer))
    return GenerationSet(examples=examples, prompts=texts, ids=ids, golds=[template.golds(e) for e in examples],
                         max_new_tokens=template.cfg.max_new_tokens, stop=tuple(template.cfg.stop), metric=metric,
                         stop_ids=stop_ids)


def any_rank(going: bool, device: torch.device | str) -> bool:
    """Whether ``going`` holds on any rank of the process group (every rank must call this)."""
    flag = torch.tensor([1.0 if going else 0.0], device=device)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


def evaluate_generation(model: torch.nn.Module, prepared: GenerationSet, tokenizer: Tokenizer, *,
                        batch_size: int = 8, rank: int = 0, world_size: int = 1,
                        device: torch.device | str | None = None) -> dict:
    """Generate every example's answer and score it; counts, scores and each example's details; on
    ``world_size`` ranks every rank calls it and gets the same results (module docstring, Processes).
    ``seconds`` is the generation's and scoring's wall time. The model's mode is the caller's to set."""
    began = time.perf_counter()
    device = device or next(model.parameters()).device
    order = sorted(range(len(prepared.ids)), key=lambda i: -len(prepared.ids[i]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    sync = (lambda going: any_rank(going, device)) if world_size > 1 else None
    outputs: dict[int, list[int]] = {}
    for k in range(math.ceil(len(batches) / world_size)):
        b = k * world_size + rank
        rows = batches[b] if b < len(batches) else []
        prompts = [prepared.ids[i] for i in rows] or [[tokenizer.eos_id]]  # the idle rank's unused prompt
        new = generate_batch(model, prompts, max_new_tokens=prepared.max_new_tokens if rows else 1,
                             eos_id=tokenizer.eos_id, sampling=Sampling(greedy=True), pad_id=tokenizer.eos_id,
                             stop_ids=prepared.stop_ids, sync=sync,
                             until=lambda tokens: any(stop in tokenizer.decode(tokens) for stop in prepared.stop))
        outputs.update(zip(rows, new))
    if world_size > 1:
        gathered: list[dict[int, list[int]] | None] = [None] * world_size
        dist.all_gather_object(gathered, outputs)
        outputs = {i: tokens for part in gathered for i, tokens in part.items()}
    config = getattr(model, "module", model).config
    limit = config.max_seq_len - min(prepared.max_new_tokens, config.max_seq_len // 2)
    details = []
    for example, prompt, ids, golds, tokens in zip(prepared.examples, prepared.prompts, prepared.ids, prepared.golds,
                                                   [outputs[i] for i in range(len(prepared.ids))]):
        text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_id and t not in prepared.stop_ids])
        answer = first_line(text, prepared.stop)
        detail = {"line": example.line, "prompt": prompt, "output": text, "answer": answer, "golds": golds,
                  "prompt_tokens": len(ids), "new_tokens": len(tokens)}
        if prepared.metric == "correlation":
            detail["prediction"] = parse_number(answer)
        else:
            detail.update(exact_match=exact_match(answer, golds), char_f1=char_f1(answer, golds))
        details.append(detail)
    seconds = time.perf_counter() - began
    n = len(details)
    counts = {"examples": n, "truncated": sum(len(ids) > limit for ids in prepared.ids),
              "new_tokens": sum(d["new_tokens"] for d in details)}
    if prepared.metric == "correlation":
        predicted = [d["prediction"] if d["prediction"] is not None else 0.0 for d in details]
        gold = [float(d["golds"][0]) for d in details]
        counts["invalid"] = sum(d["prediction"] is None for d in details)
        scores = {"pearson": pearson(predicted, gold), "spearman": spearman(predicted, gold)}
    else:
        scores = {"exact_match": sum(d["exact_match"] for d in details) / n,
                  "char_f1": sum(d["char_f1"] for d in details) / n}
    return {
        "counts": counts,
        "scores": scores,
        "max_new_tokens": prepared.max_new_tokens, "stop": list(prepared.stop),
        "seconds": seconds, "examples_per_second": n / seconds,
        "examples": details,
    }
