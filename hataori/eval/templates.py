"""Prompt templates: how a task's examples become the text a model continues with each choice.

A template is a YAML file in ``configs/eval/`` named after it (``jcommonsenseqa-v1.yaml``), loaded
through :func:`hataori.config.load` like every preset (``base:`` to derive one from another, unknown
keys are errors). ``--template`` takes its name, or the path of a YAML file anywhere.

A prompt of ``k`` shots is::

    description + shot_1 + shot_separator + ... + shot_k + shot_separator + prompt(example)

where a shot is ``prompt(shot) + answer(its correct choice)``; each choice ``answer(choice)`` is
then scored after the prompt. ``prompt`` formats the example's fields (``{question}``); ``answer``
formats ``{answer}``, the choice's text (renamed by ``answers``, e.g. JNLI's ``entailment`` as 含意).
Write a literal brace as ``{{`` or ``}}``.

A generation task's template (``jsquad-v1.yaml``) writes the prompt the same way, each shot with its gold
answer (the first of JSQuAD's); the model then generates up to ``max_new_tokens`` tokens greedily, and the
answer is the text before the first of the ``stop`` strings (:mod:`hataori.eval.generation`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

from hataori.config import load, require
from hataori.errors import ConfigError
from hataori.eval.tasks import TASKS, Example, Task

TEMPLATES = Path(__file__).resolve().parents[2] / "configs" / "eval"
"""configs/eval/ of the checkout hataori runs from (templates are configs, like the other presets)."""


@dataclass(kw_only=True, slots=True)
class TemplateConfig:
    """A prompt template of one task (see the module docstring)."""

    task: str
    """The task whose examples the template formats."""
    description: str = ""
    """Text before the first shot (an instruction); empty for none."""
    prompt: str
    """One example's context, with ``{field}`` placeholders of the task's fields; the answer follows it."""
    answer: str = "{answer}"
    """How a choice is written after the prompt; ``{answer}`` is the choice's text."""
    answers: dict[str, str] = field(default_factory=dict)
    """The text of a task's fixed choices where it is not their name (JNLI: entailment: 含意 ...)."""
    shot_separator: str = "\n\n"
    """Between one shot and the next, and before the example."""
    max_new_tokens: int = 32
    """Generation tasks: the most tokens an answer may take."""
    stop: list[str] = field(default_factory=lambda: ["\n"])
    """Generation tasks: the answer ends before the first of these strings (and at EOS)."""

    def __post_init__(self) -> None:
        require(self.task in TASKS and TASKS[self.task].kind in ("choice", "generate"), "task",
                f"{self.task!r} is not a task with prompts; one of "
                f"{', '.join(t.name for t in TASKS.values() if t.kind in ('choice', 'generate'))}")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(all(isinstance(x, str) and x for x in self.stop), "stop", "must be a list of non-empty strings")
        task = TASKS[self.task]
        _check_placeholders("prompt", self.prompt, task.fields)
        _check_placeholders("answer", self.answer, ("answer",))
        unknown = sorted(set(self.answers) - set(task.labels))
        require(not unknown, "answers", f"{', '.join(unknown)} not among the task's choices "
                f"({', '.join(task.labels) or f'{task.name} examples have choices of their own'})")


def _check_placeholders(key: str, text: str, allowed: tuple[str, ...]) -> None:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as err:
        raise ConfigError(key, f"{text!r} is not a format string ({err}); "
                               "write a literal brace as {{ or }}") from None
    for name in names:
        require(name in allowed, key, f"placeholder {{{name}}} is not one of "
                f"{', '.join('{' + a + '}' for a in allowed)}")


@dataclass(frozen=True, slots=True)
class Template:
    """A loaded template: its name, the file it came from and its config."""

    name: str
    path: Path
    cfg: TemplateConfig

    def context(self, example: Example) -> str:
        """The example's prompt, without shots."""
        return self.cfg.prompt.format(**example.fields)

    def choice(self, example: Example, index: int) -> str:
        """The text scored for choice ``index`` after the prompt."""
        raw = example.choices[index]
        return self.cfg.answer.format(answer=self.cfg.answers.get(raw, raw))

    def golds(self, example: Example) -> list[str]:
        """A generation task's gold answers: JSQuAD's own, or the right choice as the template names it
        (without the ``answer`` format's surrounding text)."""
        if example.answers:
            return list(example.answers)
        raw = example.choices[example.label]
        return [self.cfg.answers.get(raw, raw)]

    def solved(self, example: Example) -> str:
        """A shot's answer as it follows its prompt: the first gold answer, in the ``answer`` format."""
        if example.answers:
            return self.cfg.answer.format(answer=example.answers[0])
        return self.choice(example, example.label)

    def prompt(self, example: Example, shots: list[Example]) -> str:
        """The full context of ``example`` after ``shots``, each with its correct answer."""
        parts = [self.context(shot) + self.solved(shot) for shot in shots]
        return self.cfg.description + "".join(part + self.cfg.shot_separator for part in parts) + self.context(example)


def known_templates(task: Task) -> list[str]:
    """Names of the templates in configs/eval/ that format ``task``'s examples."""
    found = []
    for path in sorted(TEMPLATES.glob("*.yaml")) if TEMPLATES.is_dir() else []:
        try:
            if load(TemplateConfig, [path]).task == task.name:
                found.append(path.stem)
        except ConfigError:
            continue  # a broken template is reported when it is asked for
    return found


def load_template(name: str | None, task: Task) -> Template:
    """The template ``name`` (configs/eval/<name>.yaml, or a YAML file's path) of ``task``; None: the task's default."""
    name = name or task.template
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError("--template", f"{path}: no such template file")
        name = path.stem
    else:
        path = TEMPLATES / f"{name}.yaml"
        if not path.is_file():
            known = known_templates(task)
            where = f"templates for {task.name}: {', '.join(known)}" if known else (
                f"no template folder {TEMPLATES} here (an installed wheel has none); pass --template FILE.yaml")
            raise ConfigError("--template", f"unknown template {name!r}; {where}")
    try:
        cfg = load(TemplateConfig, [path])
    except ConfigError as err:
        message = err.message if str(path) in err.message else f"{path}: {err.message}"
        raise ConfigError(err.key, message) from None
    if cfg.task != task.name:
        raise ConfigError("--template", f"{path} formats {cfg.task} examples, not {task.name}")
    return Template(name=name, path=path, cfg=cfg)
