"""Typed configs: dataclasses merged by omegaconf from YAML presets and command-line overrides.

Every component owns one ``@dataclass(kw_only=True, slots=True)`` config that validates itself
in ``__post_init__``. A command loads its config with :func:`load`::

    cfg = load(TokenizerTrainConfig, ["configs/tokenizer/ja-unigram-32k.yaml"], ["vocab_size=16000"])

Layers are applied in order: each YAML file (after the files named by its ``base:`` key, which
lets a preset say only what differs from the one it derives from), then the dotlist overrides.
A ``base:`` inside a section derives that section from another file, so a training preset can
compose a model preset::

    base: base.yaml            # the training base: these keys first
    model:
      base: ../model/7b.yaml   # then configs/model/7b.yaml (and its bases) as the model section
      max_seq_len: 4096        # then this file's own keys

Section bases apply after the file's own top-level bases and before the file's keys.
Each layer is checked against the schema on its own, so an unknown key is reported with the file
(or override) it came from and the closest valid key. Values are then type-checked while the
dataclasses are built; ``__post_init__`` checks raise :class:`ConfigError` with the field name and
the dotted path is prefixed on the way out.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hataori.errors import ConfigError

T = TypeVar("T")

BASE_KEY = "base"


# ----------------------------------------------------------------------------- loading


def load(schema: type[T], files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> T:
    """Build ``schema`` from YAML ``files`` (each with its ``base:`` chain) and ``overrides``."""
    return build(schema, merged(schema, files, overrides))


def merged(schema: type, files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> dict:
    """The plain data :func:`load` builds ``schema`` from: every layer key-checked and merged."""
    layers: list[tuple[str, DictConfig]] = []
    for file in files:
        layers.extend(_file_layers(Path(file), chain=()))
    for item in overrides:
        if "=" not in item:
            raise ConfigError("", f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
        try:
            layer = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise ConfigError("", f"cannot parse override {item!r}: {err}") from None
        layers.append((f"override {item!r}", layer))

    for origin, layer in layers:
        check_keys(schema, OmegaConf.to_container(layer, resolve=False), origin)

    combined = OmegaConf.merge(*(layer for _, layer in layers)) if layers else OmegaConf.create({})
    try:
        return OmegaConf.to_container(combined, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError("", f"cannot resolve interpolation: {err}") from None


def _file_layers(path: Path, chain: tuple[Path, ...]) -> list[tuple[str, DictConfig]]:
    """The layers of one YAML file: its bases first (recursively), then the file itself."""
    if not path.is_file():
        raise ConfigError("", f"config file {path} does not exist")
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(BASE_KEY, f"{path}: presets derive from each other in a cycle: {cycle}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: say which file
        raise ConfigError("", f"{path}: not valid YAML: {err}") from None
    if node is None or isinstance(node, ListConfig) or not isinstance(node, DictConfig):
        raise ConfigError("", f"{path}: a config file must hold a mapping of keys to values")
    layers = _base_layers(node, path, (*chain, resolved))
    layers.extend(_section_base_layers(node, path, (*chain, resolved), ()))
    layers.append((str(path), node))
    return layers


def _base_layers(node: DictConfig, path: Path, chain: tuple[Path, ...]) -> list[tuple[str, DictConfig]]:
    """Pop ``node``'s ``base:`` key and return the layers of the files it names."""
    layers: list[tuple[str, DictConfig]] = []
    bases = node.pop(BASE_KEY, None)
    if bases is not None:
        for base in [bases] if isinstance(bases, str) else list(bases):
            base_path = (path.parent / str(base)) if not Path(str(base)).is_absolute() else Path(str(base))
            layers.extend(_file_layers(base_path, chain))
    return layers


def _section_base_layers(node: DictConfig, path: Path, chain: tuple[Path, ...],
                         prefix: tuple[str, ...]) -> list[tuple[str, DictConfig]]:
    """The layers of ``base:`` keys inside sections of ``node``, each nested under its section's key."""
    layers: list[tuple[str, DictConfig]] = []
    for key in list(node.keys()):
        value = node[key]
        if not isinstance(value, DictConfig):
            continue
        section = (*prefix, str(key))
        for origin, layer in _base_layers(value, path, chain):
            for name in reversed(section):
                layer = OmegaConf.create({name: layer})
            layers.append((origin, layer))
        layers.extend(_section_base_layers(value, path, chain, section))
    return layers


def file_keys(path: str | Path) -> set[str]:
    """The top-level keys a YAML file sets, itself or through its ``base:`` chain."""
    return {str(key) for _, layer in _file_layers(Path(path), chain=()) for key in layer.keys()}


# ----------------------------------------------------------------------------- key checks


def check_keys(schema: type, data: Any, origin: str, prefix: str = "") -> None:
    """Raise on any key of ``data`` that ``schema`` does not have, suggesting the closest one."""
    if not isinstance(data, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(path, f"unknown key in {origin}{_suggest(str(key), fields, prefix)}")
        inner = _dataclass_in(_hints(schema)[key])
        if inner is not None:
            if isinstance(value, dict):
                check_keys(inner, value, origin, f"{path}.")
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    check_keys(inner, item, origin, f"{path}[{i}].")


def _suggest(key: str, fields: dict, prefix: str) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys here: {', '.join(prefix + name for name in fields)}"


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds, directly, in a list, or as Optional."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(schema: type) -> dict[str, Any]:
    if schema not in _HINTS:
        _HINTS[schema] = typing.get_type_hints(schema)
    return _HINTS[schema]


# ----------------------------------------------------------------------------- building


def build(schema: type[T], data: Any, prefix: str = "") -> T:
    """Build a ``schema`` instance from plain ``data``, type-checking each value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip("."), f"expected a mapping of keys for {schema.__name__}, got {data!r}")
    check_keys(schema, data, "config", prefix)
    hints = _hints(schema)
    kwargs = {}
    for field in dataclasses.fields(schema):
        if field.name in data:
            kwargs[field.name] = _convert(hints[field.name], data[field.name], f"{prefix}{field.name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{field.name}", "is required but not set; add it to the YAML or pass "
                              f"{prefix}{field.name}=... on the command line")
    try:
        return schema(**kwargs)
    except ConfigError as err:
        key = f"{prefix}{err.key}" if err.key else prefix.rstrip(".")
        raise ConfigError(key, err.message) from None


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:  # an optional section: its own error, with the key inside it (lora.rank)
            raise errors[0]
        raise ConfigError(key, " / ".join(err.message for err in errors))
    if origin is Literal:
        # By type too: True == 1 and 1.0 == 1, but zero.stage=true or 1.0 is a mistake, not stage 1.
        if any(value == arg and type(value) is type(arg) for arg in args):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.4)
        hint_text = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(key, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}{hint_text}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, f"{key}.")
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {value!r}; write it as [a, b] or as a YAML list")
        item_hint = args[0] if args else Any
        items = [_convert(item_hint, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {value!r}")
        value_hint = args[1] if len(args) == 2 else Any
        return {str(k): _convert(value_hint, v, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"must be a string, got {value!r}")
    raise TypeError(f"config field {key} has a type hataori.config cannot build: {hint!r}")


# ----------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict:
    """A plain, YAML-ready dict of a config (tuples become lists)."""
    return OmegaConf.to_container(OmegaConf.create(dataclasses.asdict(cfg)))


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, as recorded in run folders and outputs."""
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))


def split_items(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """A command's positionals as (YAML files, ``key=value`` overrides), order kept within each."""
    files, overrides = [], []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif item.endswith((".yaml", ".yml")):
            files.append(item)
        else:
            raise ConfigError("", f"{item!r} is neither a config file (.yaml) nor a key=value override")
    return files, overrides


def command_items(items: Sequence[str], shortcuts: dict[str, tuple[str, Any]],
                  prefix: str = "") -> tuple[list[str], list[str]]:
    """A command's YAML files and ``key=value`` overrides, with its flags: each flag is a documented
    shortcut for one key (``{"--run-dir": ("run_dir", args.run_dir)}``), applied as an exact
    override; a flag left unset (None) sets nothing. A key set both by its flag and by an override
    is refused, naming both: which one was meant is not for hataori to guess. ``prefix``: what the
    user wrote before the keys (``slurm.``), for the error."""
    files, overrides = split_items(items)
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    flags = []
    for flag, (key, value) in shortcuts.items():
        if value is None:
            continue
        if key in keys:
            raise ConfigError(f"{prefix}{key}", f"is set twice, by {flag} and by {prefix}{key}=...; keep one of them")
        flags.append(override(key, value))
    return files, flags + overrides


def override(key: str, value: Any) -> str:
    """A ``key=value`` override that sets ``value`` exactly (a path or list from a command-line flag;
    a float that is not finite in YAML's spelling, which JSON lacks)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key}={'.nan' if math.isnan(value) else '.inf' if value > 0 else '-.inf'}"
    return f"{key}={json.dumps(value)}"


def require(condition: bool, key: str, message: str) -> None:
    """``__post_init__`` helper: raise a :class:`ConfigError` for ``key`` unless ``condition``."""
    if not condition:
        raise ConfigError(key, message)


def int_list(minimum: int = 1):
    """An argparse type: comma-separated integers, each at least ``minimum``."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected integers of at least {minimum}, got {text!r}")
        return values

    return parse
