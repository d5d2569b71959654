"""The config loader: presets derive from bases, overrides apply last, mistakes get named."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from hataori.config import load, require, to_yaml
from hataori.errors import ConfigError


@dataclass(kw_only=True, slots=True)
class Optim:
    lr: float = 1e-3
    """Peak learning rate."""
    kind: Literal["adamw", "sgd"] = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])

    def __post_init__(self):
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}; set a learning rate like 3e-4")


@dataclass(kw_only=True, slots=True)
class Source:
    path: str
    weight: float = 1.0


@dataclass(kw_only=True, slots=True)
class Job:
    optim: Optim = field(default_factory=Optim)
    sources: list[Source] = field(default_factory=list)
    steps: int = 10
    name: Optional[str] = None
    tags: dict[str, float] = field(default_factory=dict)
    warmup: Optim | None = None
    """An optional section, as the training config's lora is."""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_base_chain_then_file_then_overrides(tmp_path: Path):
    write(tmp_path / "base.yaml", "optim:\n  lr: 0.1\n  kind: sgd\nsteps: 3\nsources:\n  - path: a.jsonl\n")
    write(tmp_path / "mid.yaml", "base: base.yaml\nsteps: 5\n")
    top = write(tmp_path / "top.yaml", "base: mid.yaml\noptim:\n  lr: 0.2\n")
    cfg = load(Job, [top], ["optim.lr=3e-4", "sources=[{path: b.jsonl, weight: 2}]", "name=run1"])
    assert cfg.optim.lr == 3e-4
    assert cfg.optim.kind == "sgd"  # from the base, untouched by the top file
    assert cfg.steps == 5
    assert [(s.path, s.weight) for s in cfg.sources] == [("b.jsonl", 2.0)]
    assert cfg.name == "run1"
    # The dump loads back to the same config.
    again = load(Job, [write(tmp_path / "dump.yaml", to_yaml(cfg))])
    assert again == cfg


def test_a_section_derives_from_another_file(tmp_path: Path):
    """``base:`` inside a section: that file (with its own bases) is the section, under the file's keys."""
    (tmp_path / "optim").mkdir()
    write(tmp_path / "optim" / "base.yaml", "lr: 0.5\nkind: sgd\n")
    write(tmp_path / "optim" / "fast.yaml", "base: base.yaml\nlr: 0.9\n")
    write(tmp_path / "job.yaml", "steps: 4\noptim:\n  lr: 0.1\n")
    top = write(tmp_path / "top.yaml", "base: job.yaml\noptim:\n  base: optim/fast.yaml\n  betas: [0.8, 0.9]\n")
    cfg = load(Job, [top], ["steps=7"])
    # job.yaml, then optim/base.yaml and optim/fast.yaml as the optim section, then top.yaml, then overrides
    assert (cfg.optim.lr, cfg.optim.kind, cfg.optim.betas, cfg.steps) == (0.9, "sgd", [0.8, 0.9], 7)
    write(tmp_path / "optim" / "base.yaml", "lrate: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load(Job, [top])
    assert err.value.key == "optim.lrate" and str(tmp_path / "optim" / "base.yaml") in str(err.value)


@pytest.mark.parametrize("override, key, needle", [
    ("optim.lrr=3", "optim.lrr", "did you mean 'optim.lr'"),
    ("stepz=3", "stepz", "did you mean 'steps'"),
    ("sources=[{path: a, wieght: 2}]", "sources[0].wieght", "did you mean 'sources[0].weight'"),
    ("zzz=1", "zzz", "valid keys here: optim, sources, steps"),
])
def test_unknown_keys_name_the_closest(override, key, needle):
    with pytest.raises(ConfigError) as err:
        load(Job, [], [override])
    assert err.value.key == key
    assert needle in str(err.value)
    assert override in str(err.value)  # which layer it came from


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path):
    write(tmp_path / "base.yaml", "optim:\n  lrate: 0.1\n")
    top = write(tmp_path / "top.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError) as err:
        load(Job, [top])
    assert str(tmp_path / "base.yaml") in str(err.value)
    assert "optim.lr" in str(err.value)


@pytest.mark.parametrize("override, key, needle", [
    ("optim.lr=-1", "optim.lr", "must be positive"),
    ("optim.kind=adamx", "optim.kind", "did you mean 'adamw'"),
    ("steps=abc", "steps", "must be an integer"),
    ("steps=1.5", "steps", "must be an integer"),
    ("optim.betas=0.9", "optim.betas", "must be a list"),
    ("sources=[{weight: 2}]", "sources[0].path", "is required"),
    ("warmup.lr=0", "warmup.lr", "must be positive"),  # inside an optional section: its own key
])
def test_invalid_values_say_what_to_change(override, key, needle):
    with pytest.raises(ConfigError) as err:
        load(Job, [], [override])
    assert err.value.key == key
    assert needle in str(err.value)


def test_file_problems(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(Job, [tmp_path / "missing.yaml"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(Job, [write(tmp_path / "bad.yaml", "optim: [unclosed\n")])
    with pytest.raises(ConfigError, match="mapping"):
        load(Job, [write(tmp_path / "list.yaml", "- 1\n- 2\n")])
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load(Job, [write(tmp_path / "b.yaml", "base: a.yaml\n")])
    with pytest.raises(ConfigError, match="key=value"):
        load(Job, [], ["steps"])


def test_interpolation_resolves(tmp_path: Path):
    cfg = load(Job, [write(tmp_path / "x.yaml", "steps: 7\nname: run-${steps}\n")])
    assert cfg.name == "run-7"


@pytest.mark.parametrize("value", ["true", "1.0", "'1'"])
def test_literal_fields_take_only_their_own_values(value):
    """``zero.stage`` is Literal[0, 1, 2, 3]: true and 1.0 equal 1 in Python but are mistakes."""
    from hataori.train.zero import ZeroConfig

    assert load(ZeroConfig, [], ["stage=1", "global_batch_tokens=8"]).stage == 1
    with pytest.raises(ConfigError) as err:
        load(ZeroConfig, [], [f"stage={value}", "global_batch_tokens=8"])
    assert err.value.key == "stage" and "must be one of 0, 1, 2, 3" in str(err.value)


def test_command_flags_are_shortcuts_for_keys():
    """A flag sets its key exactly (a path with spaces, a list); unset flags set nothing; a key set by a
    flag and by an override is refused, naming both."""
    from hataori.config import command_items

    files, overrides = command_items(["a.yaml", "steps=3"], {"--out": ("out", "my dir/x"), "--lr": ("optim.lr", None),
                                                            "--src": ("sources", [{"path": "c.jsonl"}])})
    assert files == ["a.yaml"]
    assert overrides == ['out="my dir/x"', 'sources=[{"path": "c.jsonl"}]', "steps=3"]
    with pytest.raises(ConfigError) as err:
        command_items(["steps=3"], {"--steps": ("steps", 4)})
    assert err.value.key == "steps" and "set twice, by --steps and by steps=..." in str(err.value)
