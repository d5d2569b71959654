"""Loss and bits per character of whole documents: the scoring core of pretraining validation
(:mod:`hataori.train.validate` selects the documents and sums over ranks) and of the ``bpc`` task.

What is scored
    Each document is scored as training sees it: its tokens and its EOS are the targets, each
    predicted from the tokens before it, the first from the EOS that precedes every document (its
    BOS). A document of ``n`` tokens (EOS included) is cut into windows of ``seq_len`` targets;
    each window is its own context (positions restart at 0), so a document longer than
    ``seq_len`` is scored with the context restarting every ``seq_len`` tokens. Windows are packed
    into rows of ``seq_len`` with document masking, so a window sees nothing outside itself, and
    padding is not scored. A model without document masking gets one window a row instead.

Numbers
    ``loss`` is the mean negative log-likelihood in nats per target token. ``bpc`` (bits per
    character) is the summed NLL in nats, divided by ln 2 and by the number of characters of the
    documents: the length of each document's text as the tokenizer decodes it (EOS excluded; the
    tokenizer's normalisation applies). Bits per character do not depend on the tokenizer, so
    models with different vocabularies compare.

The ``bpc`` task reads the documents of a JSONL (``text`` field) or plain-text file (a document a
paragraph) with :mod:`hataori.corpus.sources`, as corpus preparation reads them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from hataori.corpus.sources import SourceConfig, iter_documents
from hataori.errors import InputError
from hataori.model import IGNORE_INDEX
from hataori.tokenizer.model import Tokenizer


def document_windows(doc: np.ndarray, eos_id: int, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) of each window of one document: inputs start with EOS, targets end with it."""
    inputs = np.concatenate([[eos_id], doc[:-1]])
    return [(inputs[i:i + seq_len], doc[i:i + seq_len]) for i in range(0, len(doc), seq_len)]


def pack_rows(docs: list[np.ndarray], eos_id: int, seq_len: int,
              packed: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, targets and doc_ids, each (rows, seq_len), of every window packed in order into rows.

    A window goes into the current row if it fits (and ``packed``), else starts a new one. Every
    window, and the padding at the end of a row, has its own doc id; padding targets are IGNORE_INDEX.
    """
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    used = 0
    for doc in docs:
        for window in document_windows(doc, eos_id, seq_len):
            if not packed or used + len(window[0]) > seq_len:
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


@torch.no_grad()
def summed_nll(model: Callable[..., torch.Tensor], inputs: np.ndarray, targets: np.ndarray, doc_ids: np.ndarray, *,
               batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The summed NLL in nats (a float64 scalar on ``device``) of the targets of packed rows, ``batch_size``
    rows a forward pass (``model(input_ids, doc_ids=...) -> logits``, a module or a DeepSpeed engine)."""
    nll = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(inputs), batch_size):
        rows = slice(i, i + batch_size)
        batch_inputs, batch_doc_ids, batch_targets = (torch.from_numpy(a[rows]).to(device)
                                                      for a in (inputs, doc_ids, targets))
        logits = model(batch_inputs, doc_ids=batch_doc_ids)  # (B, T, V)
        for row_logits, row_targets in zip(logits, batch_targets):  # fp32 one row at a time
            nll += F.cross_entropy(row_logits.float(), row_targets, ignore_index=IGNORE_INDEX,
                                   reduction="sum").double()
    return nll


def count_chars(docs: list[np.ndarray], tokenizer: Tokenizer) -> int:
    """Characters of the documents' decoded text (EOS excluded)."""
    return sum(len(tokenizer.decode(doc[:-1].tolist())) for doc in docs)


@dataclass(frozen=True, slots=True)
class BpcResult:
    """The scores of a set of documents."""

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


def read_documents(path: str | Path, limit: int = 0) -> list[str]:
    """The first ``limit`` (0: all) non-empty documents of a JSONL or text corpus file."""
    path = Path(path)
    docs = []
    for doc in iter_documents(path, SourceConfig(path=str(path))):
        if limit and len(docs) == limit:
            break
        docs.append(doc)
    if not docs:
        raise InputError(path, "holds no documents")
    return docs


def score_documents(model: torch.nn.Module, tokenizer: Tokenizer, texts: list[str], *, batch_size: int = 8,
                    seq_len: int | None = None) -> BpcResult:
    """Loss and bits per character of ``texts``, each encoded and ended with EOS, in windows of ``seq_len``
    (default: the model's max_seq_len) on the model's device."""
    began = time.perf_counter()
    config = getattr(model, "config", None)
    seq_len = seq_len or config.max_seq_len
    device = next(model.parameters()).device
    docs = [np.asarray(ids + [tokenizer.eos_id], dtype=np.int64) for ids in tokenizer.encode(texts)]
    inputs, targets, doc_ids = pack_rows(docs, tokenizer.eos_id, seq_len,
                                         packed=bool(getattr(config, "doc_masking", False)))
    model.eval()
    nll = summed_nll(model, inputs, targets, doc_ids, batch_size=batch_size, device=device).item()
    tokens, chars = sum(len(doc) for doc in docs), count_chars(docs, tokenizer)
    return BpcResult(loss=nll / tokens, bpc=nll / math.log(2) / max(chars, 1), nll=nll, tokens=tokens, chars=chars,
                     documents=len(docs), seconds=time.perf_counter() - began)
