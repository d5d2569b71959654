"""Conversations for supervised fine-tuning: JSONL records read, checked, and encoded with a chat template.

Records, one JSON object a line (TRL's field names):

``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``
    A conversation: an optional system turn first, then user and assistant turns, any number of them.
``{"prompt": ..., "completion": ...}``
    A prompt and its completion: each a string (a user turn, an assistant turn) or a list of messages
    (the prompt's turns, then the completion's, which must include an assistant turn).

Preference pairs (``preference=True``), also in TRL's names: ``{"prompt": ..., "chosen": ...,
"rejected": ...}``, the prompt a string (a user turn) or a list of messages (``messages`` may give it
instead), each answer a string (an assistant turn) or a list of messages. Each pair becomes two
conversations, the prompt with the chosen answer and the prompt with the rejected one, written as two
consecutive documents (chosen first) of the same split; a pair whose answers are the same is refused.

A record of the other kind (a preference record among conversations, or a conversation among pairs) is
refused, as is a record of neither form, naming the file and line.

Each conversation is encoded by :meth:`hataori.tokenizer.chat.ChatTemplate.encode` (ids and the mask of
the tokens the loss counts: every assistant turn's, as the template marks them) and gets the
tokenizer's EOS at its end, outside the mask, so that a prepared conversation is a shard document like
any other (:mod:`hataori.data.shards`, format version 2). A conversation longer than ``max_tokens``
(EOS included) is handled by the ``overlong`` rule: ``drop`` (skipped and counted), ``truncate`` (its
first ``max_tokens - 1`` ids kept, then EOS; dropped if no loss token is left) or ``refuse`` (an error
naming the record). One whose mask is empty is dropped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hataori.corpus.sources import ReadStats, iter_lines
from hataori.errors import HataoriError
from hataori.tokenizer.chat import ChatError, ChatTemplate, check_messages
from hataori.tokenizer.model import Tokenizer

OVERLONG_RULES = ("drop", "truncate", "refuse")
EXAMPLES_KEPT = 5
"""Records named in the report for each kind of drop."""


def to_messages(record: Any, where: str) -> list[dict]:
    """The conversation of one record (module docstring), checked; ``where`` (file:line) names it in errors."""
    if not isinstance(record, dict):
        raise ChatError(f"{where}: expected a JSON object with messages, or prompt and completion; got "
                        f"{type(record).__name__}")
    if "chosen" in record or "rejected" in record:
        raise ChatError(f"{where}: a preference record (chosen/rejected); supervised fine-tuning reads messages, or "
                        "prompt and completion")
    if "messages" in record:
        return check_messages(record["messages"], where)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        turns = []
        for name, value, role in (("prompt", prompt, "user"), ("completion", completion, "assistant")):
            if isinstance(value, str):
                turns.append({"role": role, "content": value})
            elif isinstance(value, list):
                turns.extend(value)
            else:
                raise ChatError(f"{where}: {name} is {type(value).__name__}; give a string or a list of messages")
        messages = check_messages(turns, where)
        if not (isinstance(completion, str) or any(m["role"] == "assistant" for m in completion)):
            raise ChatError(f"{where}: the completion has no assistant turn, so nothing to learn from")
        return messages
    fields = ", ".join(repr(k) for k in list(record)[:8]) or "none"
    raise ChatError(f"{where}: neither messages nor prompt and completion (fields: {fields})")


def to_pair(record: Any, where: str) -> list[list[dict]]:
    """The chosen and the rejected conversation of one preference record (module docstring), checked."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        fields = ", ".join(repr(k) for k in list(record)[:8]) if isinstance(record, dict) else type(record).__name__
        raise ChatError(f"{where}: a preference record needs prompt (or messages), chosen and rejected "
                        f"(fields: {fields or 'none'})")
    prompt = record.get("prompt", record.get("messages"))
    if prompt is None:
        raise ChatError(f"{where}: no prompt (or messages) before chosen and rejected")
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(turns, list):
        raise ChatError(f"{where}: prompt is {type(prompt).__name__}; give a string or a list of messages")
    pair = []
    for name in ("chosen", "rejected"):
        answer = record[name]
        if isinstance(answer, str):
            answer = [{"role": "assistant", "content": answer}]
        elif not isinstance(answer, list):
            raise ChatError(f"{where}: {name} is {type(answer).__name__}; give a string or a list of messages")
        pair.append(check_messages([*turns, *answer], f"{where} ({name})"))
    if pair[0] == pair[1]:
        raise ChatError(f"{where}: chosen and rejected are the same, so the pair prefers nothing; fix or drop it")
    return pair


def iter_conversations(path: Path, skip_bad: bool = False, stats: ReadStats | None = None,
                       preference: bool = False) -> Iterator[tuple[str, Any]]:
    """``(file:line, messages)`` of every record of a JSONL file, or with ``preference`` ``(file:line, [chosen
    messages, rejected messages])``; a malformed record is an error naming its line, or with ``skip_bad``
    counted in ``stats`` and skipped."""
    stats = stats if stats is not None else ReadStats()
    for number, line in iter_lines(path, skip_bad, stats):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ChatError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            if preference:
                value = to_pair(record, where)
            else:
                value = to_messages(record, where)
        except ChatError as err:
            if skip_bad:
                stats.skip(str(err))
                continue
            raise
        stats.documents += 1
        stats.chars += sum(len(m["content"]) for m in (value[0] + value[1] if preference else value))
        yield where, value


KEPT, TRUNCATED, DROPPED_OVERLONG, DROPPED_NO_LOSS = range(4)
"""What happened to each conversation of a batch (:class:`ConversationEncoder`)."""


@dataclass(slots=True)
class EncodeCounts:
    """What encoding conversations did, for the dataset's report."""

    examples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_loss: int = 0
    longest: int = 0
    dropped_examples: list[str] = field(default_factory=list)

    def add(self, status: np.ndarray, lengths: np.ndarray, loss: np.ndarray, notes: list[str]) -> None:
        """Count conversations by their ``status``; ``lengths`` and ``loss`` (tokens) of the kept ones."""
        self.examples += int(np.count_nonzero(status <= TRUNCATED))
        self.tokens += int(lengths.sum())
        self.loss_tokens += int(loss.sum())
        self.truncated += int(np.count_nonzero(status == TRUNCATED))
        self.dropped_overlong += int(np.count_nonzero(status == DROPPED_OVERLONG))
        self.dropped_no_loss += int(np.count_nonzero(status == DROPPED_NO_LOSS))
        self.longest = max(self.longest, int(lengths.max(initial=0)))
        self.dropped_examples.extend(notes[:EXAMPLES_KEPT - len(self.dropped_examples)])

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class EncodedConversations:
    """A batch encoded: the kept conversations' ids back to back (EOS after each), their lengths and loss
    masks; per conversation of the batch its status, and its loss tokens (0 if dropped); a note on each drop."""

    tokens: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray
    status: np.ndarray
    loss: np.ndarray
    notes: dict[int, str]
    per_input: int = 1
    """Documents each kept input gives: 1, or 2 for a preference pair (chosen, rejected)."""

    @property
    def kept(self) -> np.ndarray:
        return self.status <= TRUNCATED


class ConversationEncoder:
    """Conversations (:func:`payload` strings) to :class:`EncodedConversations`, by the module's rules."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, max_tokens: int, overlong: str,
                 preference: bool = False):
        if overlong not in OVERLONG_RULES:
            raise HataoriError(f"overlong: {overlong!r} is not one of {', '.join(OVERLONG_RULES)}")
        self.tokenizer, self.template, self.max_tokens, self.overlong = tokenizer, template, max_tokens, overlong
        self.preference = preference

    def __call__(self, payloads: list[str], dtype: np.dtype) -> EncodedConversations:
        ids, masks, lengths = [], [], []
        status = np.full(len(payloads), KEPT, dtype=np.int8)
        loss = np.zeros(len(payloads), dtype=np.int64)
        notes = {}
        for i, text in enumerate(payloads):
            where, value = json.loads(text)
            examples = [self._example(m, f"{where} ({name})") for m, name in zip(value, ("chosen", "rejected"))] \
                if self.preference else [self._example(value, where)]
            longest = max(len(example) for example, _ in examples)
            if longest > self.max_tokens:
                if self.overlong == "refuse":
                    raise ChatError(f"{where}: {longest} tokens with its EOS, more than max_tokens="
                                    f"{self.max_tokens}; raise max_tokens (the training seq_len + 1) or choose "
                                    "overlong=drop or overlong=truncate")
                if self.overlong == "drop":
                    status[i], notes[i] = DROPPED_OVERLONG, f"{where}: {longest} tokens (dropped)"
                    continue
                examples = [(e[:self.max_tokens - 1] + [e[-1]], m[:self.max_tokens - 1] + [False]) if len(e) >
                            self.max_tokens else (e, m) for e, m in examples]
                status[i] = TRUNCATED
            if not all(any(mask) for _, mask in examples):
                status[i], notes[i] = DROPPED_NO_LOSS, f"{where}: no loss token (dropped)"
                continue
            for example, mask in examples:
                ids.extend(example)
                masks.extend(mask)
                lengths.append(len(example))
                loss[i] += sum(mask)
        return EncodedConversations(np.asarray(ids, dtype=dtype), np.asarray(lengths, dtype=np.int64),
                                    np.asarray(masks, dtype=np.uint8), status, loss, notes,
                                    per_input=2 if self.preference else 1)

    def _example(self, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
        """A conversation's ids and mask, EOS appended outside the mask."""
        encoded = self.template.encode(messages, self.tokenizer, where=where)
        return encoded.ids + [self.tokenizer.eos_id], encoded.mask + [False]


def payload(where: str, messages: list[dict]) -> str:
    """One conversation as the encoder takes it (a string, so it batches and crosses processes as text does)."""
    return json.dumps([where, messages], ensure_ascii=False)


def split_text(value: Any) -> str:
    """The text a conversation's (or a pair's) split is decided by: its messages, not where it was read."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def dataset_template(datasets: list) -> ChatTemplate:
    """The chat template conversation datasets were prepared with (recorded in their manifests); datasets
    prepared with different templates are refused, naming two."""
    found = {}
    for data in datasets:
        recorded = data.manifest["chat"]["template"]
        found.setdefault(recorded["sha256"], (data.path, recorded["source"]))
    if len(found) > 1:
        (a, _), (b, _) = list(found.values())[:2]
        raise HataoriError(f"{a} and {b} were prepared with different chat templates; a run trains with one, "
                           "so prepare them with the same --chat-template")
    path, source = next(iter(found.values()))
    return ChatTemplate(source, Path(path) / "dataset.json")


def check_template(path: str | Path, tokenizer: Tokenizer) -> ChatTemplate:
    """The chat template at ``path``, checked against the tokenizer (its special pieces)."""
    template = ChatTemplate.load(path)
    template.check_tokenizer(tokenizer)
    return template
