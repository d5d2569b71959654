"""No folder of the repository hides an installed package.

Python puts the folder of what it starts first on sys.path: the repository's root for ``python -m pytest``,
``python -c`` and ``python -`` started there (setuptools building the wheel included), tests/ for the test
modules that the multi-process tests run as scripts, scripts/ and benchmarks/ for theirs. A module or a
package there named like one an installed distribution provides wins over it. transformers imports
Hugging Face's ``kernels``, which a top-level kernels/ folder hid; every stage's folder now lives inside
hataori/, and these tests keep it so.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "hataori"
SCRIPT_FOLDERS = ("tests", "scripts", "benchmarks")
"""Folders whose files run as scripts (``python tests/test_x.py``), which puts the folder on sys.path."""
METADATA_FOLDERS = (".dist-info", ".egg-info", ".data")


def importable_names(folder: Path) -> dict[str, str]:
    """The top-level names a Python with ``folder`` on sys.path imports from there: modules and regular
    packages, by name, with the path that provides each. A folder without ``__init__.py`` is left out: it is
    a namespace package, which an installed module or regular package of the same name always wins over."""
    names = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix == ".py":
            names[path.stem] = path.relative_to(REPO).as_posix()
        elif path.is_dir() and (path / "__init__.py").is_file():
            names[path.name] = path.relative_to(REPO).as_posix() + "/"
    return names


def installed_top_level() -> dict[str, str]:
    """Each top-level module or package name that an installed distribution provides, with that distribution
    (hataori itself aside), read from the files each distribution's RECORD lists."""
    owners: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name is None or name.lower() == PACKAGE:
            continue
        for file in dist.files or ():
            parts = file.parts
            if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith(METADATA_FOLDERS):
                continue
            if len(parts) > 1:
                owners.setdefault(parts[0], name)
            elif file.suffix in (".py", ".so", ".pyd"):
                owners.setdefault(file.name.split(".")[0], name)
    return owners


def test_the_repository_root_holds_no_package_but_hataori():
    """A stage's folder belongs inside hataori/: at the root it would be importable under its bare name by
    every Python started there, and the next distribution of that name (kernels, tokenizer, train) is hidden."""
    names = importable_names(REPO)
    assert set(names) == {PACKAGE, "setup"}, (
        f"importable at the repository root: {sorted(names.values())}; move packages and modules into hataori/")


def test_no_folder_that_python_starts_in_hides_an_installed_distribution():
    owners = installed_top_level()
    assert owners.get("torch") == "torch", "the scan of installed distributions found no torch"
    clashes = [f"{path} hides {name!r} of the installed distribution {owners[name]}"
               for folder in (REPO, *(REPO / f for f in SCRIPT_FOLDERS))
               for name, path in importable_names(folder).items() if name in owners]
    assert not clashes, "; ".join(clashes) + ": rename the file or move it into hataori/"


# Run by a Python started in the repository's root, as the suite's own subprocesses are: Hugging Face's kernels
# is the one imported, and transformers' Llama and a PEFT LoRA model on it run (a LoRA model at initialisation
# gives its base's logits: the B matrices start at zero).
TRANSFORMERS_AND_PEFT = """
import importlib.metadata, json, sys
import torch
import kernels, peft, transformers
from transformers.integrations import hub_kernels  # imports kernels' CUDAProperties, Mode, ...
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
model = transformers.LlamaForCausalLM(config).eval()
ids = torch.randint(0, 64, (2, 7))
with torch.no_grad():
    base = model(input_ids=ids).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapted = lora(input_ids=ids).logits
print(json.dumps({"kernels": kernels.__file__, "dist": str(importlib.metadata.distribution("kernels").locate_file("")),
                  "path0": sys.path[0], "finite": bool(torch.isfinite(base).all()),
                  "same": bool(torch.equal(base, adapted)), "trainable": lora.get_nb_trainable_parameters()[0]}))
"""


@pytest.fixture(scope="module")
def hf_kernels() -> str:
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels distribution is not installed (transformers before 5 does not need it)")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("start", ["-c", "stdin"])
def test_transformers_and_peft_work_in_a_python_started_at_the_root(hf_kernels, start):
    args, stdin = ([sys.executable, "-c", TRANSFORMERS_AND_PEFT], None) if start == "-c" else \
        ([sys.executable, "-"], TRANSFORMERS_AND_PEFT)
    result = subprocess.run(args, input=stdin, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["path0"] in ("", str(REPO)), f"the repository's root was not first on sys.path: {seen['path0']}"
    imported = Path(seen["kernels"])
    assert imported.is_relative_to(seen["dist"]) and not imported.is_relative_to(REPO / PACKAGE), imported
    assert seen["finite"] and seen["same"]
    # Rank 4 on q (32 -> 32) and v (32 -> 16: 2 KV heads of 8) in each of 2 layers: A is 4 x in, B out x 4.
    assert seen["trainable"] == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))


def test_the_suite_itself_imports_hf_kernels(hf_kernels):
    """pytest started as ``python -m pytest`` in the root has the root on sys.path, as the subprocesses above."""
    import kernels
    from transformers.integrations import hub_kernels  # noqa: F401  (fails when kernels is our folder)

    assert Path(kernels.__file__).is_relative_to(importlib.metadata.distribution("kernels").locate_file(""))
