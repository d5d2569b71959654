"""``hataori corpus python-docs OUT``: English documentation text, from Python's own standard library.

Japanese work still needs non-Japanese text: a base tokenizer for vocabulary expansion is trained
on it (or was, for a Llama-family model), and an expanded tokenizer must not get worse on it.
Every machine that runs hataori has the docstrings of its Python's standard library: English
technical prose, about 1.8 M characters in Python 3.11, under the PSF license, with nothing to
download. One document a module file (its module, class and function docstrings joined by a
blank line, in source order); test suites and files with under 200 characters of docstrings are
left out. Writes, atomically:

- ``OUT/corpus.jsonl``: one ``{"text", "source", "path"}`` object a module file, sorted by path;
- ``OUT/manifest.json``: Python version, license, counts, SHA-256 of the corpus.

A rerun with the same Python and an intact corpus returns at once ("up to date"); an ``OUT``
holding anything else is refused unless ``--replace``.
"""

from __future__ import annotations

import argparse
import ast
import platform
import sysconfig
import time
from pathlib import Path

from hataori.corpus.output import CORPUS_FILE, Counts, corpus_entry, current_manifest, write_document, write_manifest
from hataori.fsutil import atomic_path, remove_stale_temps
from hataori.outputs import Output, claim

MANIFEST_FORMAT = 1
MIN_CHARS = 200
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def module_files() -> list[Path]:
    """The standard library's ``.py`` files outside test suites and site-packages, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def docstrings(path: Path) -> str:
    """The docstrings of one module file joined by blank lines; empty when it does not parse."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    found = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, DOCUMENTED))
    return "\n\n".join(doc for doc in found if doc)


def build(out: Path, replace: bool = False) -> tuple[dict, bool]:
    """Build (or find up to date) the corpus in ``out``; returns (manifest, whether it was built). An
    ``out`` holding anything but an up-to-date corpus is refused unless ``replace``."""
    with claim(out, "corpus", option="OUT") as held:
        return _build(out, replace=replace, held=held)


def _build(out: Path, *, replace: bool, held: Output) -> tuple[dict, bool]:
    start = time.monotonic()
    remove_stale_temps(out)
    manifest = current_manifest(out, lambda manifest: (manifest["format"] == MANIFEST_FORMAT
                                                       and manifest["python"] == platform.python_version()))
    if manifest is not None:
        return manifest, False
    held.check_replace(replace)
    held.mark()
    root = Path(sysconfig.get_paths()["stdlib"])
    counts = Counts()
    with atomic_path(out / CORPUS_FILE) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for path in module_files():
            text = docstrings(path)
            if len(text) >= MIN_CHARS:
                write_document(f, text, "python-stdlib", str(path.relative_to(root)), counts)
    manifest = {
        "format": MANIFEST_FORMAT,
        "document_unit": "module file: its docstrings joined by a blank line",
        "python": platform.python_version(),
        "packages": [{"name": "python-stdlib", "version": platform.python_version(), "licenses": ["PSF-2.0"],
                      "counts": {"documents": counts.documents, "chars": counts.chars}}],
        "corpus": corpus_entry(out),
        "build_seconds": round(time.monotonic() - start, 2),
    }
    write_manifest(out, manifest)
    return manifest, True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, metavar="OUT", help="folder for corpus.jsonl and manifest.json")
    parser.add_argument("--replace", action="store_true",
                        help="replace the corpus of an OUT that holds another one or other files")


def main(args: argparse.Namespace) -> int:
    start = time.monotonic()
    manifest, built = build(args.out, replace=args.replace)
    counts = manifest["packages"][0]["counts"]
    print(f"{args.out / 'corpus.jsonl'}: {'built' if built else 'up to date'}, Python {manifest['python']}, "
          f"{counts['documents']:,} documents, {counts['chars']:,} chars in {time.monotonic() - start:.1f} s")
    return 0
