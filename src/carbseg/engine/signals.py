"""Stopping a run cleanly: SIGTERM / SIGINT become a flag checked between iterations.

A cluster's time limit or Ctrl-C finishes the current step, writes ``checkpoint_last.pt`` and
raises ``TrainingInterrupted`` (the CLI turns it into a one-line message and a non-zero exit);
``--resume`` then continues bit-identically (on CPU).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from carbseg import distributed as dist


class TrainingInterrupted(Exception):  # noqa: N818 -- it is a stop, not an error
    """SIGTERM / SIGINT arrived: the current step was finished and ``checkpoint_last.pt`` written."""

    def __init__(self, iteration: int, checkpoint: Path, signum: int):
        self.iteration, self.checkpoint, self.signum = iteration, checkpoint, signum
        super().__init__(
            f"stopped by signal {signal.Signals(signum).name} after iteration {iteration}; "
            f"checkpoint written to {checkpoint} (continue with --resume)"
        )


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag checked between iterations (a step is never cut in half)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def any_rank_stopped(self, device: torch.device) -> int | None:
        """The signal seen by any process, so that all stop after the same iteration."""
        if not dist.is_distributed():
            return self.signum
        flag = torch.tensor([float(self.signum or 0)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None
