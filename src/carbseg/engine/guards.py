"""Numerical guard of the training loop: a step whose loss is NaN or Inf is skipped, not applied.

One bad batch (an exploding logit under bf16/fp16 autocast, a corrupt pseudo-mask) must not write
NaN into every weight: the step is skipped on every process (the decision is all-reduced, so the
ranks stay in step), a warning names the iteration, and the count is logged. The decision stays on
the device (the update is undone there, ``step_unless_nonfinite``); the host reads it at the next
logged iteration or checkpoint, so a step that is not logged never waits for the GPU. A run that produces
non-finite losses ``patience`` iterations in a row has diverged; it stops with one clear line
instead of skipping forever. The counters are part of the training state, so a resumed run
counts exactly like a run that never stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from carbseg import distributed
from carbseg.errors import UserError

log = logging.getLogger(__name__)

#: Consecutive skipped steps after which training stops (a diverged run, not a bad batch).
MAX_CONSECUTIVE_NONFINITE = 5


class DivergedError(UserError):
    """The loss was NaN/Inf at ``patience`` consecutive iterations."""


def all_ranks_finite(values: Iterable[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """0-d bool tensor on the values' device: every one of ``values`` is finite on every process.

    Nothing is read back to the host (a collective when distributed, queued like any other kernel),
    so a training step is not held up between forward and backward; the trainer reads the flag at
    its logged iterations (``NonFiniteGuard.flush``).
    """
    stacked = torch.stack([v.detach().float().reshape(()) for v in values])
    finite = torch.isfinite(stacked).all()
    if not distributed.is_distributed():
        return finite
    flag = finite.to(distributed.collective_device(device), torch.float32).reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return (flag[0] > 0).to(finite.device)


def any_rank_nonfinite(values: Iterable[torch.Tensor], device: torch.device | str) -> bool:
    """True when any of ``values`` is NaN or Inf on any process (reads the flag: a device sync)."""
    return not bool(all_ranks_finite(values, device))


def _flat_by_kind(tensors: list[torch.Tensor]) -> dict[tuple, tuple[list[int], torch.Tensor]]:
    """``tensors`` concatenated (a copy) per (device, dtype): {kind: (their indices, flat values)}."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return {kind: (idx, torch.cat([tensors[i].reshape(-1) for i in idx])) for kind, idx in groups.items()}


@torch.no_grad()
def step_unless_nonfinite(optimizer: torch.optim.Optimizer, finite: torch.Tensor,
                          step: Callable[[], object]) -> None:
    """``step()`` (the optimizer's step), undone on the device where ``finite`` is False.

    Every parameter with a gradient and every tensor of its optimizer state gets back its value from
    before the step through ``torch.where``, so a non-finite loss never updates the weights and the
    host never waits for the flag (the skip GradScaler makes with ``found_inf``, for any optimizer).
    A state tensor the step created (SGD's first momentum buffer) falls back to zeros: SGD continues
    from a zero buffer exactly as from none (buf = momentum * 0 + grad). The values are handled as a
    few flat tensors (one per device and dtype), not tensor by tensor: a handful of kernels per step.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    keys = [(p, k) for p in params for k, v in optimizer.state.get(p, {}).items()
            if isinstance(v, torch.Tensor)]
    saved = _flat_by_kind(params + [optimizer.state[p][k] for p, k in keys])
    step()
    targets = params + [optimizer.state[p][k] for p, k in keys]
    for idx, before in saved.values():
        tensors = [targets[i] for i in idx]
        chosen = torch.where(finite, torch.cat([t.reshape(-1) for t in tensors]), before)
        pieces = chosen.split([t.numel() for t in tensors])
        torch._foreach_copy_(tensors, [piece.view(t.shape) for piece, t in zip(pieces, tensors, strict=True)])
    known = set(map(lambda key: (id(key[0]), key[1]), keys))
    for p in params:
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and (id(p), key) not in known:
                value.copy_(torch.where(finite, value, torch.zeros_like(value)))


class NonFiniteGuard:
    """Counts skipped steps; raises DivergedError after ``patience`` consecutive ones."""

    def __init__(self, patience: int = MAX_CONSECUTIVE_NONFINITE):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.consecutive = 0
        self.skipped = 0
        self.pending: list[tuple[int, torch.Tensor]] = []  # (iteration, finite flag) not read yet

    def defer(self, finite: torch.Tensor, iteration: int) -> None:
        """Keep iteration ``iteration``'s device-side flag (``all_ranks_finite``) for ``flush``: read
        together at a logged iteration, not one device sync per step."""
        self.pending.append((iteration, finite.detach()))

    def flush(self) -> list[int]:
        """Read the deferred flags (one device sync), ``record`` each iteration in order -- its warning,
        its count, DivergedError after ``patience`` in a row -- and return the skipped iterations."""
        if not self.pending:
            return []
        pending, self.pending = self.pending, []
        finite = torch.stack([flag.reshape(()).to(pending[0][1].device) for _, flag in pending]).tolist()
        skipped = [iteration for (iteration, _), ok in zip(pending, finite, strict=True) if not ok]
        for (iteration, _), ok in zip(pending, finite, strict=True):
            self.record(not ok, iteration)
        return skipped

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
        self.flush()  # the counts include every iteration run so far
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.pending = []
        self.consecutive = int(state.get("consecutive", 0))
        self.skipped = int(state.get("skipped", 0))
