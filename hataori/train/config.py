"""The config of ``hataori pretrain``: one dataclass composing every component's config.

Presets live in ``configs/train/``: ``base.yaml`` holds the choices shared by every run, and each
size derives from it and takes its model section from ``configs/model/`` with a section base::

    base: base.yaml
    model:
      base: ../model/7b.yaml

What a preset cannot know (the dataset folders, the run folder) comes from the command line:
``data.datasets=[{path: data/shards/debian-ja}] run_dir=runs/7b``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from hataori.checkpoint.checkpointer import CheckpointConfig
from hataori.config import load, merged, require
from hataori.data.loader import DataConfig
from hataori.interop.load import InitConfig, shape_overrides
from hataori.model import ModelConfig
from hataori.model.lora import LoRAConfig
from hataori.train.metrics import LoggingConfig
from hataori.train.optim import OptimConfig, ScheduleConfig
from hataori.train.preference import PreferenceConfig
from hataori.train.trainer import TrainerConfig
from hataori.train.validate import ValidationConfig
from hataori.train.zero import ZeroConfig


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything ``hataori pretrain`` builds, and where the run lives."""

    run_dir: str
    """Folder of the run: config, environment, DeepSpeed JSON, checkpoints, logs. A run restarted with
    the same folder resumes from its latest complete checkpoint."""
    seed: int = 0
    """Seeds the model's initialisation and torch's generators (the data order has data.seed)."""
    tokenizer: str = ""
    """The tokenizer folder or .model file; empty: the one recorded in the first dataset's manifest.
    Its fingerprint must match the datasets'."""
    model: ModelConfig
    """The transformer; model.vocab_size must equal the tokenizer's vocabulary. With an init source
    its shape comes from the source (see hataori.interop.load)."""
    init: InitConfig = field(default_factory=InitConfig)
    """Initial weights: random, a transformers model folder (from_hf) or a hataori run (from_run)."""
    lora: LoRAConfig | None = None
    """Low-rank adapters on the init source's frozen weights (hataori.model.lora); absent: every
    weight trains. Checkpoints then hold the adapters and the train_also modules, not the base."""
    objective: Literal["pretrain", "sft", "dpo"] = "pretrain"
    """``pretrain``: next-token loss on every token of text datasets. ``sft`` (supervised fine-tuning, what
    ``hataori sft`` sets): the loss over the assistant tokens of conversation datasets (prepared with a
    chat template), per counted token across the global batch (hataori.train.trainer). ``dpo`` (what
    ``hataori dpo`` sets): the preference objective of ``preference`` on preference pairs, per pair across
    the global batch (hataori.train.preference)."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """The preference objective's loss and its beta (objective=dpo only)."""
    data: DataConfig
    """The training blend; validation reads the same datasets' validation split."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and gradient clipping."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule over trainer.max_steps."""
    zero: ZeroConfig
    """ZeRO stage, precision, offload and batch shape (global batch in tokens)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and resume."""
    trainer: TrainerConfig
    """How long to train."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Validation cadence and size."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console and TensorBoard logging."""

    def __post_init__(self) -> None:
        require(bool(self.run_dir), "run_dir", "no run folder; pass run_dir=runs/NAME")
        require(self.seed >= 0, "seed", f"must be non-negative, got {self.seed}")
        require(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
                f"{self.data.seq_len} tokens exceed model.max_seq_len={self.model.max_seq_len}; "
                "lower data.seq_len or raise model.max_seq_len")
        require(self.data.split == "train", "data.split",
                f"pretraining reads the train split (validation reads val on its own); got {self.data.split!r}")
        unit = self.zero.micro_batch_size * self.data.seq_len
        require(self.zero.global_batch_tokens % unit == 0, "zero.global_batch_tokens",
                f"{self.zero.global_batch_tokens} tokens is not a whole number of micro-batches of "
                f"zero.micro_batch_size * data.seq_len = {self.zero.micro_batch_size} * {self.data.seq_len} = "
                f"{unit} tokens; use a multiple of {unit} times the number of processes")
        self.schedule.check(peak_lr=self.optim.lr, total_steps=self.trainer.max_steps)


def load_train_config(files: Sequence[str | Path], overrides: Sequence[str]) -> TrainConfig:
    """The TrainConfig of YAML ``files`` and ``key=value`` ``overrides``, with the shape of the model
    named by ``init`` (if any) layered between them (:func:`hataori.interop.load.shape_overrides`)."""
    layer = shape_overrides(merged(TrainConfig, files, overrides))
    return load(TrainConfig, files, [*layer, *overrides])
