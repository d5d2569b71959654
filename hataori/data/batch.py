"""One rank's batch of packed rows, as the loaders yield it (:mod:`hataori.data.loader` for text,
:mod:`hataori.data.examples` for conversations) and the training loop reads it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    loss_tokens: int | None = None
    """Conversations (:mod:`hataori.data.examples`): the targets of this batch that count."""
    step_loss_tokens: int | None = None
    """Conversations: the targets that count in the whole optimizer step, over every rank; the objective
    divides the summed loss by it. None (text): every target counts and every batch holds as many.
    Preference pairs: both count pairs, the unit the preference objective's mean is over."""
    pairs: np.ndarray | None = None
    """Preference pairs (:class:`hataori.data.examples.PairLoader`): (batch_size, most pairs in a row), each
    row's pairs by pooled index in row order, -1 past the last; pair ``k`` of a row is its segments ``2k``
    (chosen) and ``2k + 1`` (rejected)."""

    def segment_starts(self) -> np.ndarray:
        """(batch_size, seq_len) bool: where a document segment starts."""
        return self.positions == 0

    def doc_ids(self) -> np.ndarray:
        """(batch_size, seq_len) int32: segments numbered 0, 1, ... along each row, the layout the
        model's attention takes (a new document wherever the id changes)."""
        return np.cumsum(self.segment_starts(), axis=1, dtype=np.int32) - 1

    def cu_seqlens(self) -> np.ndarray:
        """Cumulative segment lengths over the flattened batch (int32), starting at 0 and ending at
        ``batch_size * seq_len``: the ``cu_seqlens`` of varlen attention kernels."""
        starts = np.flatnonzero(self.segment_starts().ravel())
        return np.append(starts, self.inputs.size).astype(np.int32)
