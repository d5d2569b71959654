"""requirements.lock (what scripts/setup.sh installs) agrees with setup.py's ranges (what users install), and
scripts/requirements_lock.py reads, checks and writes it as setup.sh and scripts/lock.sh need."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "requirements_lock.py"
sys.path.insert(0, str(REPO / "scripts"))
from requirements_lock import LockError, differences, installed, normalise, public, read  # noqa: E402

NOT_LOCKED = {"flash-attn": "the gpu extra's flash-attn builds only where CUDA is (its setup needs CUDA_HOME)"}


def setup_requirements() -> dict[str, list[Requirement]]:
    """setup.py's requirements by group (``install`` and each extra), read from its ``setup()`` call."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    keywords = {k.arg: k.value for k in call.keywords}
    groups = {"install": ast.literal_eval(keywords["install_requires"])}
    groups.update(ast.literal_eval(keywords["extras_require"]))
    return {group: [Requirement(text) for text in texts] for group, texts in groups.items()}


def test_every_requirement_of_setup_py_is_locked_inside_its_range():
    _, pins = read()
    outside = []
    for group, requirements in setup_requirements().items():
        for req in requirements:
            name = normalise(req.name)
            if name in NOT_LOCKED:
                continue
            if name not in pins:
                outside.append(f"{group}: {req} is not in requirements.lock")
            elif not req.specifier.contains(Version(pins[name]), prereleases=True):
                outside.append(f"{group}: {req} excludes the locked {name}=={pins[name]}")
    assert not outside, "; ".join(outside) + ": run `bash scripts/lock.sh`, or widen setup.py's range"
    assert set(NOT_LOCKED) <= {normalise(r.name) for reqs in setup_requirements().values() for r in reqs}


def test_the_lock_is_complete_for_what_it_pins():
    """Each locked distribution's own requirements, as installed here, are locked too (when this environment
    is the lock's: setup.sh's check says so), so a fresh install resolves nothing outside the lock."""
    _, pins = read()
    have = installed()
    if differences(pins, have):
        pytest.skip("this environment is not requirements.lock's (scripts/setup.sh installs it)")
    import importlib.metadata

    unlocked = []
    for name in pins:
        for text in importlib.metadata.requires(name) or ():
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                if normalise(req.name) not in pins:
                    unlocked.append(f"{name} needs {req}")
    assert not unlocked, unlocked


def test_the_lock_has_its_header_and_plain_pins():
    fields, pins = read()
    assert fields["python"].count(".") == 1 and fields["command"] == "bash scripts/lock.sh"
    assert "hataori" not in pins and pins["torch"] == public(pins["torch"])
    assert {"torch", "triton", "deepspeed", "transformers", "kernels", "peft", "tokenizers", "safetensors",
            "sentencepiece", "numpy", "omegaconf", "pydantic", "tensorboard", "pytest", "pip",
            "setuptools"} <= set(pins)


def test_differences_name_what_is_missing_different_or_extra():
    have = installed()
    pins = {name: public(version) for name, version in have.items()}
    assert differences(pins, have) == []
    pins["deepspeed"], pins["no-such-package"] = "0.0.1", "1.0"
    del pins["numpy"]
    assert differences(pins, have) == [f"deepspeed is {have['deepspeed']}, the lock says 0.0.1",
                                       "no-such-package==1.0 is not installed",
                                       f"numpy {have['numpy']} is installed but not locked"]


def run_script(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_freeze_writes_this_environment_and_says_what_changed(tmp_path):
    lock = tmp_path / "requirements.lock"
    done = run_script("freeze", str(lock))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{lock}: {len(installed())} packages locked"
    fields, pins = read(lock)
    assert fields["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert pins == {name: public(version) for name, version in installed().items()}
    assert run_script("check", str(lock)).returncode == 0
    text = lock.read_text(encoding="utf-8").replace(f"\nnumpy=={pins['numpy']}\n", "\nnumpy==1.0.0\n")
    lock.write_text(text, encoding="utf-8")
    done = run_script("check", str(lock))
    assert done.returncode == 1 and f"numpy is {installed()['numpy']}, the lock says 1.0.0" in done.stderr
    done = run_script("freeze", str(lock))
    assert done.stdout.strip() == f"{lock}: numpy 1.0.0 -> {pins['numpy']}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requirements.lock"]  # no temporary file left


def test_another_python_and_a_malformed_lock_are_refused(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# python: 2.7\n# platform: CPython Linux x86_64\ntorch==2.13.0\n", encoding="utf-8")
    done = run_script("python", str(lock))
    assert done.returncode == 2
    assert done.stderr.startswith(f"requirements_lock: {lock} was made with Python 2.7 (CPython Linux x86_64), "
                                  f"this is Python {sys.version_info.major}.{sys.version_info.minor}")
    assert "PYTHON=python2.7" in done.stderr
    lock.write_text("# python: 3.11\ntorch==2.13.0\ntorch>=2\n", encoding="utf-8")
    with pytest.raises(LockError, match=rf"^{lock}:3: 'torch>=2' is not a name==version pin"):
        read(lock)
    lock.write_text("# python: 3.11\nTorch==2.13.0\ntorch==2.13.0\n", encoding="utf-8")
    with pytest.raises(LockError, match=rf"^{lock}:3: torch is pinned twice"):
        read(lock)
    assert run_script("version", "deepspeed", str(tmp_path / "none.lock")).stderr.startswith(
        f"requirements_lock: {tmp_path / 'none.lock'}: no such lock")
