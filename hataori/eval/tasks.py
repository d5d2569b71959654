"""The tasks ``hataori eval`` knows: what an example of each is and how its file is read.

Multiple-choice tasks (JGLUE v1.3, one JSON object a line; the files are bundled in ``hataori/corpus/jglue/``)::

    jcommonsenseqa   question, choice0..choice4, label 0-4   (valid: 1,119; train for shots: 8,939)
    jnli             sentence1, sentence2, label             (valid: 2,434; no train file bundled)
                     label: entailment / contradiction / neutral, the three choices in that order

``bpc`` scores the documents of any JSONL (``text`` field) or plain-text corpus file (``--data``)
in bits per character, as pretraining validation does (:mod:`hataori.eval.bpc`).

A malformed task file is an :class:`~hataori.errors.InputError` naming the file and line: bad JSON,
a missing or non-string field, a label out of range.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hataori.corpus.jglue_files import JGLUE_DIR
from hataori.corpus.sources import iter_lines
from hataori.errors import ConfigError, InputError

JGLUE = JGLUE_DIR


@dataclass(frozen=True, slots=True)
class Example:
    """One multiple-choice example: the fields a template formats, the raw choices and the answer."""

    fields: dict[str, str]
    choices: tuple[str, ...]
    """The choices as the task names them (JNLI: the label names); a template may rename them."""
    label: int
    """Index of the correct choice."""
    line: int
    """Line of the task file the example is on."""


@dataclass(frozen=True, slots=True)
class Task:
    """A task: its kind, files, the fields its examples have and how a record becomes an Example."""

    name: str
    kind: str
    """``choice`` (multiple choice, scored by log-likelihood) or ``bpc`` (bits per character of a corpus)."""
    description: str
    fields: tuple[str, ...] = ()
    """The string fields of a record, all required; a template formats them."""
    data: Path | None = None
    """The bundled evaluation file (``--data`` replaces it)."""
    train: Path | None = None
    """The bundled file few-shot examples are drawn from."""
    labels: tuple[str, ...] = ()
    """The choices every example shares (JNLI's label names); empty where each example has its own."""
    template: str = ""
    """The default template's name (configs/eval/<name>.yaml)."""
    example: Callable[[dict[str, Any], int], Example] | None = None
    """The Example of a record whose fields were checked, and its line; raises ValueError for a bad label."""


def _jcommonsenseqa(record: dict[str, Any], line: int) -> Example:
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 4:
        raise ValueError(f"label is {label!r}; JCommonsenseQA labels are the integers 0-4")
    return Example(fields={key: record[key] for key in JCOMMONSENSEQA_FIELDS},
                   choices=tuple(record[f"choice{i}"] for i in range(5)), label=label, line=line)


JNLI_LABELS = ("entailment", "contradiction", "neutral")


def _jnli(record: dict[str, Any], line: int) -> Example:
    label = record["label"]
    if label not in JNLI_LABELS:
        raise ValueError(f"label is {label!r}; JNLI labels are {', '.join(JNLI_LABELS)}")
    return Example(fields={key: record[key] for key in JNLI_FIELDS}, choices=JNLI_LABELS,
                   label=JNLI_LABELS.index(label), line=line)


JCOMMONSENSEQA_FIELDS = ("question", "choice0", "choice1", "choice2", "choice3", "choice4")
JNLI_FIELDS = ("sentence1", "sentence2")

TASKS: dict[str, Task] = {
    "jcommonsenseqa": Task(name="jcommonsenseqa", kind="choice", fields=JCOMMONSENSEQA_FIELDS,
                           description="JGLUE JCommonsenseQA v1.3: a question and five choices",
                           data=JGLUE / "jcommonsenseqa-valid.json", train=JGLUE / "jcommonsenseqa-train.json",
                           template="jcommonsenseqa-v1", example=_jcommonsenseqa),
    "jnli": Task(name="jnli", kind="choice", fields=JNLI_FIELDS,
                 description="JGLUE JNLI v1.3: entailment, contradiction or neutral between two sentences",
                 data=JGLUE / "jnli-valid.json", labels=JNLI_LABELS, template="jnli-v1", example=_jnli),
    "bpc": Task(name="bpc", kind="bpc", description="bits per character of a JSONL or text corpus file (--data)"),
}


def get_task(name: str) -> Task:
    """The task called ``name``; an error listing the known ones otherwise."""
    if name not in TASKS:
        known = ", ".join(f"{task.name} ({task.description})" for task in TASKS.values())
        raise ConfigError("--task", f"unknown task {name!r}; known tasks: {known}")
    return TASKS[name]


def read_examples(task: Task, path: str | Path) -> list[Example]:
    """The examples of a task file (one JSON object a line, blank lines skipped)."""
    path = Path(path)
    examples = []
    for number, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(path, f"malformed JSON ({err.msg} at column {err.colno})", line=number) from None
        if not isinstance(record, dict):
            raise InputError(path, f"expected a JSON object, got {type(record).__name__}", line=number)
        for key in (*task.fields, "label"):
            if key not in record:
                raise InputError(path, f"no {key!r} field; a {task.name} example has {', '.join(task.fields)} and "
                                 "label", line=number)
            if key != "label" and not isinstance(record[key], str):
                raise InputError(path, f"field {key!r} is {type(record[key]).__name__}, not a string", line=number)
        try:
            examples.append(task.example(record, number))
        except ValueError as err:
            raise InputError(path, str(err), line=number) from None
    if not examples:
        raise InputError(path, f"holds no {task.name} examples")
    return examples
