"""Run one task on a model: the function ``hataori eval`` calls once it has loaded the model.

:func:`run_task` takes a model (a :class:`hataori.model.Transformer`, or any module whose
``forward(input_ids)`` returns logits ``(B, T, V)`` and that has ``config.max_seq_len``) and its
tokenizer, and returns the results as a JSON-ready dict: the task, template, shots, seed, the files
read, counts, scores and, for multiple-choice tasks, each example's per-choice log-likelihoods.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from hataori.errors import ConfigError
from hataori.eval.tasks import get_task, read_examples
from hataori.tokenizer.model import Tokenizer


def run_task(model: torch.nn.Module, tokenizer: Tokenizer, task: str, *, template: str | None = None, shots: int = 0,
             seed: int = 0, data: str | Path | None = None, train: str | Path | None = None, limit: int = 0,
             batch_size: int = 8) -> dict:
    """Evaluate ``model`` on ``task`` (see the module docstring); ``data`` replaces the task's file, ``train``
    its few-shot file, ``limit`` keeps the first examples (documents for bpc; 0: all)."""
    spec = get_task(task)
    if shots < 0:
        raise ConfigError("--shots", f"must be >= 0, got {shots}")
    if limit < 0:
        raise ConfigError("--limit", f"must be >= 0 (0: every example), got {limit}")
    if batch_size < 1:
        raise ConfigError("--batch-size", f"must be >= 1, got {batch_size}")
    if spec.kind == "bpc":
        return _run_bpc(model, tokenizer, spec, template=template, shots=shots, data=data, train=train, limit=limit,
                        batch_size=batch_size)

    from hataori.eval.choice import evaluate_choice
    from hataori.eval.templates import load_template

    loaded = load_template(template, spec)
    data_path = Path(data) if data else spec.data
    examples = read_examples(spec, data_path)
    if limit:
        examples = examples[:limit]
    train_path = Path(train) if train else spec.train
    train_examples = []
    if shots:
        if train_path is None:
            raise ConfigError("--shots", f"{spec.name} has no bundled train file to draw shots from; pass --train FILE "
                              "or --shots 0")
        train_examples = read_examples(spec, train_path)
        if shots > len(train_examples):
            raise ConfigError("--shots", f"{shots} shots is more than the {len(train_examples)} examples of "
                              f"{train_path}")
    results = evaluate_choice(model, tokenizer, loaded, examples, train=train_examples, shots=shots, seed=seed,
                              batch_size=batch_size)
    return {"task": spec.name, "template": loaded.name, "template_file": str(loaded.path),
            "template_config": dataclasses.asdict(loaded.cfg), "shots": shots, "seed": seed,
            "data": str(data_path), "train": str(train_path) if shots else None, "limit": limit,
            "batch_size": batch_size, **results}


def _run_bpc(model, tokenizer, spec, *, template, shots, data, train, limit, batch_size) -> dict:
    from hataori.eval.bpc import read_documents, score_documents

    for flag, value in (("--template", template), ("--shots", shots), ("--train", train)):
        if value:
            raise ConfigError(flag, f"the {spec.name} task scores whole documents; it takes no {flag[2:]}")
    if not data:
        raise ConfigError("--data", f"the {spec.name} task scores a corpus file: pass --data FILE (JSONL with a "
                          "text field, or plain text with a document a paragraph)")
    began = time.perf_counter()
    texts = read_documents(data, limit)
    result = score_documents(model, tokenizer, texts, batch_size=batch_size)
    seconds = time.perf_counter() - began
    return {"task": spec.name, "template": None, "shots": 0, "seed": None, "data": str(data), "limit": limit,
            "batch_size": batch_size, "seq_len": model.config.max_seq_len,
            "counts": {"examples": result.documents, "documents": result.documents, "tokens": result.tokens,
                       "chars": result.chars},
            "scores": {"bpc": result.bpc, "loss": result.loss, "nll": result.nll},
            "seconds": seconds, "examples_per_second": result.documents / seconds}


def summary(results: dict) -> str:
    """The one-line summary ``hataori eval`` prints."""
    scores = " ".join(f"{name} {value:.4f}" for name, value in results["scores"].items() if name != "nll")
    setup = f" ({results['template']}, {results['shots']}-shot, seed {results['seed']})" if results["template"] else ""
    return (f"{results['task']}{setup}: {scores} over {results['counts']['examples']:,} examples, "
            f"{results['examples_per_second']:.1f} examples/s")
