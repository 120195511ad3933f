"""The poly learning-rate schedule of DeepLab / mmsegmentation, as a pure function of the iteration.

lr(i) = (base_lr - min_lr) * (1 - i / max_iters) ** power + min_lr

Being a function of the iteration only, it carries no state of its own: resuming at iteration i
sets exactly the rate a run that never stopped would have used there.
"""

from __future__ import annotations

import torch


def poly_lr(base_lr: float, iteration: int, max_iters: int, power: float = 0.9, min_lr: float = 0.0) -> float:
    """Learning rate at ``iteration`` (0-based; iteration 0 uses ``base_lr``)."""
    if max_iters <= 0:
        raise ValueError(f"max_iters must be positive, got {max_iters}")
    progress = min(max(iteration, 0), max_iters) / max_iters
    return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr


def set_poly_lr(
    optimizer: torch.optim.Optimizer, iteration: int, max_iters: int, power: float, min_lr: float
) -> float:
    """Set every parameter group's lr for ``iteration``; returns the first group's lr (for logging).

    Each group keeps its own base rate in ``group["initial_lr"]`` (a head trained at 10x the backbone's
    rate decays at the same pace); ``min_lr`` is scaled by the same group factor relative to the first group.
    """
    groups = optimizer.param_groups
    for group in groups:
        group.setdefault("initial_lr", group["lr"])
    reference = groups[0]["initial_lr"]
    for group in groups:
        factor = group["initial_lr"] / reference if reference else 1.0
        group["lr"] = poly_lr(group["initial_lr"], iteration, max_iters, power, min_lr * factor)
    return groups[0]["lr"]
