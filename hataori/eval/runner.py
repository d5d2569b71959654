"""Run one task on a model: the function ``hataori eval`` calls once it has loaded the model.

:func:`run_task` takes a model (a :class:`hataori.model.Transformer`, or any module whose
``forward(input_ids)`` returns logits ``(B, T, V)`` and that has ``config.max_seq_len``) and its
tokenizer, and returns the results as a JSON-ready dict: the task, template, shots, seed, the files
read, counts, scores and, for multiple-choice tasks, each example's per-choice log-likelihoods.

Pretraining scores its model on multiple-choice tasks at validations (``validation.tasks``, each an
:class:`EvalTaskConfig`). It prepares each task once per run (:func:`prepare_task`: examples read,
shots drawn, requests tokenized) and calls :meth:`ChoiceTask.run` at every validation the task is
due at, on every rank: the ranks share the batches and every rank gets the results that
``hataori eval`` on one process gives for the same weights (:mod:`hataori.eval.choice`, Processes).
``bpc`` is not run there: the validation split's bits per character are already logged.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hataori.config import require
from hataori.errors import ConfigError, HataoriError
from hataori.eval.bpc import read_documents, score_documents
from hataori.eval.choice import ChoiceSet, evaluate_choice, prepare_choices
from hataori.eval.generation import GenerationSet, evaluate_generation, prepare_generation
from hataori.eval.tasks import TASKS, get_task, read_examples
from hataori.eval.templates import load_template
from hataori.tokenizer.chat import ChatTemplate
from hataori.tokenizer.model import Tokenizer


def run_task(model: torch.nn.Module, tokenizer: Tokenizer, task: str, *, template: str | None = None, shots: int = 0,
             seed: int = 0, data: str | Path | None = None, train: str | Path | None = None, limit: int = 0,
             batch_size: int = 8, chat: ChatTemplate | None = None) -> dict:
    """Evaluate ``model`` on ``task`` (see the module docstring); ``data`` replaces the task's file, ``train``
    its few-shot file, ``limit`` keeps the first examples (documents for bpc; 0: all); ``chat``: a generation
    task's prompts as a user turn of this chat template (:mod:`hataori.eval.generation`)."""
    spec = get_task(task)
    _check_counts(shots=shots, limit=limit)
    if batch_size < 1:
        raise ConfigError("--batch-size", f"must be >= 1, got {batch_size}")
    if chat is not None and spec.kind != "generate":
        raise ConfigError("--chat", f"renders a generation task's prompt as a user turn; {spec.name} is scored by "
                          "log-likelihood of the text itself: leave out --chat")
    if spec.kind == "bpc":
        return _run_bpc(model, tokenizer, spec, template=template, shots=shots, data=data, train=train, limit=limit,
                        batch_size=batch_size)
    prepared = prepare_task(tokenizer, task, template=template, shots=shots, seed=seed, data=data, train=train,
                            limit=limit, chat=chat)
    model.eval()
    return prepared.run(model, batch_size=batch_size)


@dataclass(kw_only=True, slots=True)
class EvalTaskConfig:
    """A multiple-choice or generation task that pretraining scores its model on at validations
    (``validation.tasks``), as ``hataori eval MODEL --task TASK`` would score a checkpoint of that step."""

    task: str
    """A multiple-choice task (jcommonsenseqa, jnli) or a generation task (jsquad, jcommonsenseqa-gen, jnli-gen,
    jsts; :mod:`hataori.eval.tasks`)."""
    name: str = ""
    """Names the scores (TensorBoard ``eval/NAME/acc``, metrics.jsonl) and results files
    (``eval/NAME-step_N.json``); empty: the task's name. Give a task run twice a name for each."""
    template: str = ""
    """A template name (configs/eval/NAME.yaml) or YAML file; empty: the task's default."""
    shots: int = 0
    """Examples with their answers before each one, drawn from the task's train file."""
    seed: int = 0
    """Seed of the shots' draw."""
    limit: int = 0
    """Only the first this many examples of the task's file; 0: all of them."""
    batch_size: int = 8
    """Sequences a forward pass on each process."""
    every_steps: int = 0
    """Run at the validations of the steps that are multiples of this (a multiple of
    validation.every_steps), and at those before the first step and after the last; 0: at every validation."""

    def __post_init__(self) -> None:
        choice = ", ".join(t.name for t in TASKS.values() if t.kind in ("choice", "generate"))
        if self.task == "bpc":
            raise ConfigError("task", "bpc is not run during pretraining: every validation already scores the "
                              "validation split in bits per character (val/bpc); for another corpus run "
                              "`hataori eval RUN --task bpc --data FILE` on a checkpoint. Tasks here: " + choice)
        require(self.task in TASKS, "task", f"unknown task {self.task!r}; tasks run during pretraining: {choice}")
        require(re.fullmatch(r"[\w.-]*", self.name) is not None, "name",
                f"{self.name!r} names files and TensorBoard tags: use letters, digits, '_', '.' and '-'")
        for key in ("shots", "seed", "limit", "every_steps"):
            value = getattr(self, key)
            require(value >= 0, key, f"must be >= 0, got {value}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        spec = TASKS[self.task]
        require(not self.shots or spec.train is not None, "shots",
                f"{spec.name} has no bundled train file to draw shots from; set shots: 0")
        try:
            load_template(self.template or None, spec)
        except ConfigError as err:
            raise ConfigError("template", err.message) from None

    @property
    def label(self) -> str:
        """The name of the scores and results files: ``name``, or the task's."""
        return self.name or self.task

    def due(self, step: int, *, last: bool) -> bool:
        """Whether to run at the validation after ``step`` optimizer steps."""
        return last or self.every_steps == 0 or step % self.every_steps == 0

    def prepare(self, tokenizer: Tokenizer) -> ChoiceTask | GenerationTask:
        """The task's examples read, shots drawn and requests tokenized (:func:`prepare_task`)."""
        return prepare_task(tokenizer, self.task, template=self.template or None, shots=self.shots, seed=self.seed,
                            limit=self.limit)


@dataclass(frozen=True, slots=True)
class ChoiceTask:
    """A multiple-choice task ready to score a model on, as often as asked: its examples read, shots
    drawn and every request tokenized once (:func:`prepare_task`)."""

    setup: dict
    """What the results record of the run: task, template, shots, seed, the files read, limit."""
    prepared: ChoiceSet
    pad_id: int

    def run(self, model, *, batch_size: int = 8, rank: int = 0, world_size: int = 1, max_len: int | None = None,
            device: torch.device | str | None = None) -> dict:
        """The results of ``model`` (a module in eval mode, or a DeepSpeed engine; ``max_len`` and ``device``
        default to the module's max_seq_len and parameters' device); on ``world_size`` ranks, every rank
        calls it and gets the same results (:func:`hataori.eval.choice.evaluate_choice`)."""
        results = evaluate_choice(model, self.prepared, batch_size=batch_size, pad_id=self.pad_id, rank=rank,
                                  world_size=world_size, max_len=max_len, device=device)
        return {**self.setup, "batch_size": batch_size, **results}


@dataclass(frozen=True, slots=True)
class GenerationTask:
    """A generation task ready to run on a model: its examples read, shots drawn and prompts tokenized once."""

    setup: dict
    prepared: GenerationSet
    tokenizer: Tokenizer

    def run(self, model, *, batch_size: int = 8, rank: int = 0, world_size: int = 1, max_len: int | None = None,
            device: torch.device | str | None = None) -> dict:
        """The results of ``model`` (a module in eval mode, or a DeepSpeed engine); on ``world_size`` ranks,
        every rank calls it and gets the same results (:func:`hataori.eval.generation.evaluate_generation`).
        ``max_len`` is the model's own max_seq_len here (the generator's context rule)."""
        results = evaluate_generation(model, self.prepared, self.tokenizer, batch_size=batch_size, rank=rank,
                                      world_size=world_size, device=device)
        return {**self.setup, "batch_size": batch_size, **results}


def prepare_task(tokenizer: Tokenizer, task: str, *, template: str | None = None, shots: int = 0, seed: int = 0,
                 data: str | Path | None = None, train: str | Path | None = None, limit: int = 0,
                 chat: ChatTemplate | None = None) -> ChoiceTask | GenerationTask:
    """Read the examples of the multiple-choice or generation ``task``, draw their shots and tokenize their
    requests or prompts (the options are :func:`run_task`'s; a bad one is a ConfigError keyed by its
    ``hataori eval`` flag)."""
    spec = get_task(task)
    if spec.kind not in ("choice", "generate"):
        raise ConfigError("--task", f"{spec.name} is neither a multiple-choice nor a generation task")
    _check_counts(shots=shots, limit=limit)
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
    setup = {"task": spec.name, "template": loaded.name, "template_file": str(loaded.path),
             "template_config": dataclasses.asdict(loaded.cfg), "shots": shots, "seed": seed,
             "data": str(data_path), "train": str(train_path) if shots else None, "limit": limit}
    if spec.kind == "generate":
        setup["chat_template"] = None if chat is None else {"origin": str(chat.origin), "sha256": chat.sha256}
        generation = prepare_generation(tokenizer, loaded, examples, train=train_examples, shots=shots, seed=seed,
                                        metric=spec.metric, chat=chat)
        return GenerationTask(setup=setup, prepared=generation, tokenizer=tokenizer)
    prepared = prepare_choices(tokenizer, loaded, examples, train=train_examples, shots=shots, seed=seed)
    return ChoiceTask(setup=setup, prepared=prepared, pad_id=tokenizer.eos_id)


def _check_counts(*, shots: int, limit: int) -> None:
    if shots < 0:
        raise ConfigError("--shots", f"must be >= 0, got {shots}")
    if limit < 0:
        raise ConfigError("--limit", f"must be >= 0 (0: every example), got {limit}")


def _run_bpc(model, tokenizer, spec, *, template, shots, data, train, limit, batch_size) -> dict:
    for flag, value in (("--template", template), ("--shots", shots), ("--train", train)):
        if value:
            raise ConfigError(flag, f"the {spec.name} task scores whole documents; it takes no {flag[2:]}")
    if not data:
        raise ConfigError("--data", f"the {spec.name} task scores a corpus file: pass --data FILE (JSONL with a "
                          "text field, or plain text with a document a paragraph)")
    began = time.perf_counter()
    texts = read_documents(data, limit)
    result = score_documents(model, tokenizer, texts, batch_size=batch_size)
    if not math.isfinite(result.nll):
        raise HataoriError(f"the model's negative log-likelihood of {data} is not finite ({result.nll}): its weights "
                           "or activations overflow, so no bits per character are reported")
    seconds = time.perf_counter() - began
    return {"task": spec.name, "template": None, "shots": 0, "seed": None, "data": str(data), "limit": limit,
            "batch_size": batch_size, "seq_len": model.config.max_seq_len,
            "counts": {"examples": result.documents, "documents": result.documents, "tokens": result.tokens,
                       "chars": result.chars},
            "scores": {"bpc": result.bpc, "loss": result.loss, "nll": result.nll},
            "seconds": seconds, "examples_per_second": result.documents / seconds}


def summary(results: dict) -> str:
    """The one-line summary ``hataori eval`` prints."""
    scores = " ".join(f"{name} {'undefined' if value is None else f'{value:.4f}'}"
                      for name, value in results["scores"].items() if name != "nll")
    setup = f" ({results['template']}, {results['shots']}-shot, seed {results['seed']})" if results["template"] else ""
    return (f"{results['task']}{setup}: {scores} over {results['counts']['examples']:,} examples, "
            f"{results['examples_per_second']:.1f} examples/s")
