"""The conversation loader: whole prepared conversations packed into rows, one optimizer step at a time,
with the loss mask as targets and the step's loss-token count for the objective's normalisation.

Examples
    A document of a dataset prepared with a chat template (:mod:`hataori.data.chat`): ids ``e`` (EOS last)
    and mask ``m``. It contributes ``len(e) - 1`` positions to a row: inputs ``e[:-1]``, targets ``e[1:]``,
    where a target counts only if ``m`` marks it (else ``IGNORE_INDEX``); its positions restart at 0, so
    under document masking no example attends to another, and none is ever cut.

Order
    The examples of every dataset, pooled, are read in a seeded permutation of the pool, a fresh one each
    epoch (keyed by the seed and the epoch); an epoch runs on into the next without a break.

Packing
    Rows of ``seq_len`` positions are filled in that order: an example goes into the current row if it
    fits in what is left of it, else the row is closed, padded (inputs EOS, targets ignored, a segment of
    its own) and the example starts the next. With ``pack=False`` every example gets a row of its own.
    Either way an example longer than ``seq_len + 1`` tokens cannot be placed: the loader refuses a
    dataset holding one, naming prepare's ``max_tokens``.

Steps and ranks
    Each optimizer step takes ``world_size * accum_steps * batch_size`` rows, packed as one block that every
    rank computes alike; rank ``r``'s micro-batch ``j`` is rows ``(r * accum_steps + j) * batch_size`` onwards.
    Every :class:`~hataori.data.batch.Batch` carries its own loss-token count and the step's, over every
    rank (``step_loss_tokens``): the objective divides the summed loss by the latter, so the loss is the
    mean over the step's loss tokens whatever the packing, the micro-batching and the number of processes
    (gradient-accumulation exact). The same global batch of rows comes out on any number of processes.

Preference pairs
    :class:`PairLoader` reads datasets of pairs (two consecutive documents, chosen then rejected): the unit of
    the order and of packing is the pair, placed whole in one row (chosen, then rejected, each its own
    segment), and the counts are of pairs (:mod:`hataori.train.preference`).

The state after a step (:meth:`ExampleLoader.state_dict`) is the epoch and the position in its permutation
of the next example, the seed and the datasets' fingerprints; restored, the loader continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
import itertools
from typing import Iterable, Iterator

import numpy as np

from hataori.data.batch import Batch
from hataori.data.shards import Dataset, dataset_kind
from hataori.errors import HataoriError
from hataori.model import IGNORE_INDEX

STATE_VERSION = 1
KIND = "conversations"


@dataclass(slots=True)
class Rows:
    """Packed rows, all (rows, seq_len): inputs, targets (IGNORE_INDEX where nothing counts), positions in
    each example (0 starts one; padding is a segment of its own), and the dataset of each position."""

    inputs: np.ndarray
    targets: np.ndarray
    positions: np.ndarray
    sources: np.ndarray
    units: np.ndarray
    """(rows, most units in a row): the units each row holds, numbered in packing order; -1 past the last."""

    def batch(self, first: int, count: int, step_loss_tokens: int) -> Batch:
        part = slice(first, first + count)
        targets = self.targets[part]
        return Batch(inputs=self.inputs[part], targets=targets, positions=self.positions[part],
                     sources=self.sources[part], loss_tokens=int(np.count_nonzero(targets != IGNORE_INDEX)),
                     step_loss_tokens=step_loss_tokens)


@dataclass(slots=True)
class PackingStats:
    """What the packed rows hold, counted in positions (one per input token)."""

    rows: int = 0
    examples: int = 0
    positions: int = 0
    loss_positions: int = 0
    padding: int = 0

    def as_dict(self) -> dict:
        total = max(self.positions, 1)
        return {"rows": self.rows, "examples": self.examples, "positions": self.positions,
                "loss_share": self.loss_positions / total, "padding_share": self.padding / total,
                "examples_per_row": self.examples / max(self.rows, 1)}


def pack(examples: Iterable[tuple[np.ndarray, np.ndarray, int]], *, seq_len: int, pad_id: int,
         pack_rows: bool = True, rows: int | None = None, stats: PackingStats | None = None,
         group: int = 1) -> tuple[Rows, int]:
    """Pack ``examples`` ((ids, mask, dataset index), in order) into rows (module docstring, Packing); with
    ``rows`` exactly that many, stopping before the first unit that does not fit. A unit is ``group``
    consecutive examples placed together in one row, each its own segment (a preference pair: 2). Returns the
    rows (``units`` numbering the units placed in each row, in order) and the number of units placed."""
    if rows is None:
        examples = list(examples)
    count = rows if rows is not None else _rows_needed(examples, seq_len, pack_rows, group)
    inputs = np.full((count, seq_len), pad_id, dtype=np.int64)
    targets = np.full((count, seq_len), IGNORE_INDEX, dtype=np.int64)
    positions = np.empty((count, seq_len), dtype=np.int32)
    sources = np.zeros((count, seq_len), dtype=np.uint8)
    row, used, placed = 0, 0, 0
    ends = []  # where each row's examples end
    row_units: list[list[int]] = [[] for _ in range(count)]
    for unit in _units(examples, group):
        n = sum(len(ids) - 1 for ids, _, _ in unit)
        if n > seq_len:
            what = "an example" if group == 1 else f"a unit of {group} examples"
            raise HataoriError(f"{what} of {n + len(unit)} tokens does not fit a row of seq_len={seq_len}")
        if used + n > seq_len or (not pack_rows and used):
            ends.append(used)
            row, used = row + 1, 0
            if row == count:
                break
        for ids, mask, source in unit:
            k = len(ids) - 1
            inputs[row, used:used + k] = ids[:-1]
            targets[row, used:used + k] = np.where(mask[1:] != 0, ids[1:].astype(np.int64), IGNORE_INDEX)
            positions[row, used:used + k] = np.arange(k, dtype=np.int32)
            sources[row, used:used + k] = source
            used += k
        row_units[row].append(placed)
        placed += 1
    else:
        ends.append(used)
    ends += [0] * (count - len(ends))
    for r, end in enumerate(ends):
        positions[r, end:] = np.arange(seq_len - end, dtype=np.int32)  # padding: a segment of its own
    units = np.full((count, max((len(u) for u in row_units), default=0)), -1, dtype=np.int64)
    for r, numbers in enumerate(row_units):
        units[r, :len(numbers)] = numbers
    if stats is not None:
        stats.rows += count
        stats.examples += placed * group
        stats.positions += count * seq_len
        stats.loss_positions += int(np.count_nonzero(targets != IGNORE_INDEX))
        stats.padding += int(sum(seq_len - end for end in ends))
    return Rows(inputs, targets, positions, sources, units), placed


def _units(examples: Iterable, group: int) -> Iterator[list]:
    """``examples`` in consecutive lists of ``group``."""
    it = iter(examples)
    while unit := list(itertools.islice(it, group)):
        if len(unit) < group:
            raise HataoriError(f"{len(unit)} example(s) left over after the last whole unit of {group}")
        yield unit


def _rows_needed(examples, seq_len: int, pack_rows: bool, group: int) -> int:
    rows, used = 0, seq_len
    for unit in _units(examples, group):
        n = sum(len(ids) - 1 for ids, _, _ in unit)
        if used + n > seq_len or not pack_rows:
            rows, used = rows + 1, 0
        used += n
    return rows


class ExampleLoader:
    """Yields the micro-batches of this rank, ``accum_steps`` an optimizer step, forever (module docstring)."""

    KIND = KIND
    GROUP = 1
    """Examples (documents) a unit of the order and of packing holds."""

    def __init__(self, datasets: list[Dataset], *, seq_len: int, batch_size: int, accum_steps: int = 1,
                 seed: int = 0, rank: int = 0, world_size: int = 1, pack_rows: bool = True):
        if not datasets:
            raise ValueError("at least one dataset")
        if len(datasets) > 255:
            raise HataoriError(f"{len(datasets)} datasets; at most 255 are supported")
        if not 0 <= rank < world_size:
            raise HataoriError(f"rank {rank} is not in [0, world_size={world_size})")
        if {d.tokenizer_fingerprint for d in datasets} != {datasets[0].tokenizer_fingerprint}:
            listing = ", ".join(f"{d.path} ({d.tokenizer_fingerprint})" for d in datasets)
            raise HataoriError(f"the datasets must share one tokenizer, but they were encoded with different ones: "
                               f"{listing}; prepare them with the same tokenizer")
        for d in datasets:
            self._check_dataset(d)
            if not d.masked:
                raise HataoriError(f"{d.path}: a dataset of text, not of conversations; the conversation loader "
                                   "reads datasets prepared with `hataori data prepare --chat-template`")
            if d.num_docs == 0:
                raise HataoriError(f"{d.path}: the {d.split} split holds no conversations")
            longest = self._longest(d, seq_len)
            if longest > seq_len + 1:
                raise HataoriError(f"{d.path}: its longest conversation has {longest} tokens, more than a row of "
                                   f"seq_len={seq_len} takes ({seq_len + 1} with the shifted target); prepare it "
                                   f"with max_tokens={seq_len + 1}, or raise data.seq_len")
        self.datasets = datasets
        self.seq_len, self.batch_size, self.accum_steps, self.seed = seq_len, batch_size, accum_steps, seed
        self.rank, self.world_size, self.pack_rows = rank, world_size, pack_rows
        self.fingerprints = [d.fingerprint for d in datasets]
        self.pad_id = datasets[0].eos_id
        self._first = np.cumsum([0] + [len(d) // self.GROUP for d in datasets])
        self.total = int(self._first[-1])
        self.epoch, self.position = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None
        self._pending: list[Batch] = []
        self.stats = PackingStats()

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the pooled examples in ``epoch``."""
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.total))
        return self._perm[1]

    def _check_dataset(self, data: Dataset) -> None:
        """Refuse what this loader cannot read (preference pairs: :class:`PairLoader` reads them)."""
        if dataset_kind(data) == "preference":
            raise HataoriError(f"{data.path}: preference pairs; supervised fine-tuning reads conversations, the "
                               "preference objective (objective=dpo) reads pairs")

    def _longest(self, data: Dataset, seq_len: int) -> int:
        """The most tokens a unit of ``data`` puts in a row, plus one (a conversation's length)."""
        return int(data.lengths().max())

    def _unit(self, index: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """The examples of pooled unit ``index``."""
        d = int(np.searchsorted(self._first, index, side="right")) - 1
        first = (index - int(self._first[d])) * self.GROUP
        data = self.datasets[d]
        return [(data.doc(j), data.doc_mask(j), d) for j in range(first, first + self.GROUP)]

    def _upcoming(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        epoch, position = self.epoch, self.position
        self._order = []  # the pooled units yielded, in order
        while True:
            index = int(self.permutation(epoch)[position])
            self._order.append(index)
            yield from self._unit(index)
            position += 1
            if position == self.total:
                epoch, position = epoch + 1, 0

    def _advance(self, placed: int) -> None:
        self.position += placed
        self.epoch += self.position // self.total
        self.position %= self.total

    def step_rows(self) -> Rows:
        """The rows of the next optimizer step (every rank's), the position moved past their examples."""
        rows, placed = pack(self._upcoming(), seq_len=self.seq_len, pad_id=self.pad_id, pack_rows=self.pack_rows,
                            rows=self.world_size * self.accum_steps * self.batch_size, stats=self.stats,
                            group=self.GROUP)
        order = np.asarray(self._order, dtype=np.int64)
        rows.units = np.where(rows.units >= 0, order[rows.units.clip(0)] if len(order) else -1, -1)
        self._advance(placed)
        return rows

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if not self._pending:
            rows = self.step_rows()
            step_loss = self._loss_count(rows)
            first = self.rank * self.accum_steps * self.batch_size
            self._pending = [self._batch(rows, first + j * self.batch_size, step_loss)
                             for j in range(self.accum_steps)]
        return self._pending.pop(0)

    def _loss_count(self, rows: Rows) -> int:
        """What the objective's loss is a mean over, in ``rows``: the targets that count."""
        return int(np.count_nonzero(rows.targets != IGNORE_INDEX))

    def _batch(self, rows: Rows, first: int, step_loss: int) -> Batch:
        return rows.batch(first, self.batch_size, step_loss)

    def state_dict(self) -> dict:
        """Where the loader stands after a whole step (the same on every rank), as a small JSON-ready dict."""
        if self._pending:
            raise HataoriError("the conversation loader's state is saved between optimizer steps, not inside one")
        return {"version": STATE_VERSION, "kind": self.KIND,
                "datasets": [{"fingerprint": f} for f in self.fingerprints], "seed": self.seed, "epoch": self.epoch,
                "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.KIND or state.get("version") != STATE_VERSION:
            raise HataoriError(f"a loader state of kind {state.get('kind', 'text')!r} (version {state.get('version')}) "
                               f"cannot resume the {self.KIND} loader (kind {self.KIND!r}, version {STATE_VERSION}); "
                               "resume with the datasets the run was started with")
        saved = [entry["fingerprint"] for entry in state["datasets"]]
        if saved != self.fingerprints:
            raise HataoriError(f"the loader state was saved for other datasets: fingerprints {', '.join(saved)} were "
                               f"saved, the config's datasets have {', '.join(self.fingerprints)}; resume with the "
                               "same datasets in the same order")
        if state["seed"] != self.seed:
            raise HataoriError(f"the loader state was saved with data.seed={state['seed']}, the config has "
                               f"{self.seed}; resume with the same seed")
        self.epoch, self.position, self._pending = int(state["epoch"]), int(state["position"]), []


class PairLoader(ExampleLoader):
    """The conversation loader over preference pairs (:mod:`hataori.data.chat`: a pair is two consecutive
    documents, chosen then rejected): the pairs are the units of the order, each packed whole into one row
    (chosen, then rejected, each its own segment), and the objective's mean is over pairs: a batch's
    ``loss_tokens`` and ``step_loss_tokens`` count pairs, and ``pairs`` gives each row's pooled pair indices."""

    KIND = "preference"
    GROUP = 2

    def _check_dataset(self, data: Dataset) -> None:
        if dataset_kind(data) != "preference":
            raise HataoriError(f"{data.path}: not preference pairs; the preference objective reads datasets "
                               "prepared with `hataori data prepare --chat-template ... preference=true`")
        if len(data) % 2:
            raise HataoriError(f"{data.path}: the {data.split} split holds {len(data)} documents, an odd number, "
                               "so not whole pairs; prepare it again")

    def _longest(self, data: Dataset, seq_len: int) -> int:
        lengths = data.lengths()
        longest = int((lengths[0::2] + lengths[1::2]).max()) - 1 if len(lengths) else 0
        if longest > seq_len + 1:
            raise HataoriError(f"{data.path}: its longest pair (chosen and rejected, in one row) has {longest + 1} "
                               f"tokens, more than a row of seq_len={seq_len} takes ({seq_len + 2} with the "
                               f"shifted targets); prepare it with max_tokens={seq_len // 2 + 1}, or raise "
                               "data.seq_len")
        return longest

    def _loss_count(self, rows: Rows) -> int:
        return int(np.count_nonzero(rows.units >= 0))

    def _batch(self, rows: Rows, first: int, step_loss: int) -> Batch:
        batch = rows.batch(first, self.batch_size, step_loss)
        batch.pairs = rows.units[first:first + self.batch_size]
        batch.loss_tokens = int(np.count_nonzero(batch.pairs >= 0))
        return batch
