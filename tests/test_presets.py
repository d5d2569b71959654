"""Every YAML preset under configs/ loads and validates against its component's config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hataori.config import load, to_dict
from hataori.data.prepare import PrepareConfig
from hataori.eval.templates import TemplateConfig
from hataori.model import ModelConfig
from hataori.plan.planner import PlanConfig
from hataori.slurm.config import SlurmConfig
from hataori.tokenizer.trainer import TokenizerTrainConfig
from hataori.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# configs/<folder>/ -> the config its presets build
SCHEMAS = {
    "model": ModelConfig,
    "tokenizer": TokenizerTrainConfig,
    "data": PrepareConfig,
    "train": TrainConfig,
    "eval": TemplateConfig,
    "slurm": SlurmConfig,
    "plan": PlanConfig,
}
# What a preset leaves to the command line (the user's own corpus), given here as a user would.
COMMAND_LINE = {
    "tokenizer": ["sources=[{path: corpus.jsonl}]"],
    "train": ["data.datasets=[{path: data/shards/debian-ja}]", "run_dir=runs/preset"],
    "slurm": ["time=10"],
    "plan": ["gpus=16"],
}


def presets() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml"))


def bases() -> set[Path]:
    """Files other presets derive from; these may be partial and are checked through their children."""
    found = set()
    for path in presets():
        base = OmegaConf.load(path).get("base")
        for name in [base] if isinstance(base, str) else list(base or []):
            found.add((path.parent / name).resolve())
    return found


def test_every_folder_has_a_schema():
    folders = {p.parent.relative_to(CONFIGS).parts[0] for p in presets()}
    assert folders <= set(SCHEMAS), f"configs/ folders without a schema here: {folders - set(SCHEMAS)}"


@pytest.mark.parametrize("path", presets(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_preset_validates(path: Path, tmp_path):
    folder = path.relative_to(CONFIGS).parts[0]
    schema = SCHEMAS[folder]
    if path.resolve() in bases() and path.name == "base.yaml":
        children = [p for p in presets() if OmegaConf.load(p).get("base") == path.name]
        assert children, f"{path} is a base that no preset derives from"
        return
    command_line = COMMAND_LINE.get(folder, [])
    if folder == "slurm" and "time" in OmegaConf.load(path):  # a profile's own limit stays
        command_line = []
    if folder == "train" and path.stem.startswith("continue"):
        # Continued-pretraining presets take the model's shape from the imported model.
        from helpers import hf_llama

        from hataori.train.config import load_train_config

        source = hf_llama(tmp_path / "hf")
        # A dataset that is not there: the run's vocabulary is then the source's (a main job's shards under
        # data/ would give theirs).
        absent = f"data.datasets=[{{path: {tmp_path / 'no-shards'}}}]"
        cfg = load_train_config([path], [*command_line, absent, f"init.from_hf={source}", "model.max_seq_len=2048"])
        assert (cfg.model.d_model, cfg.model.vocab_size) == (64, 300)
        return
    cfg = load(schema, [path], command_line)
    built = to_dict(cfg)
    for key, value in own_values(path):  # what the preset itself says is what the config holds
        found = built
        for part in key.split("."):
            found = found[part]
        assert found == value, f"{path}: {key} is {found!r}, the preset says {value!r}"


def own_values(path: Path) -> list[tuple[str, object]]:
    """The dotted keys and values a preset file sets itself (not its bases')."""
    def walk(node, prefix):
        for key, value in node.items():
            if key == "base":
                continue
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    return list(walk(OmegaConf.to_container(OmegaConf.load(path), resolve=True), ""))


def test_train_presets_take_their_model_from_the_model_presets():
    """A training preset's model section is the model preset it names, plus only what it changes."""
    for size in ("125m", "1b", "7b", "30b"):
        train = load(TrainConfig, [CONFIGS / "train" / f"{size}.yaml"], COMMAND_LINE["train"])
        model = load(ModelConfig, [CONFIGS / "model" / f"{size}.yaml"])
        if size == "7b":
            model = dataclasses.replace(model, activation_checkpointing=True)
        assert train.model == model, size
