"""The tasks ``hataori eval`` knows: what an example of each is and how its file is read.

Multiple-choice tasks (JGLUE v1.3, one JSON object a line; the files are bundled in ``hataori/corpus/jglue/``)::

    jcommonsenseqa   question, choice0..choice4, label 0-4   (valid: 1,119; train for shots: 8,939)
    jnli             sentence1, sentence2, label             (valid: 2,434; no train file bundled)
                     label: entailment / contradiction / neutral, the three choices in that order

Generation tasks (an answer generated greedily after the prompt and scored by exact match and character
F1 against the gold answers, :mod:`hataori.eval.generation` and :mod:`hataori.eval.answers`)::

    jsquad              JGLUE JSQuAD v1.3 (SQuAD's JSON: title, paragraphs with context and qas); the gold
                        answers are each question's answer texts          (valid: 4,442 questions)
    jcommonsenseqa-gen  JCommonsenseQA's file; the gold answer is the right choice's text
    jnli-gen            JNLI's file; the gold answer is the label as the template writes it (含意 ...)
    jsts                JGLUE JSTS v1.3: sentence1, sentence2, label (a similarity 0-5); the similarity is
                        generated and scored by Pearson's and Spearman's correlation  (valid: 1,457; train: 12,451)

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
    """Index of the correct choice (-1 for a task without choices)."""
    line: int
    """Line of the task file the example is on (JSQuAD: the question's ordinal in the file)."""
    answers: tuple[str, ...] = ()
    """A generation task's gold answers, where they are not a choice (JSQuAD)."""


@dataclass(frozen=True, slots=True)
class Task:
    """A task: its kind, files, the fields its examples have and how a record becomes an Example."""

    name: str
    kind: str
    """``choice`` (multiple choice, scored by log-likelihood), ``generate`` (an answer generated and compared
    with the gold ones) or ``bpc`` (bits per character of a corpus)."""
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
    read: Callable[[Path], list[Example]] | None = None
    """Reads a whole task file where it is not one record a line (JSQuAD's JSON)."""
    metric: str = "match"
    """A generation task's scores: ``match`` (exact match, character F1) or ``correlation`` (a number
    generated: Pearson's and Spearman's correlation with the gold values)."""


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


def _jsts(record: dict[str, Any], line: int) -> Example:
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 <= label <= 5:
        raise ValueError(f"label is {label!r}; JSTS labels are similarities from 0 to 5")
    return Example(fields={key: record[key] for key in JNLI_FIELDS}, choices=(), label=-1, line=line,
                   answers=(f"{float(label):g}",))


JCOMMONSENSEQA_FIELDS = ("question", "choice0", "choice1", "choice2", "choice3", "choice4")
JNLI_FIELDS = ("sentence1", "sentence2")
JSQUAD_FIELDS = ("title", "context", "question")


def _read_jsquad(path: Path) -> list[Example]:
    """Every answerable question of a SQuAD-format JSON file, its gold answers deduplicated in order."""
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"not a readable SQuAD-format JSON file ({err})") from None
    examples: list[Example] = []
    articles = tree.get("data") if isinstance(tree, dict) else None
    if not isinstance(articles, list):
        raise InputError(path, "expected a JSON object with a 'data' list of articles (SQuAD's format)")
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            where = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise InputError(path, f"{where}: no 'context' string")
            for q, qa in enumerate(paragraph.get("qas", [])):
                answers = [x.get("text") for x in qa.get("answers", [])] if isinstance(qa, dict) else None
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or not answers or \
                        not all(isinstance(x, str) for x in answers):
                    raise InputError(path, f"{where}.qas[{q}]: needs a 'question' string and 'answers' with 'text' "
                                     "strings")
                if qa.get("is_impossible"):
                    continue
                examples.append(Example(fields={"title": str(article.get("title", "")),
                                                "context": paragraph["context"], "question": qa["question"]},
                                        choices=(), label=-1, line=len(examples) + 1,
                                        answers=tuple(dict.fromkeys(answers))))
    if not examples:
        raise InputError(path, "holds no JSQuAD questions")
    return examples

TASKS: dict[str, Task] = {
    "jcommonsenseqa": Task(name="jcommonsenseqa", kind="choice", fields=JCOMMONSENSEQA_FIELDS,
                           description="JGLUE JCommonsenseQA v1.3: a question and five choices",
                           data=JGLUE / "jcommonsenseqa-valid.json", train=JGLUE / "jcommonsenseqa-train.json",
                           template="jcommonsenseqa-v1", example=_jcommonsenseqa),
    "jnli": Task(name="jnli", kind="choice", fields=JNLI_FIELDS,
                 description="JGLUE JNLI v1.3: entailment, contradiction or neutral between two sentences",
                 data=JGLUE / "jnli-valid.json", labels=JNLI_LABELS, template="jnli-v1", example=_jnli),
    "jsquad": Task(name="jsquad", kind="generate", fields=JSQUAD_FIELDS,
                   description="JGLUE JSQuAD v1.3: an answer taken from a passage, generated",
                   data=JGLUE / "jsquad-valid.json", template="jsquad-v1", read=_read_jsquad),
    "jcommonsenseqa-gen": Task(name="jcommonsenseqa-gen", kind="generate", fields=JCOMMONSENSEQA_FIELDS,
                               description="JCommonsenseQA with the right choice's text generated",
                               data=JGLUE / "jcommonsenseqa-valid.json", train=JGLUE / "jcommonsenseqa-train.json",
                               template="jcommonsenseqa-gen-v1", example=_jcommonsenseqa),
    "jnli-gen": Task(name="jnli-gen", kind="generate", fields=JNLI_FIELDS, labels=JNLI_LABELS,
                     description="JNLI with the label generated", data=JGLUE / "jnli-valid.json",
                     template="jnli-gen-v1", example=_jnli),
    "jsts": Task(name="jsts", kind="generate", fields=JNLI_FIELDS, metric="correlation",
                 description="JGLUE JSTS v1.3: the similarity 0-5 of two sentences, generated",
                 data=JGLUE / "jsts-valid.json", train=JGLUE / "jsts-train.json", template="jsts-v1", example=_jsts),
    "bpc": Task(name="bpc", kind="bpc", description="bits per character of a JSONL or text corpus file (--data)"),
}


def get_task(name: str) -> Task:
    """The task called ``name``; an error listing the known ones otherwise."""
    if name not in TASKS:
        known = ", ".join(f"{task.name} ({task.description})" for task in TASKS.values())
        raise ConfigError("--task", f"unknown task {name!r}; known tasks: {known}")
    return TASKS[name]


def read_examples(task: Task, path: str | Path) -> list[Example]:
    """The examples of a task file (one JSON object a line, blank lines skipped; JSQuAD: its JSON file)."""
    path = Path(path)
    if task.read is not None:
        return task.read(path)
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
