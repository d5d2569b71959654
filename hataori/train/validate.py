"""Validation: loss and bits per character over whole documents of the validation split, and the
eval tasks of ``validation.tasks``.

At each validation (before the first step, every ``validation.every_steps`` and after the last):
:class:`Validator` scores the validation split, then :class:`EvalTasks` runs the multiple-choice
tasks due at that step (:class:`~hataori.eval.runner.EvalTaskConfig`: ``every_steps: 0`` at
every validation) on the training model itself, in eval mode and without gradients, and puts it
back in train mode.

The scoring itself (windows, packing, the summed NLL, the character count) is
:mod:`hataori.eval.bpc`'s, which ``hataori eval --task bpc`` uses too; this module selects the
documents, caches their character count and deals the rows out to the ranks.

Documents
    The first documents of each dataset's ``val`` split, dataset by dataset in the config's order,
    up to ``validation.max_docs`` documents and ``validation.max_tokens`` tokens (a document is
    taken whole or not at all). The selection is the same at every validation of a run.

What is scored, and the numbers
    As :mod:`hataori.eval.bpc` describes: each document whole, EOS included, in windows of
    ``seq_len`` packed with document masking; ``loss`` in nats per target token, ``bpc`` in bits per
    character of the decoded text. The character count is computed once per run and cached in
    ``<run_dir>/validation.json``.

Conversations
    A dataset prepared with a chat template (:mod:`hataori.data.chat`) is scored as the objective trains
    on it: its conversations whole, packed into rows with :func:`hataori.data.examples.pack`, and only the
    targets its loss mask marks; ``loss`` is per such token and ``bpc`` per character of their decoded
    text (the assistant turns). A validation reads text datasets or conversation datasets, not both. Of
    preference pairs the chosen conversations are scored so (how well the model keeps the preferred answers).

Processes
    The rows are dealt out to the ranks (row ``i`` to rank ``i % world_size``), padded with unscored
    rows so every rank runs the same number of forward passes (ZeRO-3 gathers parameters in each),
    and the sums are all-reduced. An eval task's batches are dealt out and its scores summed the
    same way (:mod:`hataori.eval.choice`, Processes); each task is prepared once per run (examples,
    shots, tokens), so a validation only runs forward passes.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from hataori.config import require
from hataori.data.examples import pack
from hataori.data.shards import Dataset, dataset_kind
from hataori.errors import ConfigError
from hataori.eval.bpc import BpcResult, count_chars, pack_rows, summed_nll
from hataori.eval.runner import ChoiceTask, EvalTaskConfig
from hataori.fsutil import atomic_write_text
from hataori.model import IGNORE_INDEX
from hataori.tokenizer.model import Tokenizer

CACHE_FILE = "validation.json"


ValResult = BpcResult
"""One validation pass, the same on every rank."""


@dataclass(kw_only=True, slots=True)
class ValidationConfig:
    """What runs at a validation, and when: loss and bits per character on the validation split, over
    whole documents (:class:`Validator`), then the multiple-choice tasks due at that step
    (:class:`EvalTasks`, hataori.eval.runner), each scored on the model as it is after that step."""

    every_steps: int = 1000
    """Validate after every this many optimizer steps; also before the first step and after the last.
    0: only before the first and after the last."""
    max_docs: int = 0
    """Validate on at most this many documents (the first of each dataset's validation split); 0: all."""
    max_tokens: int = 0
    """Stop adding validation documents once they hold this many tokens; 0: no limit."""
    batch_size: int = 4
    """Sequences per forward pass on each process."""
    tasks: list[EvalTaskConfig] = field(default_factory=list)
    """Eval tasks, each run at the validations its every_steps selects (0: every one), e.g.
    ``[{task: jcommonsenseqa, limit: 200}]``: accuracies to metrics.jsonl ("kind": "eval") and
    TensorBoard (eval/NAME/acc, eval/NAME/acc_norm), results to run_dir/eval/NAME-step_N.json."""

    def __post_init__(self) -> None:
        for key in ("every_steps", "max_docs", "max_tokens"):
            value = getattr(self, key)
            require(value >= 0, key, f"must be >= 0 (0: no limit), got {value}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        names: dict[str, int] = {}
        for i, task in enumerate(self.tasks):
            require(task.label not in names, f"tasks[{i}].name",
                    f"{task.label!r} is the name of tasks[{names.get(task.label)}] too; give each run of a task a "
                    "name of its own (e.g. name: jcommonsenseqa-3shot)")
            names[task.label] = i
            if task.every_steps:
                require(self.every_steps > 0, f"tasks[{i}].every_steps",
                        "validation runs only before the first step and after the last (validation.every_steps=0), "
                        "and so do its tasks; set every_steps: 0")
                require(task.every_steps % self.every_steps == 0, f"tasks[{i}].every_steps",
                        f"{task.every_steps} is not a multiple of validation.every_steps={self.every_steps}; tasks run "
                        "at validations")

    def due(self, step: int, *, last: bool) -> bool:
        """Whether to validate after ``step`` optimizer steps (step 0: before training)."""
        return step == 0 or last or (self.every_steps > 0 and step % self.every_steps == 0)


def select_documents(datasets: list[Dataset], *, max_docs: int = 0, max_tokens: int = 0) -> list[np.ndarray]:
    """The validation documents (token ids, EOS last): the first of each dataset in order, within the limits."""
    return [doc for doc, _, _ in _select(datasets, max_docs, max_tokens, masks=False)]


def _select(datasets: list[Dataset], max_docs: int, max_tokens: int, *, masks: bool,
            every: int = 1) -> list[tuple[np.ndarray, np.ndarray | None, int]]:
    """(ids, loss mask or None, dataset index) of the first documents of each dataset, within the limits;
    ``every``: only every this many documents (2: the chosen answers of preference pairs)."""
    chosen: list[tuple[np.ndarray, np.ndarray | None, int]] = []
    tokens = 0
    for d, data in enumerate(datasets):
        for i in range(0, len(data), every):
            doc = np.asarray(data.doc(i), dtype=np.int64)
            if (max_docs and len(chosen) == max_docs) or (max_tokens and tokens + len(doc) > max_tokens):
                return chosen
            chosen.append((doc, np.asarray(data.doc_mask(i)) if masks else None, d))
            tokens += len(doc)
    return chosen


def loss_chars(examples: list[tuple[np.ndarray, np.ndarray, int]], tokenizer: Tokenizer) -> int:
    """Characters of the decoded text of every run of loss-marked targets (the assistant turns)."""
    total = 0
    for ids, mask, _ in examples:
        marked = np.concatenate([[0], (mask[1:] != 0).astype(np.int8), [0]])  # the targets that count
        edges = np.flatnonzero(np.diff(marked))
        total += sum(len(tokenizer.decode(ids[1 + a:1 + b].tolist())) for a, b in zip(edges[::2], edges[1::2]))
    return total


class Validator:
    """Scores a model on the selected validation documents; build it with :meth:`build`."""

    def __init__(self, cfg: ValidationConfig, docs: list, *, chars: int, eos_id: int, seq_len: int,
                 rank: int = 0, world_size: int = 1, conversations: bool = False):
        """``docs``: token ids (EOS last), or with ``conversations`` (ids, loss mask, dataset) triples."""
        if not docs:
            raise ValueError("no validation documents selected")
        self.cfg = cfg
        self.documents, self.chars = len(docs), chars
        if conversations:
            rows, _ = pack(docs, seq_len=seq_len, pad_id=eos_id)
            inputs, targets = rows.inputs, rows.targets
            doc_ids = np.cumsum(rows.positions == 0, axis=1, dtype=np.int64) - 1
            self.tokens = int(np.count_nonzero(targets != IGNORE_INDEX))
        else:
            self.tokens = sum(len(d) for d in docs)
            inputs, targets, doc_ids = pack_rows(docs, eos_id, seq_len)
        per_pass = cfg.batch_size * world_size
        missing = -len(inputs) % per_pass
        if missing:  # unscored rows so every rank runs the same number of passes
            inputs = np.concatenate([inputs, np.full((missing, seq_len), eos_id, np.int64)])
            targets = np.concatenate([targets, np.full((missing, seq_len), IGNORE_INDEX, np.int64)])
            doc_ids = np.concatenate([doc_ids, np.zeros((missing, seq_len), np.int64)])
        self.inputs, self.targets, self.doc_ids = (a[rank::world_size] for a in (inputs, targets, doc_ids))

    @classmethod
    def build(cls, cfg: ValidationConfig, dataset_paths: list[str], tokenizer: Tokenizer, *, seq_len: int,
              run_dir: str | Path | None = None, rank: int = 0, world_size: int = 1) -> "Validator":
        """Select the documents of the datasets' val splits and count their characters (cached in
        ``run_dir``; counted on rank 0 and broadcast when a process group is up)."""
        datasets = [Dataset(path, "val", tokenizer.fingerprint) for path in dataset_paths]
        conversations = datasets[0].masked
        if any(d.masked != conversations for d in datasets):
            raise ConfigError("data.datasets", f"{', '.join(dataset_paths)} mix text and conversation datasets; "
                              "a run trains on one kind")
        docs = _select(datasets, cfg.max_docs, cfg.max_tokens, masks=conversations,
                       every=2 if dataset_kind(datasets[0]) == "preference" else 1)
        if not conversations:
            docs = [doc for doc, _, _ in docs]
        if not docs:
            if not any(len(d) for d in datasets):
                raise ConfigError("data.datasets", f"the validation splits of {', '.join(dataset_paths)} hold no "
                                  "documents; prepare the data with val_docs=N or val_fraction > 0")
            first = next(len(d.doc(0)) for d in datasets if len(d))
            raise ConfigError("validation.max_tokens", f"{cfg.max_tokens} is smaller than the first validation "
                              f"document ({first} tokens); raise it, or set 0 for no limit")
        key = {"datasets": [d.fingerprint for d in datasets], "tokenizer": tokenizer.fingerprint,
               "documents": len(docs), "tokens": sum(len(d[0] if conversations else d) for d in docs)}
        count = (lambda: loss_chars(docs, tokenizer)) if conversations else (lambda: count_chars(docs, tokenizer))
        if conversations:
            key["kind"] = "conversations"
        shared = dist.is_initialized() and world_size > 1
        found = [None]
        if rank == 0:
            found[0] = cached_chars(Path(run_dir) / CACHE_FILE if run_dir else None, key, count)
        elif not shared:
            found[0] = count()
        if shared:
            dist.broadcast_object_list(found, src=0)
        return cls(cfg, docs, chars=found[0], eos_id=datasets[0].eos_id, seq_len=seq_len, rank=rank,
                   world_size=world_size, conversations=conversations)

    def evaluate(self, model: Callable[..., torch.Tensor], device: torch.device | str = "cpu") -> ValResult:
        """Score ``model`` (``model(input_ids, doc_ids=...) -> logits``, a module or a DeepSpeed engine)."""
        began = time.perf_counter()
        with eval_mode(model):
            nll = summed_nll(model, self.inputs, self.targets, self.doc_ids, batch_size=self.cfg.batch_size,
                             device=device)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(nll)
        total = nll.item()
        return ValResult(loss=total / self.tokens, bpc=total / math.log(2) / self.chars, nll=total,
                         tokens=self.tokens, chars=self.chars, documents=self.documents,
                         seconds=time.perf_counter() - began)


class EvalTasks:
    """The eval tasks of ``validation.tasks``, prepared once per run; build it with :meth:`build`."""

    def __init__(self, tasks: list[tuple[EvalTaskConfig, ChoiceTask]], *, max_len: int, run_dir: str | Path,
                 tokenizer_fingerprint: str, rank: int = 0, world_size: int = 1):
        self.tasks = tasks
        self.max_len = max_len
        self.run_dir = Path(run_dir)
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.rank, self.world_size = rank, world_size

    @classmethod
    def build(cls, cfgs: list[EvalTaskConfig], tokenizer: Tokenizer, *, max_len: int, run_dir: str | Path,
              rank: int = 0, world_size: int = 1) -> "EvalTasks":
        """Prepare each task (the same on every rank); ``max_len``: the model's max_seq_len."""
        tasks = []
        for i, cfg in enumerate(cfgs):
            try:
                tasks.append((cfg, cfg.prepare(tokenizer)))
            except ConfigError as err:  # keyed by `hataori eval`'s flag: name the config's key instead
                key = err.key.removeprefix("--").replace("-", "_")
                raise ConfigError(f"validation.tasks[{i}].{key}", err.message) from None
        return cls(tasks, max_len=max_len, run_dir=run_dir, tokenizer_fingerprint=tokenizer.fingerprint, rank=rank,
                   world_size=world_size)

    def evaluate(self, model: Callable[..., torch.Tensor], device: torch.device | str, step: int, *,
                 last: bool) -> Iterator[dict]:
        """The results of each task due at the validation after ``step`` (every rank must call this and
        read them all), in the format of ``hataori eval --output``; the model is ``model`` at ``step``."""
        for cfg, task in self.tasks:
            if not cfg.due(step, last=last):
                continue
            with eval_mode(model):
                results = task.run(model, batch_size=cfg.batch_size, rank=self.rank, world_size=self.world_size,
                                   max_len=self.max_len, device=device)
            record = {"path": str(self.run_dir.resolve()), "kind": "training", "checkpoint": None, "step": step,
                      "tokenizer": self.tokenizer_fingerprint}
            yield {"name": cfg.label, "model": record, **results}


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """``model`` (a module or a DeepSpeed engine) in eval mode without gradients, then back in the mode it was in."""
    training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if training and hasattr(model, "train"):
            model.train()


def cached_chars(path: Path | None, key: dict[str, Any], count: Callable[[], int]) -> int:
    """``count()``, or the value cached at ``path`` for the same ``key``; the cache is (re)written on a miss."""
    if path is not None and path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            return int(cached["chars"])
    chars = count()
    if path is not None:
        atomic_write_text(path, json.dumps({"key": key, "chars": chars}, indent=2) + "\n")
    return chars
