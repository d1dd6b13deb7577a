"""Turn SIGTERM/SIGINT into "stop after this iteration", agreed on by every rank.

SLURM sends SIGTERM before it preempts or times out a job, and Ctrl-C sends SIGINT. Killing a rank mid-step
would lose the work since the last checkpoint, so the handler only records the signal; the trainer asks
``received()`` after each iteration, saves a checkpoint and returns. The flag is all-reduced because a signal
may reach the ranks at different moments (or only some of them), and all must stop at the same iteration.
"""
from __future__ import annotations

import signal
from typing import Optional

import torch

from rlhf_ds.distributed import all_reduce_sum

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT set a flag instead of killing the process."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict = {}

    def _record(self, signum: int, frame) -> None:
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def received(self, device: torch.device) -> Optional[str]:
        """The name of a stop signal received by any rank so far (None if none). Every rank must call it."""
        signums = torch.zeros(max(STOP_SIGNALS) + 1, device=device)
        if self.signum:
            signums[self.signum] = 1
        signums = all_reduce_sum(signums)
        hit = [sig for sig in STOP_SIGNALS if signums[sig] > 0]
        return signal.Signals(hit[0]).name if hit else None
