"""The run folder records what produced it, before step 0.

:func:`record_run` writes, on rank 0:

* ``config.yaml``: the resolved config, as loaded (presets and overrides applied);
* ``environment.json``: the git commit of the hataori code (``"unknown"`` outside a git checkout)
  and whether the checkout had uncommitted changes, the versions of python and of the packages
  that shape the numbers (torch, deepspeed, sentencepiece, numpy, hataori), the device description
  (GPU name, memory and count, or CPU model and cores), the world size, the host and the command line.

A restarted run rewrites both, so they describe the latest launch; ``deepspeed.json`` (written by
:meth:`hataori.train.zero.ZeroConfig.build`) sits beside them.

:func:`record_provenance` writes ``provenance.json``, what an exported model card says the model
was made from, read while the inputs are at hand: the tokenizer (path, fingerprint, type, size),
each dataset (path, weight, the fingerprint of each split's shards, document and token counts,
the sources it was encoded from) with the manifest of every corpus those sources came from (the
``manifest.json`` a ``hataori corpus`` command writes beside its ``corpus.jsonl``: packages,
versions, licenses, counts), and where the initial weights came from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from hataori.checkpoint.layout import CONFIG_FILE, PROVENANCE_FILE
from hataori.config import build, to_yaml
from hataori.data.shards import Dataset
from hataori.errors import ConfigError, InputError
from hataori.fsutil import atomic_write_text
from hataori.model import ModelConfig
from hataori.tokenizer.model import Tokenizer
from hataori.tokenizer.proto import model_type_name, parse

PACKAGES = ("torch", "deepspeed", "sentencepiece", "numpy", "hataori")
"""Packages whose versions each run records."""


def record_run(run_dir: str | os.PathLike, config: Any, *, world_size: int = 1) -> Path:
    """Write ``config.yaml`` and ``environment.json`` into ``run_dir`` (created if missing)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, config_yaml(config))
    atomic_write_text(run_dir / "environment.json", json.dumps(environment(world_size), indent=2) + "\n")
    return run_dir


def record_provenance(run_dir: str | os.PathLike, *, tokenizer: Any, datasets: list[Any],
                      init: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``provenance.json`` into ``run_dir``: ``tokenizer`` a :class:`hataori.tokenizer.model.Tokenizer`,
    ``datasets`` the DataConfig's dataset specs (path, weight), ``init`` where the weights came from."""
    record = {
        "tokenizer": {"path": str(tokenizer.path.resolve()), "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size,
                      "model_type": model_type_name(parse(tokenizer.proto, tokenizer.path))},
        "datasets": [dataset_provenance(Dataset(spec.path, "train"), spec.weight) for spec in datasets],
        "init": init or {"from": "random"},
    }
    atomic_write_text(Path(run_dir) / PROVENANCE_FILE, json.dumps(record, ensure_ascii=False, indent=2) + "\n")
    return record


def dataset_provenance(dataset: Any, weight: float) -> dict[str, Any]:
    """A prepared dataset's record: fingerprints and counts of its splits, its sources and their corpora."""
    manifest = dataset.manifest
    splits = {}
    for split, info in manifest["splits"].items():
        splits[split] = {"fingerprint": Dataset(dataset.path, split).fingerprint, "documents": info["documents"],
                         "tokens": info["tokens"]}
    sources, corpora = [], {}
    for source in manifest.get("sources", []):
        sources.append({key: source.get(key) for key in ("name", "path", "weight", "documents")})
        for file in source.get("files", []):
            corpus_manifest = Path(file).parent / "manifest.json"
            if str(corpus_manifest) not in corpora and corpus_manifest.is_file():
                try:
                    corpora[str(corpus_manifest)] = json.loads(corpus_manifest.read_text(encoding="utf-8"))
                except json.JSONDecodeError:
                    corpora[str(corpus_manifest)] = {"error": "not valid JSON"}
    return {"path": str(Path(dataset.path).resolve()), "weight": weight,
            "tokenizer_fingerprint": dataset.tokenizer_fingerprint, "splits": splits, "sources": sources,
            "corpora": corpora}


def config_yaml(config: Any) -> str:
    """YAML of a config dataclass or a plain mapping."""
    if dataclasses.is_dataclass(config):
        return to_yaml(config)
    return OmegaConf.to_yaml(OmegaConf.create(config))


def environment(world_size: int = 1) -> dict[str, Any]:
    """Code version, package versions and device of this process."""
    commit, dirty = git_commit(Path(__file__).resolve().parent)
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "packages": package_versions(),
        "device": device_description(),
        "world_size": world_size,
        "host": socket.gethostname(),
        "command": sys.argv,
    }


def git_commit(path: Path) -> tuple[str, bool | None]:
    """The commit checked out at ``path`` and whether there are uncommitted changes; ``("unknown", None)``
    when ``path`` is not in a git checkout (an installed wheel) or git is missing."""
    try:
        commit = _git(path, "rev-parse", "HEAD")
        dirty = bool(_git(path, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return "unknown", None
    return commit, dirty


def _git(path: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True,
                            timeout=30)
    return result.stdout.strip()


def package_versions() -> dict[str, str]:
    """Installed versions of :data:`PACKAGES` (``"not installed"`` for a missing one)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_description() -> dict[str, Any]:
    """The accelerators, or the CPU when there are none."""
    if torch.cuda.is_available():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        return {
            "type": "cuda",
            "count": len(props),
            "name": props[0].name,
            "memory_gib": round(props[0].total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return {
        "type": "cpu",
        "model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- reading a run folder back


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's recorded config (``config.yaml``) as a plain dict."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise InputError(path, "missing; the run folder records its config there before step 0")
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(path, f"not valid YAML ({first}); hataori pretrain wrote it when the run began: restore "
                         "that file (or write it again from the launch's --config files and overrides)") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise InputError(path, "has no model section; is this a `hataori pretrain` run folder?")
    return config


def model_config(config: dict[str, Any]):
    """The ModelConfig of a recorded config."""
    return build(ModelConfig, config["model"], "model.")


def tokenizer_path(config: dict[str, Any], override: str | None) -> str:
    """``--tokenizer``, else the config's ``tokenizer``, else the first dataset's recorded tokenizer."""
    if override:
        return override
    if config.get("tokenizer"):
        return str(config["tokenizer"])
    datasets = (config.get("data") or {}).get("datasets") or []
    if datasets:
        manifest = Path(datasets[0]["path"]) / "dataset.json"
        if manifest.is_file():
            return json.loads(manifest.read_text())["tokenizer"]["path"]
    raise InputError(CONFIG_FILE, "names no tokenizer and no readable dataset manifest; pass --tokenizer DIR")


def run_tokenizer(run_dir: Path, config: dict, override: str | None, vocab_size: int):
    """The tokenizer to read a run's model with: ``override`` (``--tokenizer``), else the run's own. Refused
    unless its fingerprint is the one the run was trained with (``provenance.json``'s, else that of the
    tokenizer the run's config names) and it has the model's ``vocab_size`` pieces."""
    key = "--tokenizer" if override else "tokenizer"
    tokenizer = Tokenizer(tokenizer_path(config, override))
    provenance, trained = run_dir / PROVENANCE_FILE, None
    if provenance.is_file():
        try:
            record = json.loads(provenance.read_text(encoding="utf-8"))["tokenizer"]
            trained = (record["path"], record["fingerprint"])
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(provenance, f"has no readable tokenizer record ({err!r}); it is written by "
                                         "`hataori pretrain`") from None
    elif override:
        with contextlib.suppress(InputError):  # an older run: its config's tokenizer, if it is still there
            own = Tokenizer(tokenizer_path(config, None))
            trained = (own.path, own.fingerprint)
    if trained and trained[1] != tokenizer.fingerprint:
        raise ConfigError(key, f"{tokenizer.path} has fingerprint {tokenizer.fingerprint}, but the run {run_dir} was "
                               f"trained with {trained[0]} (fingerprint {trained[1]}); pass that tokenizer")
    if tokenizer.vocab_size != vocab_size:
        raise ConfigError(key, f"{tokenizer.path} has {tokenizer.vocab_size} pieces but the run's model.vocab_size is "
                               f"{vocab_size}; pass the tokenizer the run was trained with")
    return tokenizer
