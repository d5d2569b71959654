"""Validation: loss and bits per character over whole documents of the validation split.

Documents
    The first documents of each dataset's ``val`` split, dataset by dataset in the config's order,
    up to ``validation.max_docs`` documents and ``validation.max_tokens`` tokens (a document is
    taken whole or not at all). The selection is the same at every validation of a run.

What is scored
    Each document is scored as training sees it: its tokens and its EOS are the targets, each
    predicted from the tokens before it, the first from the EOS that precedes every document (its
    BOS). A document of ``n`` tokens (EOS included) is cut into windows of ``seq_len`` targets;
    each window is its own context (positions restart at 0), so a document longer than
    ``seq_len`` is scored with the context restarting every ``seq_len`` tokens. Windows are packed
    into rows of ``seq_len`` with document masking, so a window sees nothing outside itself, and
    padding is not scored.

Numbers
    ``loss`` is the mean negative log-likelihood in nats per target token. ``bpc`` (bits per
    character) is the summed NLL in nats, divided by ln 2 and by the number of characters of the
    documents: the length of each document's text as the tokenizer decodes it (EOS excluded; the
    tokenizer's normalisation applies). Bits per character do not depend on the tokenizer, so runs
    with different vocabularies compare. The character count is computed once per run and cached
    in ``<run_dir>/validation.json``.

Processes
    The rows are dealt out to the ranks (row ``i`` to rank ``i % world_size``), padded with unscored
    rows so every rank runs the same number of forward passes (ZeRO-3 gathers parameters in each),
    and the sums are all-reduced.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hataori.errors import ConfigError
from hataori.fsutil import atomic_write_text
from hataori.model import IGNORE_INDEX
from hataori.tokenizer.model import Tokenizer
from hataori.tokenizer.shards import Dataset
from hataori.train.config import ValidationConfig

CACHE_FILE = "validation.json"


@dataclass(frozen=True, slots=True)
class ValResult:
    """One validation pass, the same on every rank."""

    loss: float
    """Mean NLL per target token, in nats."""
    bpc: float
    """Summed NLL in bits per character of the documents' text."""
    nll: float
    """Summed NLL in nats."""
    tokens: int
    """Target tokens scored (EOS included)."""
    chars: int
    """Characters of the documents' decoded text."""
    documents: int
    seconds: float


def select_documents(datasets: list[Dataset], *, max_docs: int = 0, max_tokens: int = 0) -> list[np.ndarray]:
    """The validation documents (token ids, EOS last): the first of each dataset in order, within the limits."""
    docs: list[np.ndarray] = []
    tokens = 0
    for data in datasets:
        for i in range(len(data)):
            doc = np.asarray(data.doc(i), dtype=np.int64)
            if (max_docs and len(docs) == max_docs) or (max_tokens and tokens + len(doc) > max_tokens):
                return docs
            docs.append(doc)
            tokens += len(doc)
    return docs


def document_windows(doc: np.ndarray, eos_id: int, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) of each window of one document: inputs start with EOS, targets end with it."""
    inputs = np.concatenate([[eos_id], doc[:-1]])
    return [(inputs[i:i + seq_len], doc[i:i + seq_len]) for i in range(0, len(doc), seq_len)]


def pack_rows(docs: list[np.ndarray], eos_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, targets and doc_ids, each (rows, seq_len), of every window packed in order into rows.

    A window goes into the current row if it fits, else starts a new one. Every window, and the
    padding at the end of a row, has its own doc id; padding targets are IGNORE_INDEX.
    """
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    used = 0
    for doc in docs:
        for window in document_windows(doc, eos_id, seq_len):
            if used + len(window[0]) > seq_len:
                rows.append([])
                used = 0
            rows[-1].append(window)
            used += len(window[0])
    rows = [row for row in rows if row]
    inputs = np.full((len(rows), seq_len), eos_id, dtype=np.int64)
    targets = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.zeros((len(rows), seq_len), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for w, (x, y) in enumerate(row):
            inputs[r, at:at + len(x)], targets[r, at:at + len(y)], doc_ids[r, at:at + len(x)] = x, y, w
            at += len(x)
        doc_ids[r, at:] = len(row)  # padding: a segment of its own
    return inputs, targets, doc_ids


class Validator:
    """Scores a model on the selected validation documents; build it with :meth:`build`."""

    def __init__(self, cfg: ValidationConfig, docs: list[np.ndarray], *, chars: int, eos_id: int, seq_len: int,
                 rank: int = 0, world_size: int = 1):
        if not docs:
            raise ValueError("no validation documents selected")
        self.cfg = cfg
        self.documents, self.chars = len(docs), chars
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
        docs = select_documents(datasets, max_docs=cfg.max_docs, max_tokens=cfg.max_tokens)
        if not docs:
            if not any(len(d) for d in datasets):
                raise ConfigError("data.datasets", f"the validation splits of {', '.join(dataset_paths)} hold no "
                                  "documents; prepare the data with val_docs=N or val_fraction > 0")
            first = next(len(d.doc(0)) for d in datasets if len(d))
            raise ConfigError("validation.max_tokens", f"{cfg.max_tokens} is smaller than the first validation "
                              f"document ({first} tokens); raise it, or set 0 for no limit")
        key = {"datasets": [d.fingerprint for d in datasets], "tokenizer": tokenizer.fingerprint,
               "documents": len(docs), "tokens": sum(len(d) for d in docs)}
        shared = dist.is_initialized() and world_size > 1
        found = [None]
        if rank == 0:
            found[0] = cached_chars(Path(run_dir) / CACHE_FILE if run_dir else None, key,
                                    lambda: count_chars(docs, tokenizer))
        elif not shared:
            found[0] = count_chars(docs, tokenizer)
        if shared:
            dist.broadcast_object_list(found, src=0)
        return cls(cfg, docs, chars=found[0], eos_id=datasets[0].eos_id, seq_len=seq_len, rank=rank,
                   world_size=world_size)

    @torch.no_grad()
    def evaluate(self, model: Callable[..., torch.Tensor], device: torch.device | str = "cpu") -> ValResult:
        """Score ``model`` (``model(input_ids, doc_ids=...) -> logits``, a module or a DeepSpeed engine)."""
        began = time.perf_counter()
        training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        nll = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, len(self.inputs), self.cfg.batch_size):
            rows = slice(i, i + self.cfg.batch_size)
            inputs, doc_ids, targets = (torch.from_numpy(a[rows]).to(device)
                                        for a in (self.inputs, self.doc_ids, self.targets))
            logits = model(inputs, doc_ids=doc_ids)  # (B, T, V)
            for row_logits, row_targets in zip(logits, targets):  # fp32 one row at a time
                nll += F.cross_entropy(row_logits.float(), row_targets, ignore_index=IGNORE_INDEX,
                                       reduction="sum").double()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(nll)
        if training and hasattr(model, "train"):
            model.train()
        total = nll.item()
        return ValResult(loss=total / self.tokens, bpc=total / math.log(2) / self.chars, nll=total,
                         tokens=self.tokens, chars=self.chars, documents=self.documents,
                         seconds=time.perf_counter() - began)


def count_chars(docs: list[np.ndarray], tokenizer: Tokenizer) -> int:
    """Characters of the documents' decoded text (EOS excluded)."""
    return sum(len(tokenizer.decode(doc[:-1].tolist())) for doc in docs)


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
