"""Preference optimisation in the pretraining loop: DPO against reference log-probabilities kept in the run
folder, and SimPO, which needs no reference (``objective=dpo``, ``hataori dpo``).

Pairs
    A preference dataset (``hataori data prepare --chat-template ... preference=true``) holds each pair as two
    consecutive documents, chosen then rejected. :class:`hataori.data.examples.PairLoader` packs whole pairs
    into rows (chosen and rejected one after the other, each its own segment, so neither attends to the
    other) and its batches say which pairs each row holds.

Log-probabilities
    A sequence's log-probability is the sum of ``log p(target)`` over the targets its loss mask marks (the
    answer's assistant turns; the prompt and the template's markup do not count): the model's per-position
    cross-entropy (``reduction="none"``), summed per segment.

Losses (``preference.loss``)
    ``sigmoid`` (DPO): with the policy's log-probabilities ``pi_c, pi_r`` and the reference's ``ref_c, ref_r``,
    rewards ``r_c = beta * (pi_c - ref_c)`` and ``r_r = beta * (pi_r - ref_r)``, and the loss
    ``-log sigmoid(r_c - r_r)``. ``simpo`` (SimPO, reference-free): rewards ``beta`` times each answer's mean
    log-probability per counted token, and the loss ``-log sigmoid(r_c - r_r - gamma)``. Either way the
    step's loss is the mean over its pairs, whatever the packing, accumulation and processes: a batch
    counts its pairs and the step's (``loss_tokens``, ``step_loss_tokens``) and the trainer scales as it
    does for supervised fine-tuning's tokens (:mod:`hataori.train.trainer`).

Logged (TRL's names, means over the step's pairs)
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (``r_c - r_r``), ``rewards/accuracies``
    (the share of pairs with ``r_c > r_r``), ``logps/chosen``, ``logps/rejected``: to metrics.jsonl and
    TensorBoard (``train/rewards/chosen`` ...).

Reference
    Computed once, before the first step, by the model training starts from (the init source; with LoRA the
    adapters are still zero, so the base model), in the run's precision, over every pair of the training
    datasets, in eval mode and without gradients; the rows are dealt out to the ranks, so ZeRO-3 needs no
    second model. Kept in ``<run_dir>/reference/`` (``reference.json`` and one ``.npy`` a dataset, (pairs,
    2) float32: chosen, rejected), written whole or not at all. A resumed run reads it back; a run with a
    checkpoint but no reference (or one made for other datasets) is refused, since the weights it came
    from are gone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hataori.config import require, to_dict
from hataori.data.batch import Batch
from hataori.data.examples import pack
from hataori.data.shards import Dataset
from hataori.errors import HataoriError
from hataori.fsutil import atomic_path
from hataori.model import IGNORE_INDEX
from hataori.train.validate import eval_mode

REFERENCE_DIR = "reference"
REFERENCE_FILE = "reference.json"
REFERENCE_VERSION = 1
STATS = ("pairs", "rewards/chosen", "rewards/rejected", "correct", "logps/chosen", "logps/rejected")
"""The sums a micro-batch returns (summed over the step's micro-batches and ranks, then divided by pairs)."""


@dataclass(kw_only=True, slots=True)
class PreferenceConfig:
    """The preference objective (``objective=dpo``)."""

    loss: Literal["sigmoid", "simpo"] = "sigmoid"
    """``sigmoid``: DPO against the reference; ``simpo``: SimPO, length-normalised and reference-free."""
    beta: float = 0.1
    """How far the policy may move from the reference (DPO; TRL's default 0.1), or the reward scale (SimPO,
    whose authors use about 2 to 10)."""
    gamma: float = 0.5
    """SimPO's target reward margin (TRL's ``simpo_gamma``); unused by ``sigmoid``."""

    def __post_init__(self) -> None:
        require(self.loss in ("sigmoid", "simpo"), "loss", f"must be sigmoid or simpo, got {self.loss!r}")
        require(self.beta > 0, "beta", f"must be positive, got {self.beta}")
        require(self.gamma >= 0, "gamma", f"must be >= 0, got {self.gamma}")

    @property
    def needs_reference(self) -> bool:
        return self.loss == "sigmoid"


def segment_logps(model: Callable[..., torch.Tensor], inputs: torch.Tensor, doc_ids: torch.Tensor,
                  targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and segment (B, T): the summed log-probability of the counted targets, and their number."""
    losses = model(inputs, doc_ids=doc_ids, targets=targets, reduction="none")  # (B, T) fp32
    index = doc_ids.long()
    logps = torch.zeros_like(losses).scatter_add(1, index, -losses)
    counted = torch.zeros_like(losses).scatter_add(1, index, (targets != IGNORE_INDEX).to(losses.dtype))
    return logps, counted


def pair_columns(values: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen and the rejected segments' values (B, pairs) of per-segment ``values`` (B, S)."""
    return values[:, 0:2 * pairs:2], values[:, 1:2 * pairs:2]


def preference_loss(cfg: PreferenceConfig, logps: torch.Tensor, counted: torch.Tensor, pairs: torch.Tensor,
                    reference: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair slot (B, P), from per-segment ``logps`` and ``counted`` and the pooled pair indices ``pairs``
    (-1: no pair): the losses, the chosen and rejected rewards, and the policy's (chosen, rejected)
    log-probabilities stacked (2, B, P). Slots without a pair hold zeros."""
    valid = pairs >= 0
    pi_c, pi_r = pair_columns(logps, pairs.shape[1])
    if cfg.loss == "sigmoid":
        ref = reference[pairs.clamp(min=0)]  # (B, P, 2)
        r_c, r_r = cfg.beta * (pi_c - ref[..., 0]), cfg.beta * (pi_r - ref[..., 1])
        logits = r_c - r_r
    else:
        n_c, n_r = pair_columns(counted, pairs.shape[1])
        r_c, r_r = cfg.beta * pi_c / n_c.clamp(min=1), cfg.beta * pi_r / n_r.clamp(min=1)
        logits = r_c - r_r - cfg.gamma
    zero = torch.zeros_like(logits)
    losses = torch.where(valid, -F.logsigmoid(logits), zero)
    return (losses, torch.where(valid, r_c, zero), torch.where(valid, r_r, zero),
            torch.stack([torch.where(valid, pi_c, zero), torch.where(valid, pi_r, zero)]))


class PreferenceObjective:
    """The trainer's loss of one micro-batch of pairs (:meth:`__call__`) and the step's logged means."""

    def __init__(self, cfg: PreferenceConfig, reference: torch.Tensor | None):
        if cfg.needs_reference and reference is None:
            raise ValueError(f"preference.loss={cfg.loss} needs the reference log-probabilities")
        self.cfg, self.reference = cfg, reference

    def __call__(self, engine: Any, batch: Batch, tensor: Callable[[np.ndarray], torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss over the batch's pairs (0, with a graph, if it holds none) and its sums (:data:`STATS`)."""
        pairs = tensor(batch.pairs)
        logps, counted = segment_logps(engine, tensor(batch.inputs), tensor(batch.doc_ids()), tensor(batch.targets))
        losses, r_c, r_r, pi = preference_loss(self.cfg, logps, counted, pairs, self.reference)
        n = int(batch.loss_tokens)
        loss = losses.sum() / n if n else logps.sum() * 0.0
        valid = pairs >= 0
        sums = torch.stack([torch.tensor(float(n), device=losses.device), r_c.sum(), r_r.sum(),
                            ((r_c > r_r) & valid).sum().float(), pi[0].sum(), pi[1].sum()]).detach().double()
        return loss, sums

    @staticmethod
    def means(sums: torch.Tensor) -> dict[str, float]:
        """The step's logged means from its summed :data:`STATS` (all ranks, all micro-batches)."""
        values = dict(zip(STATS, sums.tolist()))
        n = max(values.pop("pairs"), 1.0)
        correct = values.pop("correct")
        means = {name: value / n for name, value in values.items()}
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        means["rewards/accuracies"] = correct / n
        return means


# ----------------------------------------------------------------------------- the reference


def compute_reference(model: Callable[..., torch.Tensor], datasets: list[Dataset], *, seq_len: int,
                      batch_size: int, device: torch.device, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Each dataset's pairs' (chosen, rejected) summed log-probabilities under ``model`` (a module or a
    DeepSpeed engine), (pairs, 2) float32 the same on every rank. Every rank must call it: the rows are dealt
    out (``batch_size`` a pass), each rank runs as many passes (ZeRO-3 gathers in each) and the results are
    summed."""
    found = []
    for data in datasets:
        examples = [(data.doc(j), data.doc_mask(j), 0) for j in range(len(data))]
        rows, placed = pack(examples, seq_len=seq_len, pad_id=data.eos_id, group=2)
        result = torch.zeros((placed, 2), dtype=torch.float64, device=device)
        per_pass = batch_size * world_size
        passes = -(-len(rows.inputs) // per_pass)
        doc_ids = np.cumsum(rows.positions == 0, axis=1, dtype=np.int64) - 1
        with eval_mode(model):
            for k in range(passes):
                part = slice(k * per_pass + rank * batch_size, k * per_pass + (rank + 1) * batch_size)
                inputs, targets, docs, units = (a[part] for a in (rows.inputs, rows.targets, doc_ids, rows.units))
                if not len(inputs):  # nothing left for this rank: a pass that counts nothing
                    inputs = np.full((1, seq_len), data.eos_id, np.int64)
                    targets = np.full((1, seq_len), IGNORE_INDEX, np.int64)
                    docs, units = np.zeros((1, seq_len), np.int64), np.full((1, 1), -1, np.int64)
                tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (inputs, docs, targets)]
                logps, _ = segment_logps(model, *tensors)
                chosen, rejected = pair_columns(logps, units.shape[1])
                units_t = torch.from_numpy(units).to(device)
                valid = units_t >= 0
                result[units_t[valid], 0] = chosen[valid].double()
                result[units_t[valid], 1] = rejected[valid].double()
        if dist.is_initialized() and world_size > 1:
            dist.all_reduce(result)
        found.append(result.float().cpu().numpy())
    return found


def reference_key(datasets: list[Dataset], *, precision: str, init: Any) -> dict:
    """What a reference was computed for: the datasets (by fingerprint), the precision and the init source."""
    return {"version": REFERENCE_VERSION, "precision": precision, "init": to_dict(init),
            "datasets": [{"path": str(d.path), "fingerprint": d.fingerprint, "pairs": len(d) // 2} for d in datasets]}


def load_reference(run_dir: Path, key: dict) -> list[np.ndarray] | None:
    """The reference kept in ``run_dir`` for ``key``, or None when there is none or it was made for another."""
    folder = run_dir / REFERENCE_DIR
    if not (folder / REFERENCE_FILE).is_file():
        return None
    saved = json.loads((folder / REFERENCE_FILE).read_text(encoding="utf-8"))
    if {k: v for k, v in saved.items() if k != "files"} != key:
        return None
    arrays = [np.load(folder / name) for name in saved["files"]]
    for array, entry in zip(arrays, key["datasets"]):
        if array.shape != (entry["pairs"], 2):
            raise HataoriError(f"{folder}: {entry['path']}'s reference holds {array.shape[0]} pairs, the dataset "
                               f"{entry['pairs']}; the folder was damaged: start the run again in a new folder")
    return arrays


def save_reference(run_dir: Path, key: dict, arrays: list[np.ndarray]) -> None:
    files = [f"dataset-{i}.npy" for i in range(len(arrays))]
    with atomic_path(run_dir / REFERENCE_DIR, is_dir=True) as tmp:
        for name, array in zip(files, arrays):
            np.save(tmp / name, array)
        (tmp / REFERENCE_FILE).write_text(json.dumps({**key, "files": files}, indent=1) + "\n", encoding="utf-8")


def ensure_reference(run_dir: Path, key: dict, *, resuming: bool, compute: Callable[[], list[np.ndarray]],
                     is_main: bool, device: torch.device) -> torch.Tensor:
    """The pooled (pairs, 2) reference on ``device``: the one kept in ``run_dir`` for ``key``, or, for a run with
    no checkpoint yet, ``compute()`` (every rank) kept there by rank 0. A resumed run (``resuming``) without it
    is refused. Every rank must call it."""
    arrays = load_reference(run_dir, key)
    if arrays is None:
        if resuming:
            raise HataoriError(f"{run_dir}: the run has checkpoints but no reference log-probabilities for these "
                               f"datasets in {run_dir / REFERENCE_DIR} (the weights they came from are gone); train "
                               "on the datasets the run started with, or start the run in a new folder")
        arrays = compute()
        if is_main:
            save_reference(run_dir, key, arrays)
        if dist.is_initialized():
            dist.barrier()
    return torch.from_numpy(np.concatenate(arrays)).to(device)
