"""The package installs cleanly: a wheel built from this tree, installed into a fresh venv,
provides every subpackage under the ``hataori`` namespace and nothing under bare names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["hataori", "hataori.corpus", "hataori.tokenizer", "hataori.data", "hataori.model", "hataori.kernels",
               "hataori.checkpoint", "hataori.interop", "hataori.train", "hataori.eval", "hataori.plan",
               "hataori.slurm"]
# Names other distributions own on PyPI, and our own folder names: none may be installed bare.
FORBIDDEN_TOP_LEVEL = {"model", "corpus", "tokenizer", "data", "train", "kernels", "checkpoint", "interop", "configs",
                       "tests", "slurm", "eval", "plan"}


def source_files() -> list[str]:
    """The repository's files as a clean checkout has them (tracked and not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    return sorted(name for name in listed.split("\0") if name and (ROOT / name).is_file())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the source files: a build/ folder left in the working tree by an
    earlier build keeps modules that were since moved or deleted, and setuptools would pack them."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in source_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(source)], check=True, timeout=300)
    (wheel,) = out.glob("hataori-*.whl")
    return wheel


def test_wheel_modules_are_the_source_trees(wheel: Path):
    """Every module of every subpackage is in the wheel, and nothing else is."""
    expected = {name for name in source_files() if name.startswith("hataori/") and name.endswith(".py")}
    with zipfile.ZipFile(wheel) as zf:
        packed = {name for name in zf.namelist() if name.endswith(".py")}
    assert packed == expected, f"only in the wheel: {sorted(packed - expected)}; missing: {sorted(expected - packed)}"


def test_wheel_holds_only_the_hataori_namespace(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        top = {name.split("/")[0] for name in zf.namelist() if not name.split("/")[0].endswith(".dist-info")}
        assert top == {"hataori"}, f"wheel installs top-level names {sorted(top)}"
        names = set(zf.namelist())
    for package in SUBPACKAGES:
        assert package.replace(".", "/") + "/__init__.py" in names
    # The JGLUE files evaluation and the instruction set read, with their license, travel with the package.
    for name in ("jcommonsenseqa-train.json", "jcommonsenseqa-valid.json", "jnli-valid.json", "jsts-train.json",
                 "jsts-valid.json", "jsquad-valid.json", "LICENSE", "README.md"):
        assert f"hataori/corpus/jglue/{name}" in names


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fresh_venv_imports_every_subpackage(wheel: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # The heavy dependencies (torch, sentencepiece, ...) come from this environment's site-packages
    # through a .pth line; hataori itself only from the wheel. A path added by a .pth line is not a
    # site dir, so this environment's editable-install hook is not run in the fresh venv.
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     check=True, capture_output=True, text=True).stdout.strip())
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)

    installed = {p.name for p in fresh_site.iterdir()}
    assert not (installed & FORBIDDEN_TOP_LEVEL), f"bare names installed: {installed & FORBIDDEN_TOP_LEVEL}"

    code = ("import importlib, sys\n"
            f"for name in {SUBPACKAGES!r}:\n"
            "    module = importlib.import_module(name)\n"
            "    print(name, module.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    for line in result.stdout.splitlines():
        name, path = line.split()
        assert Path(path).is_relative_to(fresh_site), f"{name} imported from {path}, not from the fresh venv"

    cli = subprocess.run([str(venv / "bin" / "hataori"), "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert cli.returncode == 0, cli.stderr
    for group in ("corpus", "tokenizer", "data"):
        assert group in cli.stdout
