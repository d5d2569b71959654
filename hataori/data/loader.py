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
    :meth:`Batch.doc_ids` numbers the segments of each row (the model's ``doc_ids``) and
    :meth:`Batch.cu_seqlens` gives the cumulative lengths that varlen attention kernels take.
    Per-document masking: token ``t`` may attend to ``s <= t`` iff no segment starts in
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
from typing import Iterator, Literal

import numpy as np

from hataori.config import command_items, load, require
from hataori.errors import ConfigError, HataoriError
from hataori.sourcespec import parse_source
from hataori.data.batch import Batch
from hataori.data.examples import ExampleLoader, PairLoader
from hataori.data.shards import Dataset, dataset_kind

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
    pack: bool = True
    """Conversations only: pack several whole conversations into a row; false: one a row, padded
    (hataori.data.examples)."""

    def __post_init__(self):
        require(len(self.datasets) > 0, "datasets", "no datasets; list them as [{path: DIR, weight: 1.0}, ...]")
        require(self.seq_len >= 1, "seq_len", f"must be positive, got {self.seq_len}")
        require(self.seed >= 0, "seed", f"must be non-negative, got {self.seed}")

    def build(self, batch_size: int, rank: int = 0, world_size: int = 1, tokenizer_fingerprint: str | None = None,
              accum_steps: int = 1) -> "PackedLoader | ExampleLoader":
        """Open the datasets and return the loader of data-parallel ``rank`` of ``world_size``: the packing
        loader for text, the conversation loader (:mod:`hataori.data.examples`, packing ``accum_steps``
        micro-batches an optimizer step) for datasets prepared with a chat template, and its pair loader for
        preference pairs."""
        datasets = [Dataset(spec.path, self.split, tokenizer_fingerprint) for spec in self.datasets]
        kind = datasets_kind(datasets)
        if kind in ("conversations", "preference"):
            for i, spec in enumerate(self.datasets):
                require(spec.weight == 1.0, f"datasets[{i}].weight", "conversation datasets are pooled, every "
                        f"conversation read once an epoch; weights blend text only (got {spec.weight})")
            loader = ExampleLoader if kind == "conversations" else PairLoader
            return loader(datasets, seq_len=self.seq_len, batch_size=batch_size, accum_steps=accum_steps,
                                 seed=self.seed, rank=rank, world_size=world_size, pack_rows=self.pack)
        return PackedLoader(datasets, [spec.weight for spec in self.datasets], seq_len=self.seq_len,
                            batch_size=batch_size, seed=self.seed, rank=rank, world_size=world_size)


def datasets_kind(datasets: list[Dataset]) -> str:
    """The kind (:func:`dataset_kind`) every one of ``datasets`` is; a mix is refused, naming one of each."""
    kinds = {dataset_kind(d): d.path for d in datasets}
    if len(kinds) > 1:
        (a, path_a), (b, path_b) = list(kinds.items())[:2]
        raise ConfigError("data.datasets", f"mixes {a} ({path_a}) and {b} ({path_b}); a run trains on one kind")
    return next(iter(kinds))


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

        # The next draws continue from here (the state after the last queued draw).
        self._gen_draws = 0
        self._gen_epoch = [0] * len(datasets)
        self._gen_position = [0] * len(datasets)
        self._queue = _Queue.empty(len(datasets))
        self._head = 0  # queue entries taken; the document being packed is entry head - 1
        self._doc_tokens = np.empty(0, np.int64)  # the ids of the shard holding that document
        self._doc_start = 0
        self._doc_length = 0
        self._offset = 0  # next unread token of that document
        self._tokens = 0  # stream tokens consumed
        self._arrays = [shard.tokens.view(np.ndarray) for d in datasets for shard in d.shards]
        self._first_array = np.cumsum([0] + [len(d.shards) for d in datasets])[:-1].tolist()
        self._perms: dict[tuple[int, int], np.ndarray] = {}
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
        perm = self._perms.get((d, epoch))
        if perm is None:
            rng = np.random.default_rng([self.seed, int(self.fingerprints[d], 16), epoch])
            perm = self._perms[(d, epoch)] = rng.permutation(self.datasets[d].num_docs)
        return perm

    def _refill(self) -> None:
        """Queue the draws up to the end of the current draw block, all at once."""
        n_sets = len(self.datasets)
        block, at = divmod(self._gen_draws, DRAW_BLOCK)
        picks = self._choices(block)[at:]
        count = len(picks)
        doc, array, start, length = (np.zeros(count, np.int64) for _ in range(4))
        epoch_after = np.empty((count, n_sets), np.int64)
        position_after = np.empty((count, n_sets), np.int64)
        for d, data in enumerate(self.datasets):
            mine = picks == d
            taken = self._gen_position[d] + np.cumsum(mine)  # documents of this epoch read, after each draw
            epoch_after[:, d] = self._gen_epoch[d] + taken // data.num_docs
            position_after[:, d] = taken % data.num_docs
            index = np.flatnonzero(mine)
            if len(index):
                drawn = taken[index] - 1  # the permutation index of each draw, counting on across epochs
                epochs, where = self._gen_epoch[d] + drawn // data.num_docs, drawn % data.num_docs
                docs = np.empty(len(index), np.int64)
                for epoch in np.unique(epochs):
                    same = epochs == epoch
                    docs[same] = self.permutation(d, int(epoch))[where[same]]
                shard, start[index], length[index] = data.lookup(docs)
                doc[index], array[index] = docs, shard + self._first_array[d]
            self._gen_epoch[d], self._gen_position[d] = int(epoch_after[-1, d]), int(position_after[-1, d])
        self._perms = {key: perm for key, perm in self._perms.items() if key[1] >= self._gen_epoch[key[0]]}
        draws_after = self._gen_draws + 1 + np.arange(count)
        self._gen_draws += count
        self._queue = _Queue(picks, doc, array, start, length, draws_after, epoch_after, position_after)
        self._head = 0

    def _next_doc(self) -> None:
        if self._head == len(self._queue):
            self._refill()
        q, h = self._queue, self._head
        self._head += 1
        self._doc_tokens = self._arrays[q.array[h]]
        self._doc_start, self._doc_length, self._offset = q.start[h], q.length[h], 0

    # ------------------------------------------------------------------------- packing

    def _read(self, n: int, out: np.ndarray | None = None, ends: np.ndarray | None = None,
              sources: np.ndarray | None = None) -> None:
        """Advance the stream by ``n`` tokens, copying them to ``out`` (marking document ends in
        ``ends`` and the dataset in ``sources``) when given."""
        filled = 0
        while filled < n:
            left = self._doc_length - self._offset
            if left == 0:
                self._next_doc()
                continue
            take = min(n - filled, left)
            if out is not None:
                first = self._doc_start + self._offset
                out[filled:filled + take] = self._doc_tokens[first:first + take]
                sources[filled:filled + take] = self._queue.dataset[self._head - 1]
                if take == left:
                    ends[filled + take - 1] = True
            self._offset += take
            filled += take
            if filled < n:
                filled = self._whole_docs(n, filled, out, ends, sources)
        self._tokens += n

    def _whole_docs(self, n: int, filled: int, out, ends, sources) -> int:
        """Take the queued documents that fit whole in the ``n - filled`` tokens still wanted."""
        q, h = self._queue, self._head
        if h == len(q):
            return filled
        before = q.cum[h - 1] if h else 0
        fits = int(np.searchsorted(q.cum[h:], before + n - filled, side="right"))
        if fits == 0:
            return filled
        total = int(q.cum[h + fits - 1] - before)
        if out is not None:
            at = filled
            for i in range(h, h + fits):
                first, size = q.start[i], q.length[i]
                out[at:at + size] = self._arrays[q.array[i]][first:first + size]
                at += size
            ends[filled + q.cum[h:h + fits] - before - 1] = True
            sources[filled:filled + total] = np.repeat(q.datasets[h:h + fits], q.lengths[h:h + fits])
        self._head = h + fits
        self._doc_length = self._offset = q.length[h + fits - 1]  # the last one, read to its end
        return filled + total

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        span = self.batch_size * self.seq_len
        tokens = np.empty(span + 1, dtype=np.int64)
        ends = np.zeros(span + 1, dtype=bool)
        sources = np.empty(span + 1, dtype=np.uint8)
        self._read(self.rank * span)
        self._read(span, tokens, ends, sources)
        if self._offset == self._doc_length:  # the target of the last input opens the next document
            self._next_doc()
        tokens[span] = self._doc_tokens[self._doc_start + self._offset]
        self._read((self.world_size - self.rank - 1) * span)
        if self._offset == self._doc_length:  # every rank ends a step in the same state
            self._next_doc()

        shape = (self.batch_size, self.seq_len)
        starts = ends[:span].reshape(shape)  # an input EOS opens the next document's segment
        index = np.arange(self.seq_len, dtype=np.int32)
        last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)  # each row starts one too
        return Batch(inputs=tokens[:span].reshape(shape), targets=tokens[1:].reshape(shape),
                     positions=(index - last_start).astype(np.int32), sources=sources[:span].reshape(shape))

    # ------------------------------------------------------------------------- state

    @property
    def epochs(self) -> list[int]:
        """The epoch each dataset is in (as of the document being packed)."""
        return [e["epoch"] for e in self.state_dict()["datasets"]]

    def state_dict(self) -> dict:
        """Where the loader stands, as a small JSON-ready dict (the same on every rank)."""
        h = self._head - 1
        if h < 0:  # nothing taken from the queue yet
            draws, epochs, positions, cursor = self._gen_draws, self._gen_epoch, self._gen_position, None
        else:
            q = self._queue
            draws, epochs, positions = q.draws_after[h], q.epoch_after[h], q.position_after[h]
            cursor = {"dataset": q.dataset[h], "document": q.doc[h], "offset": self._offset}
        return {"version": STATE_VERSION, "seed": self.seed, "draws": int(draws), "tokens": self._tokens,
                "datasets": [{"fingerprint": fp, "epoch": int(e), "position": int(p)}
                             for fp, e, p in zip(self.fingerprints, epochs, positions)],
                "cursor": cursor}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that saved ``state`` stopped."""
        if state.get("version") != STATE_VERSION:
            raise HataoriError(f"loader state version {state.get('version')}, this hataori reads {STATE_VERSION}")
        saved = [entry["fingerprint"] for entry in state["datasets"]]
        if saved != self.fingerprints:
            raise HataoriError("the loader state was saved for other datasets: fingerprints "
                               f"{', '.join(saved)} were saved, the config's datasets have "
                               f"{', '.join(self.fingerprints)}; "
                               "resume with the same datasets in the same order (re-preparing a dataset changes it)")
        if state["seed"] != self.seed:
            raise HataoriError(f"the loader state was saved with seed {state['seed']}, the config has {self.seed}; "
                               f"set data.seed={state['seed']} to resume")
        self._gen_draws = state["draws"]
        self._gen_epoch = [entry["epoch"] for entry in state["datasets"]]
        self._gen_position = [entry["position"] for entry in state["datasets"]]
        self._tokens = state["tokens"]
        self._queue, self._head = _Queue.empty(len(self.datasets)), 0
        self._doc_length = self._offset = 0
        cursor = state["cursor"]
        if cursor is not None:  # queue the document being packed again, as already drawn
            d = cursor["dataset"]
            shard, start, length = self.datasets[d].lookup(np.array([cursor["document"]]))
            self._queue = _Queue(np.array([d]), np.array([cursor["document"]]), shard + self._first_array[d], start,
                                 length, np.array([self._gen_draws]), np.array([self._gen_epoch]),
                                 np.array([self._gen_position]))
            self._next_doc()
            self._offset = cursor["offset"]


class _Queue:
    """Documents drawn ahead, with the loader state after each draw. Scalars the packing loop reads
    one at a time are Python lists; the rest stay arrays."""

    def __init__(self, datasets, docs, arrays, starts, lengths, draws_after, epoch_after, position_after):
        self.datasets = np.asarray(datasets, np.int64)
        self.lengths = np.asarray(lengths, np.int64)
        self.cum = np.cumsum(self.lengths)
        self.dataset, self.doc = self.datasets.tolist(), np.asarray(docs).tolist()
        self.array, self.start = np.asarray(arrays).tolist(), np.asarray(starts).tolist()
        self.length = self.lengths.tolist()
        self.draws_after, self.epoch_after, self.position_after = draws_after, epoch_after, position_after

    @classmethod
    def empty(cls, n_sets: int) -> "_Queue":
        none = np.zeros(0, np.int64)
        return cls(none, none, none, none, none, none, np.zeros((0, n_sets), np.int64), np.zeros((0, n_sets), np.int64))

    def __len__(self) -> int:
        return len(self.length)


# ----------------------------------------------------------------------------- `hataori data bench`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="+", metavar="DATASET[:WEIGHT]|CONFIG.yaml|key=value",
                        help="prepared dataset folders, YAML files of the data config (a train preset's data "
                             "section) and key=value overrides such as seq_len=4096")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048; shortcut for seq_len)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (per rank)")
    parser.add_argument("--world-size", type=int, default=1, help="simulate rank 0 of this many data-parallel ranks")
    parser.add_argument("--split", choices=["train", "val"],
                        help="the split to read (default train; shortcut for split)")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to read")
    parser.add_argument("--seed", type=int, help="the blend's seed (default 0; shortcut for seed)")


def main(args: argparse.Namespace) -> int:
    datasets = [item for item in args.items if "=" not in item and not item.endswith((".yaml", ".yml"))]
    files, overrides = command_items([item for item in args.items if item not in datasets], {
        "DATASET": ("datasets", [parse_source(item) for item in datasets] or None),
        "--seq-len": ("seq_len", args.seq_len), "--split": ("split", args.split), "--seed": ("seed", args.seed)})
    cfg = load(DataConfig, files, overrides)
    specs = cfg.datasets
    loader = cfg.build(args.batch, rank=0, world_size=args.world_size)
    next(loader)  # map the first pages and draw the first permutations
    batches, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < args.seconds:
        next(loader)
        batches += 1
    tokens = batches * args.batch * cfg.seq_len
    print(f"{batches} batches of {args.batch} x {cfg.seq_len} tokens in {elapsed:.2f} s: "
          f"{tokens / elapsed:,.0f} tokens/s per rank ({batches / elapsed:.1f} batches/s, world size "
          f"{args.world_size}); epochs reached: {loader.epochs}")
    for spec, d, p in zip(specs, loader.datasets, loader.probabilities):
        print(f"  {spec.path}: weight {spec.weight:g}, {d.num_docs} documents, {d.num_tokens} tokens, "
              f"draw probability {p:.3f}")
    return 0
