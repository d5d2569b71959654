"""Stop training cleanly on a signal: SIGUSR1 (the time limit is near) and SIGTERM (preemption, scancel).

:func:`stop_on_signals` makes each of these signals call ``trainer.request_stop()``: the trainer
finishes the current optimizer step, saves a checkpoint and returns, and the process exits normally.
The request is shared between ranks at every step, so a signal that reaches one process stops all
of them at the same step. A signal that arrives before this is installed takes its default action
(the process ends), which the next attempt recovers from through the latest complete checkpoint.

Under Slurm the batch script (:mod:`hataori.slurm.sbatch`) forwards its own SIGUSR1 and SIGTERM to
the processes as SIGUSR1, and requeues the job once they have exited. After SIGTERM Slurm sends
SIGKILL ``KillWait`` seconds later (30 by default), so a checkpoint started then must fit in that time;
SIGUSR1 comes ``signal_seconds`` before the time limit, early enough for a step and a checkpoint.
"""

from __future__ import annotations

import os
import signal
from typing import Protocol

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Stoppable(Protocol):
    def request_stop(self) -> None: ...


def stop_on_signals(trainer: Stoppable, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
    """Make each of ``signals`` ask ``trainer`` to stop after the current step (call from the main thread)."""

    def handler(signum: int, frame) -> None:
        # os.write, not print: a handler may interrupt a print of the main program.
        os.write(2, f"hataori: got {signal.Signals(signum).name} on rank {os.environ.get('RANK', '0')}; "
                    "stopping after this step with a checkpoint\n".encode())
        trainer.request_stop()

    for signum in signals:
        signal.signal(signum, handler)
