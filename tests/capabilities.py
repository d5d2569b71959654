"""What this machine runs, for the tests that need a precision: each skips with the reason where its
precision is missing (the reason ``hataori pretrain`` refuses it with) and runs where it is present.

The device is the one DeepSpeed's ranks take (:func:`hataori.train.zero.rank_device`): the first GPU
where there is one, else the CPU.
"""

from __future__ import annotations

import pytest

from hataori.precision import device_description, supported, why_not
from hataori.train.zero import rank_device


def needs(precision: str) -> pytest.MarkDecorator:
    """Skip unless the ranks' device runs ``precision``."""
    device = rank_device()
    runs = supported(device)
    reason = "" if precision in runs else why_not(precision, device_description(device), runs,
                                                  gpu=device.type == "cuda")
    return pytest.mark.skipif(precision not in runs, reason=reason)
