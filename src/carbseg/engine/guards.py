"""Numerical guard of the training loop: a step whose loss is NaN or Inf is skipped, not applied.

One bad batch (an exploding logit under bf16/fp16 autocast, a corrupt pseudo-mask) must not write
NaN into every weight: the step is skipped on every process (the decision is all-reduced, so the
ranks stay in step), a warning names the iteration, and the count is logged. A run that produces
non-finite losses ``patience`` iterations in a row has diverged; it stops with one clear line
instead of skipping forever. The counters are part of the training state, so a resumed run
counts exactly like a run that never stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from carbseg import distributed
from carbseg.errors import UserError

log = logging.getLogger(__name__)

#: Consecutive skipped steps after which training stops (a diverged run, not a bad batch).
MAX_CONSECUTIVE_NONFINITE = 5


class DivergedError(UserError):
    """The loss was NaN/Inf at ``patience`` consecutive iterations."""


def any_rank_nonfinite(values: Iterable[torch.Tensor], device: torch.device) -> bool:
    """True when any of ``values`` is NaN or Inf on any process (a collective when distributed)."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values])
    finite = bool(torch.isfinite(stacked).all())  # one device sync per step, not one per term
    if not distributed.is_distributed():
        return not finite
    flag = torch.tensor([0.0 if finite else 1.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


class NonFiniteGuard:
    """Counts skipped steps; raises DivergedError after ``patience`` consecutive ones."""

    def __init__(self, patience: int = MAX_CONSECUTIVE_NONFINITE):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.consecutive = 0
        self.skipped = 0

    def record(self, skipped: bool, iteration: int) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        log.warning("iteration %d: non-finite loss (NaN/Inf); step skipped, weights unchanged "
                    "(%d in a row, %d in total)", iteration, self.consecutive, self.skipped)
        if self.consecutive >= self.patience:
            raise DivergedError(
                f"iteration {iteration}: the loss was NaN/Inf at {self.consecutive} consecutive iterations, so "
                "training has diverged; lower train.lr, set train.amp=off, or check the data and pseudo-masks "
                "(the last checkpoint holds the weights from before)"
            )

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.skipped = int(state.get("skipped", 0))
