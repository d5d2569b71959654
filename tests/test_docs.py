"""The README and docs/ stay true: every `hataori ...` command they show names a real command with options
its parser has (and parses where it is complete), every script and module they run exists, every link
between them finds its page, and every test they cite exists."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from hataori.cli import COMMANDS, command_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")


def shell_lines(text: str) -> list[str]:
    """The command lines of a page: each fenced block's lines (continuations joined, comments and
    ``$ `` prompts dropped) and each inline code span that starts with ``hataori ``."""
    found = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip().removeprefix("$ ")
            if line and not line.startswith("#"):
                found.append(line)
    found += [span for span in INLINE.findall(text) if span.startswith("hataori ")]
    return found


def hataori_commands(page: Path) -> list[list[str]]:
    commands = []
    for line in shell_lines(page.read_text(encoding="utf-8")):
        for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
            words = part.split()
            if words[:1] == ["time"]:
                words = words[1:]
            if words[:1] == ["hataori"] and len(words) > 1:
                try:
                    commands.append(shlex.split(" ".join(words))[1:])
                except ValueError:  # an unbalanced quote: a fragment of prose
                    continue
    return commands


def command_of(argv: list[str]) -> tuple[tuple[str, str | None], list[str]] | None:
    if (argv[0], None) in COMMANDS:
        return (argv[0], None), argv[1:]
    if tuple(argv[:2]) in COMMANDS:
        return (argv[0], argv[1]), argv[2:]
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_is_real_with_real_options(page):
    commands = hataori_commands(page)
    bad = []
    for argv in commands:
        found = command_of(argv)
        if argv[0] in ("--help", "-h"):
            continue
        if found is None:
            if argv[0] not in {group for group, _ in COMMANDS}:
                bad.append(f"hataori {' '.join(argv)}: no such command")
            continue  # a group named alone, as prose does ("hataori tokenizer ...")
        key, rest = found
        parser, _ = command_parser(*key)
        options = parser._option_string_actions
        for word in rest:
            if word.startswith("--") and word.split("=", 1)[0] not in options and word != "--":
                bad.append(f"hataori {' '.join(argv)}: {key} has no option {word.split('=', 1)[0]}")
    assert bad == []


def module_exists(dotted: str) -> bool:
    """Whether ``hataori.x.y[.name]`` is a module of the repository, or a name one of them defines."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        path = REPO / Path(*parts[:end])
        if path.with_suffix(".py").is_file():
            source = path.with_suffix(".py")
        elif (path / "__init__.py").is_file():
            source = path / "__init__.py"
        else:
            continue
        rest = parts[end:]
        return not rest or rest[0] in defined_names(source)
    return False


def defined_names(source: Path) -> set[str]:
    """The names a module defines or imports at its top level."""
    names = set()
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_script_module_and_link_exists(page):
    text = page.read_text(encoding="utf-8")
    missing = []
    for line in shell_lines(text):
        for match in re.finditer(r"(?:bash|python)\s+((?:scripts|benchmarks)/[\w/.-]+)", line):
            if not (REPO / match[1]).is_file():
                missing.append(match[1])
        for match in re.finditer(r"python\s+-m\s+(hataori[\w.]*)", line):
            if not any((REPO / (match[1].replace(".", "/") + suffix)).exists() for suffix in (".py", "/__init__.py")):
                missing.append(match[1])
    for path in re.findall(r"(?<![\w/])hataori/[\w/]+\.py", text):
        if not (REPO / path).is_file():
            missing.append(path)
    for module in re.findall(r"(?<![\w./])hataori(?:\.\w+)+", text):
        if not module_exists(module):
            missing.append(module)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
            missing.append(target)
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_test_cited_exists(page):
    missing = []
    for line in page.read_text(encoding="utf-8").splitlines():
        current = None
        for match in re.finditer(r"`(tests/[\w/]+\.py)?(::\w+)?", line):
            path, name = match[1], match[2]
            if path:
                current = path
                if not (REPO / path).is_file():
                    missing.append(path)
                    current = None
            if name and current:
                tree = ast.parse((REPO / current).read_text(encoding="utf-8"))
                if name[2:] not in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}:
                    missing.append(current + name)
    assert missing == []


def test_the_pages_are_found():
    """The README is a front door (under 12k characters) and every page under docs/ is linked from it."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme) < 12_000
    assert [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme] == []
    assert sum(len(hataori_commands(p)) for p in PAGES) > 50  # the parser above finds what the pages show
