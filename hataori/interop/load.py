"""Where a run's initial weights come from, and the vocabulary growth of an extended tokenizer.

The ``init`` section of the training config::

    init:
      from_hf: models/llama          # a Llama-family model folder in transformers' layout
      from_run: runs/ja-base         # or: a hataori run (its latest complete checkpoint) or step folder
      base_tokenizer: ""             # the tokenizer the imported weights were trained with

With neither source, the model starts from random weights (``seed``). With one, the source fixes
the model's shape: :func:`shape_overrides` turns its ``config.json`` (or the run's recorded model
section) into ``model.*`` overrides that come after the presets and before the command line, so a
continued-pretraining preset names no shape. A command-line override that contradicts the source
is an error naming the field (:func:`open_source`). ``model.vocab_size`` follows the run's tokenizer
(which may extend the source's) and ``model.max_seq_len`` may be changed (it only sizes the rotary
tables).

Only weights come from the source; the optimizer, schedule and data position start afresh (to
continue a run where it stopped, launch it again with the same ``run_dir``). A run that finds a
complete checkpoint of its own resumes from it and does not read the source again.

Vocabulary growth. When the run's tokenizer extends the source's (its first pieces are the
base's, in order: ``hataori tokenizer extend`` makes such tokenizers), the input embedding and the
output projection grow. Each new row starts as the mean of the rows of the pieces the base
tokenizer splits the new piece's text into (Swallow's and Chinese-LLaMA's practice; the base's
dummy prefix is left out, so a piece without a leading space is not given the space's row). Rows
past the tokenizer, up to ``pad_vocab_multiple``, are zero: nothing reads them.

ZeRO-3. The model is built partitioned, and each process reads from the source only the elements
of its own partition of each weight (rows of a safetensors tensor, through its memory map), so no
process ever holds a whole copy of the model. ZeRO 0-2 build the whole model in every process
anyway and copy each weight whole. A ``from_run`` source is read one weight at a time in either
case: its checkpoint was partitioned for another world.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hataori.checkpoint.layout import CONFIG_FILE as RUN_CONFIG
from hataori.checkpoint.layout import PROVENANCE_FILE
from hataori.checkpoint.manifest import LORA_BASE, checksum, read_manifest
from hataori.checkpoint.record import model_config, read_config, run_tokenizer, tokenizer_path
from hataori.checkpoint.states import FP32, CheckpointWeights, resolve_checkpoint
from hataori.config import build, override, require
from hataori.errors import ConfigError, InputError
from hataori.interop.hf import CONFIG_FILE, HFCheckpoint, hf_name, hf_names, model_fields
from hataori.model.lora import LoRAConfig, apply_lora
from hataori.model.model import ModelConfig, Transformer
from hataori.tokenizer import proto as spm_proto
from hataori.tokenizer.chat import TEMPLATE_FILE, ChatTemplate
from hataori.tokenizer.model import Tokenizer

SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "rope_base", "norm_eps",
                "tie_embeddings", "qk_norm")
"""Model fields a source fixes; besides these it gives vocab_size (which may grow) and max_seq_len."""
SOURCE_FIELDS = (*SHAPE_FIELDS, "vocab_size", "max_seq_len")
SPACE_PIECE = "\u2581"
NONFINITE_SOURCE = "the source is damaged or its training diverged: start from another init source"


@dataclass(kw_only=True, slots=True)
class InitConfig:
    """The initial weights: random (no source), a transformers model folder, or a hataori run."""

    from_hf: str = ""
    """A Llama-family model folder in transformers' layout (config.json and safetensors weights)."""
    from_run: str = ""
    """A hataori run folder (its latest complete checkpoint) or one of its checkpoints/step_N folders."""
    base_tokenizer: str = ""
    """The SentencePiece tokenizer the source was trained with (default: from_hf's tokenizer.model, or
    the source run's tokenizer). Needed when the run's tokenizer extends it."""

    def __post_init__(self) -> None:
        require(not (self.from_hf and self.from_run), "from_hf",
                "init.from_hf and init.from_run are both set; choose one source of initial weights")

    @property
    def source(self) -> str:
        return self.from_hf or self.from_run


# ----------------------------------------------------------------------------- sources


class Source:
    """Weights to start from, addressed by hataori's names, with the fields of the model they fit."""

    kind = ""
    key = ""

    def __init__(self, path: str):
        self.path = Path(path)
        self.fields: dict[str, Any] = {}
        self._last: tuple[str, torch.Tensor] | None = None

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of our weight ``name``, as fp32."""
        raise NotImplementedError

    def default_tokenizer(self) -> str | None:
        raise NotImplementedError

    def check_vocabulary(self, tokenizer: Tokenizer) -> None:
        """Refuse a run ``tokenizer`` that is not the one the source was trained with, by what the source
        records of its tokenizer besides a tokenizer.model (which open_source compares itself)."""

    def describe(self) -> dict[str, Any]:
        """What provenance.json records of the source."""
        return {"from": self.kind, "path": str(self.path.resolve())}

    def fingerprint(self) -> str:
        """A digest of the source's weights as they are now, wherever they lie: equal for the same
        weights copied elsewhere, different for any changed byte (see the subclasses)."""
        raise NotImplementedError


class HFSource(Source):
    """A model folder in transformers' layout (:class:`hataori.interop.hf.HFCheckpoint`)."""

    kind, key = "hf", "init.from_hf"

    def __init__(self, path: str):
        super().__init__(path)
        self.checkpoint = HFCheckpoint(path)
        self.fields = model_fields(self.checkpoint.config, self.path / CONFIG_FILE)

    def check_weights(self, cfg, expected: dict[str, tuple[int, ...]]) -> None:
        """Every weight the model needs is there with its shape, and nothing else is."""
        names = hf_names(cfg)
        present = set(self.checkpoint.weight_map)
        ignored = {n for n in present if n.endswith("rotary_emb.inv_freq")}  # buffers older exports stored
        if cfg.tie_embeddings:
            ignored.add("lm_head.weight")
        missing = [theirs for theirs in names.values() if theirs not in present]
        if missing:
            raise InputError(self.path, f"has no weight {missing[0]} ({len(missing)} missing); it is not a "
                             "complete Llama checkpoint")
        extra = sorted(present - set(names.values()) - ignored)
        if extra:
            raise InputError(self.path, f"holds weights hataori's model cannot represent: {', '.join(extra[:4])}"
                             f"{' ...' if len(extra) > 4 else ''}; nothing is dropped silently")
        for ours, theirs in names.items():
            shape = self.checkpoint.shape(theirs)
            want = expected[ours]
            if ours.endswith(("tok_embeddings.weight", "lm_head.weight")):
                want = (self.fields["vocab_size"], *want[1:])
            if shape != want:
                raise InputError(self.path, f"weight {theirs} has shape {shape}, its config.json makes {want}")

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.checkpoint.rows(hf_name(name), start, stop).float()

    def default_tokenizer(self) -> str | None:
        path = self.path / "tokenizer.model"
        return str(path) if path.is_file() else None

    def check_vocabulary(self, tokenizer: Tokenizer) -> None:
        """A folder with a tokenizer.json (transformers' usual layout) and no tokenizer.model: its tokens must
        fit the embedding and be the run's tokenizer's pieces, id for id."""
        path = self.path / "tokenizer.json"
        if not path.is_file():
            return
        from tokenizers import Tokenizer as FastTokenizer

        try:
            fast = FastTokenizer.from_file(str(path))
        except Exception as err:  # the library's own parse errors
            raise InputError(path, f"cannot be read as a tokenizer.json ({err})") from None
        tokens = {i: token for token, i in fast.get_vocab(with_added_tokens=True).items()}
        rows = self.fields["vocab_size"]
        if len(tokens) > rows:
            raise InputError(path, f"has {len(tokens):,} tokens but its model {rows:,} embedding rows: the "
                             "tokenizer does not belong to the model")
        for i in range(min(rows, tokenizer.vocab_size)):
            ours = tokenizer.sp.id_to_piece(i)
            if tokens.get(i) != ours:
                raise ConfigError("tokenizer", f"{tokenizer.path} is not the tokenizer {self.key}={self.path} was "
                                  f"trained with: id {i} is {ours!r} there and {tokens.get(i)!r} in {path.name}; "
                                  "prepare the shards with the source's tokenizer")

    def describe(self) -> dict[str, Any]:
        config_bytes = (self.path / CONFIG_FILE).read_bytes()
        return {**super().describe(), "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
                "weight_files": sorted(set(self.checkpoint.weight_map.values()))}

    def fingerprint(self) -> str:
        """SHA-256 of config.json and of each weight file's name, size and CRC-32: every byte of the
        weights is read (about 1 s a GB from disk, a third of that from the page cache)."""
        files = {name: checksum(self.path / name, sync=False)
                 for name in sorted(set(self.checkpoint.weight_map.values()))}
        record = {"config": hashlib.sha256((self.path / CONFIG_FILE).read_bytes()).hexdigest(), "files": files}
        return "hf-" + hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


class RunSource(Source):
    """A hataori run's checkpoint (:class:`hataori.checkpoint.states.CheckpointWeights`)."""

    kind, key = "run", "init.from_run"

    def __init__(self, path: str):
        super().__init__(path)
        run = open_run(path)
        self.run_dir, self.checkpoint_dir, self.config = run.run_dir, run.checkpoint, run.config
        self.fields = {key: getattr(run.model_config, key) for key in SOURCE_FIELDS}
        self.weights = run.weights()  # a LoRA run's merged

    def check_weights(self, cfg, expected: dict[str, tuple[int, ...]]) -> None:
        for name, want in expected.items():
            stored = self.weights.tied.get(name, name)
            shape = self.weights.shapes.get(stored)
            vocab = name.endswith(("tok_embeddings.weight", "lm_head.weight"))
            if shape is None or (shape[1:] if vocab else shape) != (want[1:] if vocab else want):
                raise InputError(self.checkpoint_dir, f"weight {name} is {shape}, the model needs {want}: the "
                                 "checkpoint does not match its run's config")

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        name = self.weights.tied.get(name, name)
        if self._last is None or self._last[0] != name:  # one weight in memory at a time
            self._last = (name, self.weights.tensor(name))
        return self._last[1][start:stop]

    def default_tokenizer(self) -> str | None:
        """The run's tokenizer, where its files still are (else :meth:`check_vocabulary` checks by provenance)."""
        try:
            path = Path(tokenizer_path(self.config, None))
        except InputError:
            return None
        return str(path) if path.is_file() or (path / "tokenizer.model").is_file() else None

    def check_vocabulary(self, tokenizer: Tokenizer) -> None:
        """The run's provenance.json names the tokenizer it trained with, also when its files are gone."""
        path = self.run_dir / PROVENANCE_FILE
        if not path.is_file():
            return
        recorded = (json.loads(path.read_text(encoding="utf-8")).get("tokenizer") or {}).get("fingerprint")
        if recorded and recorded != tokenizer.fingerprint:
            raise ConfigError("tokenizer", f"{tokenizer.path} (fingerprint {tokenizer.fingerprint}) is not the "
                              f"tokenizer {self.key}={self.path} was trained with (fingerprint {recorded}, in {path}); "
                              "prepare the shards with that tokenizer, or name it as init.base_tokenizer if the "
                              "run's tokenizer extends it")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "checkpoint": str(self.checkpoint_dir.resolve()),
                "step": self.weights.client_state.get("step"),
                "tokens_seen": self.weights.client_state.get("tokens_seen")}

    def fingerprint(self) -> str:
        """SHA-256 of the checkpoint's manifest entries (each file's size and CRC-32, verified when the
        source was opened) and of the base its weights depend on, if it is a LoRA run: nothing is read again."""
        manifest = read_manifest(self.checkpoint_dir)
        record = {"files": manifest["files"], "base": manifest.get("identity", {}).get("lora.base")}
        return "run-" + hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def source_of(init: InitConfig) -> Source | None:
    """The source ``init`` names, opened (its config read, its weights indexed), or None."""
    if init.from_hf:
        return HFSource(init.from_hf)
    if init.from_run:
        return RunSource(init.from_run)
    return None


def shape_overrides(data: dict[str, Any]) -> list[str]:
    """``model.*`` overrides with the shape of the source that the merged config ``data`` names in
    its ``init`` section (none without a source); see the module docstring."""
    init = build(InitConfig, data.get("init") or {}, "init.")
    source = source_of(init)
    if source is None:
        return []
    fields = {**source.fields, "vocab_size": run_vocab_size(data) or source.fields["vocab_size"]}
    return [override(f"model.{key}", fields[key]) for key in SOURCE_FIELDS]


def run_vocab_size(data: dict[str, Any]) -> int | None:
    """The size of the run's tokenizer (``tokenizer``, else the first dataset's), which may extend
    the source's; None when it cannot be read here (the tokenizer check names it later)."""
    try:
        if data.get("tokenizer"):
            return Tokenizer(data["tokenizer"]).vocab_size
        datasets = (data.get("data") or {}).get("datasets") or []
        manifest = Path(datasets[0]["path"]) / "dataset.json"
        return int(json.loads(manifest.read_text(encoding="utf-8"))["tokenizer"]["vocab_size"])
    except (InputError, OSError, LookupError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- vocabulary growth


class VocabGrowth:
    """The pieces ``extended`` adds after ``base``'s, each with the base ids its text splits into."""

    def __init__(self, base, extended):
        base_proto = spm_proto.parse(base.proto, base.path)
        extended_proto = spm_proto.parse(extended.proto, extended.path)
        for i, (old, new) in enumerate(zip(base_proto.pieces, extended_proto.pieces)):
            if (old.piece, old.type) != (new.piece, new.type):
                raise ConfigError("tokenizer", f"{extended.path} does not extend {base.path}: piece {i} is "
                                  f"{new.piece!r} where the base has {old.piece!r}; use a tokenizer made with "
                                  "`hataori tokenizer extend` from the model's own tokenizer")
        self.base_size = len(base_proto.pieces)
        self.size = len(extended_proto.pieces)
        self.base_fingerprint = base.fingerprint
        # Split each new piece's text with the base, without the base's dummy prefix.
        base_proto.normalizer_spec.add_dummy_prefix = False
        import sentencepiece as spm

        splitter = spm.SentencePieceProcessor(model_proto=base_proto.SerializeToString())
        texts = [extended_proto.pieces[i].piece.replace(SPACE_PIECE, " ") for i in range(self.base_size, self.size)]
        self.splits = [ids if ids else [base.sp.unk_id()] for ids in splitter.encode(texts, out_type=int)]

    @property
    def added(self) -> int:
        return self.size - self.base_size

    def new_rows(self, source: Source, name: str, start: int, stop: int) -> torch.Tensor:
        """The starting rows of new ids ``start:stop`` of weight ``name``: means of their base rows."""
        wanted = self.splits[start - self.base_size:stop - self.base_size]
        ids = sorted({i for split in wanted for i in split})
        rows = {i: source.rows(name, i, i + 1)[0] for i in ids}
        return torch.stack([torch.stack([rows[i] for i in split]).mean(dim=0) for split in wanted])


# ----------------------------------------------------------------------------- checking and loading


@dataclass(slots=True)
class InitWeights:
    """Where the initial weights come from (a checked source) and how they become the model's (vocabulary growth)."""

    source: Source
    growth: VocabGrowth | None
    vocab_size: int

    def fingerprint(self) -> str:
        """What a LoRA run records of its frozen base: the source's weights (:meth:`Source.fingerprint`)
        and, when the vocabulary grew, the base tokenizer whose pieces the new rows start from."""
        digest = self.source.fingerprint()
        if self.growth is None:
            return digest
        extra = hashlib.sha256(f"{digest}/{self.growth.base_fingerprint}/{self.growth.size}".encode()).hexdigest()
        return f"{digest.partition('-')[0]}-grown-{extra[:16]}"

    def describe(self) -> dict[str, Any]:
        record = self.source.describe()
        if self.growth is not None:
            record["vocabulary"] = {"base": self.growth.base_size, "extended": self.growth.size,
                                    "new_rows": "mean of the base pieces' rows"}
        return record


def open_source(init: InitConfig, model, tokenizer) -> InitWeights | None:
    """The checked plan of starting ``model`` (a ModelConfig) with ``tokenizer`` (the run's) from the
    source ``init`` names; None without a source. Errors name the field that does not fit."""
    source = source_of(init)
    if source is None:
        return None
    for key in SHAPE_FIELDS:
        if getattr(model, key) != source.fields[key]:
            raise ConfigError(f"model.{key}", f"is {getattr(model, key)!r}, but {source.key}={source.path} has "
                              f"{source.fields[key]!r}; the source fixes the model's shape, drop the override")
    base_size = source.fields["vocab_size"]
    source.check_weights(model, model.weight_shapes())
    growth = None
    base_path = init.base_tokenizer or source.default_tokenizer()
    base = Tokenizer(base_path) if base_path else None
    if base is not None and base.vocab_size != base_size:
        raise ConfigError("init.base_tokenizer", f"{base.path} has {base.vocab_size} pieces, but the model of "
                          f"{source.key} has {base_size} embedding rows: the tokenizer does not belong to it")
    if model.vocab_size < base_size:
        raise ConfigError("model.vocab_size", f"is {model.vocab_size} (the run's tokenizer {tokenizer.path}), "
                          f"smaller than the {base_size} rows of {source.key}: the tokenizer does not belong to it")
    if base is not None:
        growth = VocabGrowth(base, tokenizer)  # also checks the run's tokenizer extends the base
        growth = growth if growth.added else None
    elif tokenizer is not None and model.vocab_size == base_size:
        source.check_vocabulary(tokenizer)
    elif model.vocab_size > base_size:
        raise ConfigError("init.base_tokenizer", f"the run's tokenizer has {model.vocab_size} pieces and "
                          f"{source.key} {base_size}: name the tokenizer the source was trained with, whose pieces "
                          "the run's tokenizer extends (new rows start from its pieces' rows)")
    return InitWeights(source=source, growth=growth, vocab_size=model.vocab_size)


def check_finite(tensor: torch.Tensor, name: str, where: str | Path, advice: str) -> torch.Tensor:
    """``tensor``, or an InputError naming ``where`` and the weight ``name`` when it holds a NaN or an inf."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InputError(where, f"weight {name} holds {bad:,} non-finite value{'s' * (bad != 1)} (NaN or inf) of "
                         f"{tensor.numel():,}; {advice}")
    return tensor


def target_rows(plan: InitWeights, name: str, start: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Rows ``start:stop`` of the weight ``name`` the model starts from (fp32); a non-finite source weight is
    an error naming it."""
    if not name.endswith(("tok_embeddings.weight", "lm_head.weight")):
        return check_finite(plan.source.rows(name, start, stop), name, plan.source.path, NONFINITE_SOURCE)
    base, vocab = plan.source.fields["vocab_size"], plan.vocab_size
    parts = []
    if start < min(stop, base):  # the source's own rows
        parts.append(check_finite(plan.source.rows(name, start, min(stop, base)), name, plan.source.path,
                                  NONFINITE_SOURCE))
    if max(start, base) < min(stop, vocab):  # the pieces the run's tokenizer adds
        parts.append(plan.growth.new_rows(plan.source, name, max(start, base), min(stop, vocab)))
    if max(start, vocab) < stop:  # padding rows
        parts.append(torch.zeros(stop - max(start, vocab), *shape[1:]))
    return torch.cat(parts)


def target_flat(plan: InitWeights, name: str, start: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Elements ``start:stop`` of the flattened weight ``name`` the model starts from."""
    row = 1
    for dim in shape[1:]:
        row *= dim
    first, last = start // row, -(-stop // row)
    return target_rows(plan, name, first, last, shape).reshape(-1)[start - first * row:stop - first * row]


@torch.no_grad()
def load_initial_weights(model: nn.Module, plan: InitWeights) -> None:
    """Copy the source's weights (grown, padded) into ``model``; under ZeRO-3 into this process's
    partition of each parameter only."""
    import torch.distributed as dist

    for name, param in model.named_parameters():
        if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank holds elements [rank * n, rank * n + n)
            shape = tuple(param.ds_shape)
            part = param.ds_tensor
            start = dist.get_rank() * part.numel()
            stop = min(start + part.numel(), param.ds_numel)
            part.zero_()
            if stop > start:
                part[:stop - start].copy_(target_flat(plan, name, start, stop, shape))
        else:
            shape = tuple(param.shape)
            param.copy_(target_rows(plan, name, 0, shape[0], shape).view(shape))


# ----------------------------------------------------------------------------- LoRA runs


def run_weights(run_dir: str | Path, checkpoint: str | Path, config: dict, tokenizer=None):
    """The plain model's weights of ``checkpoint`` of the run whose recorded config is ``config``: the
    checkpoint's own (:class:`CheckpointWeights`), or for a LoRA run its base's with the adapters
    folded in (:class:`LoRAWeights`). ``tokenizer``: the run's, where the caller has it already. A config
    whose model differs from the one the checkpoint's manifest records is refused (the manifest is what
    trained)."""
    check_recorded_model(Path(run_dir), Path(checkpoint), config)
    weights = (LoRAWeights(run_dir, checkpoint, config, tokenizer) if config.get("lora")
               else CheckpointWeights(checkpoint))
    check_weight_shapes(weights, model_config(config), Path(run_dir), Path(checkpoint))
    return weights


def check_weight_shapes(weights: CheckpointWeights | LoRAWeights, cfg: ModelConfig, run_dir: Path,
                        checkpoint: Path) -> None:
    """Refuse weights that are not those of the model ``cfg`` builds: a missing, unexpected or
    differently shaped one (a config.yaml from another run, or edited where the manifest records nothing)."""
    expected = cfg.weight_shapes()
    found = {name: weights.shapes.get(weights.tied.get(name, name)) for name in expected}
    problems = [f"weight {name} is missing" if shape is None else f"weight {name} has shape {shape}, the "
                f"config makes {expected[name]}" for name, shape in found.items() if shape != expected[name]]
    problems += [f"it holds a weight {name} the config's model has not" for name in weights.shapes
                 if name not in expected]
    if problems:
        raise InputError(checkpoint, f"{problems[0]}{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}"
                         f": the checkpoint and {run_dir / RUN_CONFIG} do not belong together; restore the "
                         "config.yaml the run trained with")


def check_recorded_model(run_dir: Path, checkpoint: Path, config: dict) -> None:
    """Refuse a run's config.yaml whose model fields differ from those ``checkpoint``'s manifest recorded."""
    saved = read_manifest(checkpoint).get("identity", {})
    cfg = model_config(config)
    differences = [f"model.{key}: config.yaml {getattr(cfg, key)!r}, the checkpoint {saved[f'model.{key}']!r}"
                   for key in ("vocab_size", *SHAPE_FIELDS)
                   if f"model.{key}" in saved and saved[f"model.{key}"] != getattr(cfg, key)]
    if differences:
        raise InputError(run_dir / RUN_CONFIG, f"does not describe the model that {checkpoint.name} was trained as "
                         f"({'; '.join(differences)}): it was edited after training; restore it (the checkpoint's "
                         "manifest.json records what trained)")


class LoRAWeights:
    """The weights of a LoRA run's checkpoint, served like :class:`CheckpointWeights` under the plain
    model's names.

    A LoRA checkpoint holds the adapters (``blocks.0.attn.wq.lora_A``...) and the ``train_also``
    modules; the frozen base is the run's init source (its ``config.yaml``'s ``init`` section, with
    the vocabulary growth pretraining applied), whose fingerprint must still be the one the checkpoint's
    manifest recorded. :meth:`tensor` gives an adapted weight merged, ``W + scaling * B A`` in fp32; a
    trained module's weight from the checkpoint; any other weight from the base. :meth:`base_tensor`
    and :meth:`adapter` give the unmerged parts (``hataori export hf --adapter``).
    """

    def __init__(self, run_dir: str | Path, checkpoint: str | Path, config: dict, tokenizer=None):
        self.path = Path(checkpoint)
        self.trained = CheckpointWeights(checkpoint)
        self.config = model_config(config)
        self.lora = build(LoRAConfig, config["lora"], "lora.")
        recorded = Path(run_dir) / RUN_CONFIG
        tokenizer = tokenizer or run_tokenizer(Path(run_dir), config, None, self.config.vocab_size)
        self.base = open_source(build(InitConfig, config.get("init") or {}, "init."), self.config, tokenizer)
        if self.base is None:
            raise InputError(recorded, "has a lora section but no init source: the run's base is unknown")
        expected = read_manifest(self.path).get("identity", {}).get(LORA_BASE)
        found = self.base.fingerprint()
        if expected != found:
            raise InputError(self.path, f"was trained on the base {self.base.source.key}={self.base.source.path} with "
                             f"fingerprint {expected}, but that base now has fingerprint {found}: its weights "
                             "changed. Put the original base back there (or set init in "
                             f"{recorded} to where it is now)")
        with torch.device("meta"):  # names and shapes only
            self.model = Transformer(self.config)
            self.adapted = set(apply_lora(self.model, self.lora))
        self.shapes = {name: tuple(p.shape) for name, p in self.model.named_parameters()
                       if not name.endswith((".lora_A", ".lora_B"))}
        self.tied = {"lm_head.weight": "tok_embeddings.weight"} if self.config.tie_embeddings else {}
        self.client_state = self.trained.client_state
        self.states = self.trained.states

    def base_tensor(self, name: str) -> torch.Tensor:
        """The frozen base's weight ``name`` (grown to the run's vocabulary) as fp32."""
        name = self.tied.get(name, name)
        shape = self.shapes[name]
        return target_rows(self.base, name, 0, shape[0], shape).reshape(shape)

    def adapter(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The trained (A, B) of the adapted linear layer ``module`` (``blocks.0.attn.wq``), fp32."""
        return self.trained.tensor(f"{module}.lora_A"), self.trained.tensor(f"{module}.lora_B")

    def tensor(self, name: str, key: str = FP32) -> torch.Tensor:
        """Weight ``name`` (or a name tied to it) of the merged model, as a new fp32 tensor."""
        if key != FP32:
            raise KeyError(f"{self.path}: a LoRA run's merged weights have no optimizer state {key!r}")
        name = self.tied.get(name, name)
        if name not in self.shapes:
            raise KeyError(f"{self.path} holds no weight {name!r}")
        module = name.removesuffix(".weight")
        if module in self.adapted:
            a, b = self.adapter(module)
            return self.base_tensor(name) + self.lora.scaling * (b @ a)  # (out, r) @ (r, in)
        if name in self.trained.shapes:
            return self.trained.tensor(name)
        return self.base_tensor(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every merged weight as fp32, tied names included (all in memory: for small models)."""
        state = {name: self.tensor(name) for name in self.shapes}
        state.update({alias: state[target] for alias, target in self.tied.items() if target in state})
        return state


# ----------------------------------------------------------------------------- a run, opened for a command


@dataclass
class OpenRun:
    """A run's checkpoint, opened for what reads a finished run (generate, eval, export hf, init.from_run):
    the checkpoint resolved and verified against its manifest, the run's config read; its tokenizer, weights
    and model on demand."""

    run_dir: Path
    checkpoint: Path
    """Its ``checkpoints/step_N`` folder."""
    config: dict[str, Any]
    """The run's config.yaml."""

    @property
    def model_config(self) -> ModelConfig:
        return model_config(self.config)

    def tokenizer(self, override: str | None = None) -> Tokenizer:
        """The tokenizer the run trained with (``override``: another path to it, checked to be the same)."""
        return run_tokenizer(self.run_dir, self.config, override, self.model_config.vocab_size)

    def chat_template(self) -> ChatTemplate | None:
        """The chat template a fine-tuning run trained with (``chat_template.jinja`` in the run folder), or None."""
        path = self.run_dir / TEMPLATE_FILE
        return ChatTemplate.load(path) if path.is_file() else None

    def weights(self, tokenizer: Tokenizer | None = None) -> CheckpointWeights | LoRAWeights:
        """The plain model's weights (:func:`run_weights`); ``tokenizer``: the run's, where the caller has it."""
        return run_weights(self.run_dir, self.checkpoint, self.config, tokenizer)

    def model(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model in eval mode, its parameters in ``dtype`` (:func:`inference_model`); a non-finite weight
        is refused, naming it."""
        model = self.model_config.build()
        state = self.weights().state_dict()
        for name, value in state.items():
            check_finite(value, name, self.checkpoint, "this checkpoint is not healthy: use an earlier one "
                         "(its checkpoints/step_N folder)")
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
        if set(missing) - tied or unexpected:
            raise InputError(self.checkpoint, f"weights do not match the recorded model config: missing "
                             f"{sorted(missing)}, unexpected {sorted(unexpected)}")
        return inference_model(model, device, dtype)


def open_run(path: str | Path, step: int | None = None) -> OpenRun:
    """A run folder (its latest complete checkpoint, or ``step``'s) or one ``checkpoints/step_N`` folder."""
    run_dir, checkpoint = resolve_checkpoint(path, step)
    return OpenRun(run_dir, checkpoint, read_config(run_dir))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The fp32 model of a run's checkpoint (see :func:`open_run`), in eval mode, and the run's config."""
    run = open_run(path)
    return run.model(device), run.config


def inference_model(model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """``model`` on ``device`` in eval mode, its parameters in ``dtype`` and its rotary tables in fp32, as
    training computes them (DeepSpeed casts the parameters only)."""
    model = model.to(device=device, dtype=dtype).eval()
    if dtype != torch.float32:
        model.reset_rope_tables()
    return model
