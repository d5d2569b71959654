"""The training data loader: blends prepared datasets by weight and packs documents into
fixed-length sequences, in an order fully determined by the seed, resumable from a small state.

Order
    Each dataset is read in a fresh seeded permutation of its documents every epoch (the
    permutation is keyed by the seed, the dataset's fingerprint and the epoch). Which dataset
    supplies the next document is a seeded draw, made in blocks of :data:`DRAW_BLOCK` from
    ``default_rng([seed, block])``, with probabilities ``weight / mean document length``: the
    weights are shares of *tokens*, not of documents. A dataset that runs out starts its next
    epoch on its own; the blend never stops.

Packing
    The chosen documents, each ending in EOS, form one token stream. Sequence ``j`` is the
    ``seq_len + 1`` stream tokens starting at ``j * seq_len``: ``inputs`` are its first
    ``seq_len``, ``targets`` its last ``seq_len``. Consecutive sequences overlap by one token, so
    every stream token but the first is a target exactly once and nothing is dropped; documents run
    on across sequence boundaries.

Document boundaries
    A document's segment is the EOS that precedes it (which thus acts as its BOS) and its tokens up
    to, not including, its own EOS; its targets are its tokens and its EOS. So every target is
    predicted from its own document only. ``Batch.positions`` gives each input token's position in
    its segment (0 at a segment start, and at the start of every sequence);
    :meth:`Batch.cu_seqlens` turns that into the cumulative lengths that varlen attention kernels
    take. Per-document masking: token ``t`` may attend to ``s <= t`` iff no segment starts in
    ``(s, t]``.

Data parallelism
    All ranks walk the same global stream. Each batch step covers ``world_size * batch_size``
    sequences; rank ``r`` takes the ``r``-th block of ``batch_size`` of them, copying only its own
    tokens. The state after a step is therefore the same on every rank (save it from rank 0), and
    can be restored with another ``world_size`` or ``batch_size``.

The state (:meth:`PackedLoader.state_dict`) is a small JSON-ready dict: the datasets' fingerprints,
the seed, each dataset's epoch and position in its permutation, the number of draws, and the
document being packed with the offset reached in it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from hataori.config import require
from hataori.errors import HataoriError
from hataori.tokenizer.shards import Dataset

STATE_VERSION = 1
DRAW_BLOCK = 4096


@dataclass(kw_only=True, slots=True)
class DatasetSpec:
    """One prepared dataset in a blend."""

    path: str
    """A folder written by ``hataori data prepare``."""
    weight: float = 1.0
    """Relative share of this dataset's tokens in the blend."""

    def __post_init__(self):
        require(bool(self.path), "path", "must name a dataset folder from `hataori data prepare`")
        require(self.weight > 0, "weight", f"must be positive, got {self.weight}")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """What the training loop reads."""

    datasets: list[DatasetSpec] = field(default_factory=list)
    """Prepared datasets and their weights."""
    seq_len: int = 2048
    """Tokens per training sequence (inputs; each sequence reads one more for the targets)."""
    seed: int = 0
    """Seeds the document permutations and the blend draws."""
    split: Literal["train", "val"] = "train"
    """Which split of the datasets to read."""

    def __post_init__(self):
        require(len(self.datasets) > 0, "datasets", "no datasets; list them as [{path: DIR, weight: 1.0}, ...]")
        require(self.seq_len >= 1, "seq_len", f"must be positive, got {self.seq_len}")
        require(self.seed >= 0, "seed", f"must be non-negative, got {self.seed}")

    def build(self, batch_size: int, rank: int = 0, world_size: int = 1,
              tokenizer_fingerprint: str | None = None) -> "PackedLoader":
        """Open the datasets and return the loader of data-parallel ``rank`` of ``world_size``."""
        datasets = [Dataset(spec.path, self.split, tokenizer_fingerprint) for spec in self.datasets]
        return PackedLoader(datasets, [spec.weight for spec in self.datasets], seq_len=self.seq_len,
                            batch_size=batch_size, seed=self.seed, rank=rank, world_size=world_size)


@dataclass(slots=True)
class Batch:
    """One rank's batch. All arrays are (batch_size, seq_len)."""

    inputs: np.ndarray
    """Token ids fed to the model (int64)."""
    targets: np.ndarray
    """The id each input position must predict: the next stream token (int64)."""
    positions: np.ndarray
    """Position of each input token in its document segment (int32); 0 starts a segment."""
    sources: np.ndarray
    """Index of the dataset each input token came from (uint8), for per-source loss logs."""

    def segment_starts(self) -> np.ndarray:
        """(batch_size, seq_len) bool: where a document segment starts."""
        return self.positions == 0

    def cu_seqlens(self) -> np.ndarray:
        """Cumulative segment lengths over the flattened batch (int32), starting at 0 and ending at
        ``batch_size * seq_len``: the ``cu_seqlens`` of varlen attention kernels."""
        starts = np.flatnonzero(self.segment_starts().ravel())
        return np.append(starts, self.inputs.size).astype(np.int32)


class PackedLoader:
    """Blends ``datasets`` by ``weights`` and yields packed :class:`Batch` es forever."""

    def __init__(self, datasets: list[Dataset], weights: list[float], *, seq_len: int, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if not datasets or len(datasets) != len(weights):
            raise ValueError("need one weight per dataset and at least one dataset")
        if len(datasets) > 255:
            raise HataoriError(f"{len(datasets)} datasets in one blend; at most 255 are supported")
        if not 0 <= rank < world_size:
            raise HataoriError(f"rank {rank} is not in [0, world_size={world_size})")
        if seq_len < 1 or batch_size < 1:
            raise HataoriError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        tokenizers = {d.tokenizer_fingerprint for d in datasets}
        if len(tokenizers) > 1:
            listing = ", ".join(f"{d.path} ({d.tokenizer_fingerprint})" for d in datasets)
            raise HataoriError(f"the datasets of a blend must share one tokenizer, but they were encoded with "
                               f"different ones: {listing}; re-encode them with the same tokenizer")
        for d in datasets:
            if d.num_docs == 0:
                raise HataoriError(f"{d.path}: the {d.split} split holds no documents; prepare it with more "
                                   "input (or a larger val_fraction/val_docs), or leave it out of the blend")
        self.datasets = datasets
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.fingerprints = [d.fingerprint for d in datasets]
        mean_lengths = np.array([d.num_tokens / d.num_docs for d in datasets])
        share = np.asarray(weights, dtype=np.float64) / mean_lengths
        self.probabilities = share / share.sum()

        self._epoch = [0] * len(datasets)
        self._position = [0] * len(datasets)
        self._draws = 0
        self._cursor: tuple[int, int] | None = None  # (dataset, document) being packed
        self._offset = 0  # next unread token of that document
        self._tokens = 0  # stream tokens consumed
        self._doc: np.ndarray = np.empty(0, np.int64)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        self._block: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------------- order

    def _choices(self, block: int) -> np.ndarray:
        if self._block is None or self._block[0] != block:
            if len(self.datasets) == 1:
                picks = np.zeros(DRAW_BLOCK, dtype=np.int64)
            else:
                rng = np.random.default_rng([self.seed, block])
                picks = rng.choice(len(self.datasets), size=DRAW_BLOCK, p=self.probabilities)
            self._block = (block, picks)
        return self._block[1]

    def permutation(self, d: int, epoch: int) -> np.ndarray:
        """The order in which dataset ``d`` is read in ``epoch``."""
        cached = self._perms.get(d)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, int(self.fingerprints[d], 16), epoch])
            cached = (epoch, rng.permutation(self.datasets[d].num_docs))
            self._perms[d] = cached
        return cached[1]

    def _next_doc(self) -> None:
        d = int(self._choices(self._draws // DRAW_BLOCK)[self._draws % DRAW_BLOCK])
        self._draws += 1
        doc = int(self.permutation(d, self._epoch[d])[self._position[d]])
        self._position[d] += 1
        if self._position[d] == self.datasets[d].num_docs:
            self._epoch[d] += 1
            self._position[d] = 0
        self._cursor = (d, doc)
        self._offset = 0
        self._doc = self.datasets[d].doc(doc)

    # ------------------------------------------------------------------------- packing

    def _read(self, n: int, out: np.ndarray | None = None, ends: np.ndarray | None = None,
              sources: np.ndarray | None = None) -> None:
        """Advance the stream by ``n`` tokens, copying them to ``out`` (marking document ends in
        ``ends`` and the dataset in ``sources``) when given."""
        filled = 0
        while filled < n:
            if self._offset == len(self._doc):
                self._next_doc()
            take = min(n - filled, len(self._doc) - self._offset)
            if out is not None:
                out[filled:filled + take] = self._doc[self._offset:self._offset + take]
                sources[filled:filled + take] = self._cursor[0]
                if self._offset + take == len(self._doc):
                    ends[filled + take - 1] = True
            self._offset += take
            filled += take
        self._tokens += n

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        span = self.batch_size * self.seq_len
        tokens = np.empty(span + 1, dtype=np.int64)
        ends = np.zeros(span + 1, dtype=bool)
        sources = np.empty(span + 1, dtype=np.uint8)
        self._read(self.rank * span)
        self._read(span, tokens, ends, sources)
        if self._offset == len(self._doc):  # the target of the last input opens the next document
            self._next_doc()
        tokens[span] = self._doc[self._offset]
        self._read((self.world_size - self.rank - 1) * span)

        shape = (self.batch_size, self.seq_len)
        starts = ends[:span].reshape(shape).copy()  # an input EOS opens the next document's segment
        starts[:, 0] = True
        index = np.arange(self.seq_len, dtype=np.int32)
        last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
        return Batch(inputs=tokens[:span].reshape(shape), targets=tokens[1:].reshape(shape),
                     positions=(index - last_start).astype(np.int32), sources=sources[:span].reshape(shape))

    # ------------------------------------------------------------------------- state

    @property
    def epochs(self) -> list[int]:
        """The epoch each dataset is in."""
        return list(self._epoch)

    def state_dict(self) -> dict:
        """Where the loader stands, as a small JSON-ready dict (the same on every rank)."""
        return {"version": STATE_VERSION, "seed": self.seed, "draws": self._draws, "tokens": self._tokens,
                "datasets": [{"fingerprint": fp, "epoch": e, "position": p}
                             for fp, e, p in zip(self.fingerprints, self._epoch, self._position)],
                "cursor": None if self._cursor is None else
                {"dataset": self._cursor[0], "document": self._cursor[1], "offset": self._offset}}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that saved ``state`` stopped."""
        if state.get("version") != STATE_VERSION:
            raise HataoriError(f"loader state version {state.get('version')}, this hataori reads {STATE_VERSION}")
        saved = [entry["fingerprint"] for entry in state["datasets"]]
        if saved != self.fingerprints:
            raise HataoriError("the loader state was saved for other datasets: fingerprints "
                               f"{', '.join(saved)} were saved, the config's datasets have {', '.join(self.fingerprints)}; "
                               "resume with the same datasets in the same order (re-preparing a dataset changes it)")
        if state["seed"] != self.seed:
            raise HataoriError(f"the loader state was saved with seed {state['seed']}, the config has {self.seed}; "
                               f"set data.seed={state['seed']} to resume")
        self._epoch = [entry["epoch"] for entry in state["datasets"]]
        self._position = [entry["position"] for entry in state["datasets"]]
        self._draws = state["draws"]
        self._tokens = state["tokens"]
        cursor = state["cursor"]
        if cursor is None:
            self._cursor, self._offset, self._doc = None, 0, np.empty(0, np.int64)
        else:
            self._cursor = (cursor["dataset"], cursor["document"])
            self._doc = self.datasets[cursor["dataset"]].doc(cursor["document"])
            self._offset = cursor["offset"]


# ----------------------------------------------------------------------------- `hataori data bench`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datasets", nargs="+", metavar="DATASET[:WEIGHT]", help="prepared dataset folders")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (per rank)")
    parser.add_argument("--world-size", type=int, default=1, help="simulate rank 0 of this many data-parallel ranks")
    parser.add_argument("--split", default="train", choices=["train", "val"])
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to read")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    from hataori.tokenizer.prepare import parse_input

    specs = [DatasetSpec(**parse_input(item)) for item in args.datasets]
    cfg = DataConfig(datasets=specs, seq_len=args.seq_len, seed=args.seed, split=args.split)
    loader = cfg.build(args.batch, rank=0, world_size=args.world_size)
    next(loader)  # map the first pages and draw the first permutations
    batches, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < args.seconds:
        next(loader)
        batches += 1
    tokens = batches * args.batch * args.seq_len
    print(f"{batches} batches of {args.batch} x {args.seq_len} tokens in {elapsed:.2f} s: "
          f"{tokens / elapsed:,.0f} tokens/s per rank ({batches / elapsed:.1f} batches/s, world size "
          f"{args.world_size}); epochs reached: {loader.epochs}")
    for spec, d, p in zip(specs, loader.datasets, loader.probabilities):
        print(f"  {spec.path}: weight {spec.weight:g}, {d.num_docs} documents, {d.num_tokens} tokens, "
              f"draw probability {p:.3f}")
    return 0
