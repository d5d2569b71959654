"""The folders, and the modules, import one another in one direction: scripts/import_graph.py finds no cycle.

The script runs as users run it; on synthetic trees it must find a cycle an import inside a function
makes, and refuse hataori/'s shared modules importing a folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "import_graph.py"


def import_graph(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """A repository of packages: each ``folder/file.py`` with its source (``__init__.py`` files added)."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        (path.parent / "__init__.py").touch()
    return root


@pytest.mark.timeout(120)
def test_the_repository_has_no_cycle_between_folders():
    result = import_graph()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CYCLE" not in result.stdout and "NOT ALLOWED" not in result.stdout
    assert "\n  train -> model (" in result.stdout
    assert "allowed direction" in result.stdout
    assert "imports of hataori modules inside functions: " in result.stdout
    assert "no cycle between them (imports inside functions counted)" in result.stdout


@pytest.mark.timeout(120)
def test_a_cycle_through_an_import_inside_a_function_fails(tmp_path):
    root = write_tree(tmp_path, {
        "hataori/errors.py": "",
        "hataori/cli.py": 'COMMANDS = {"run": "hataori.low.b"}\n',
        "hataori/high/a.py": "from hataori.errors import Oops\nfrom hataori.low.b import f\n",
        "hataori/low/b.py": "import os\n\n\ndef f():\n    from hataori.high import a\n    return a\n",
    })
    result = import_graph("--root", str(root))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "CYCLE: high -> low -> high" in out
    assert "hataori/high/a.py:2 hataori.low.b" in out
    assert "hataori/low/b.py:5 hataori.high.a (inside a function)" in out
    assert "  low -> high (1, 1 inside functions)" in out and "  cli -> low (1)" in out
    assert "imports of hataori modules inside functions: 1 (low 1)" in out
    assert "allowed direction" not in out  # there is none


@pytest.mark.timeout(120)
def test_a_cycle_between_modules_of_one_folder_fails(tmp_path):
    """No folder imports another, but two modules of one folder import each other, one of them inside a
    function (and a from-import names the submodule): the module guard finds it."""
    root = write_tree(tmp_path, {
        "hataori/errors.py": "",
        "hataori/cli.py": 'COMMANDS = {"run": "hataori.low.a"}\n',
        "hataori/low/a.py": "from hataori.low import b\n",
        "hataori/low/b.py": "def f():\n    from hataori.low.a import g\n    return g\n",
    })
    result = import_graph("--root", str(root))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "CYCLE between modules: hataori.low.a -> hataori.low.b -> hataori.low.a" in out, out
    assert "hataori/low/a.py:1 hataori.low.b" in out and "hataori/low/b.py:2 hataori.low.a (inside a function)" in out
    assert "CYCLE: " not in out.replace("CYCLE between modules", "")  # no cycle between folders


@pytest.mark.timeout(120)
def test_layers_edges_and_counts_of_an_acyclic_tree(tmp_path):
    root = write_tree(tmp_path, {
        "hataori/config.py": "",
        "hataori/cli.py": 'COMMANDS = {"go": "hataori.top.run", "help": "not a module path"}\n',
        "hataori/top/run.py": ("from hataori import config, mid\nimport hataori.low.c\n\n\n"
                       "def main():\n    from . import other\n    from hataori.mid.m import g\n"),
        "hataori/top/other.py": "",
        "hataori/mid/m.py": ("import importlib\nfrom ..low import c\n\n\n"
                     "def g(name):\n    return importlib.import_module(f'hataori.low.{name}')\n"),
        "hataori/low/c.py": "from hataori.config import load\n",
    })
    result = import_graph("--root", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for edge in ("cli -> top (1)", "top -> mid (2, 1 inside functions)", "top -> low (1)", "top -> hataori (1)",
                 "mid -> low (2, 1 inside functions)", "low -> hataori (1)"):
        assert f"\n  {edge}\n" in out, edge
    assert "\n  cli\n  top\n  mid\n  low\n  hataori\n" in out
    assert "imports of hataori modules inside functions: 3 (mid 1, top 2)" in out
    assert "hataori/top/run.py (2): 6 hataori.top.other, 7 hataori.mid.m [mid]" in out


@pytest.mark.timeout(120)
def test_shared_modules_importing_a_folder_and_a_folder_importing_cli_are_refused(tmp_path):
    root = write_tree(tmp_path, {
        "hataori/config.py": "from hataori.low.c import X\n",
        "hataori/cli.py": "",
        "hataori/low/c.py": "X = 1\n",
        "hataori/other/d.py": "from hataori.cli import main\n",
    })
    result = import_graph("--root", str(root))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NOT ALLOWED: hataori/'s shared modules (hataori/*.py but cli.py) import hataori/low/" in result.stdout
    assert "hataori/config.py:1 hataori.low.c" in result.stdout
    assert "NOT ALLOWED: hataori/other/ imports hataori.cli" in result.stdout
    assert "hataori/other/d.py:1 hataori.cli" in result.stdout
