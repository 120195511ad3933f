"""Consistency-Aware Region Balancing (CARB): pure functions first, then the objective with its state.

Terms of the method (docs/training.md, "One iteration (what the loop does)"):

* teacher mask -- the CLIP teacher's label map for the global view (and, with GLV, for the local patch);
* self-prediction -- the segmenter's own argmax, restricted to the image-level classes;
* consistent region -- valid pixels where teacher == self-prediction; inconsistent region -- the rest;
* warm-up -- the first W iterations: plain CE on the teacher masks (global + patch);
* after warm-up -- CE_cons + c * CE_incons + CE_patch_cons + c * CE_patch_incons, each CE averaged
  over its own region's valid pixels; c is a constant (never back-propagated);
* adaptive c -- coeff * mean(last q CE_cons) / mean(last q CE_incons), q = 5.

Three defects of the authors' release are avoided here: absent classes are masked with -inf, not
multiplied by 0/1 (defect 1); an empty region gives exactly 0, not NaN (defect 2); the loss queue is
averaged across processes and checkpointable (defect 3).

Layers: ``carb_loss`` is a pure function returning every term (``CARBTerms``); ``CARBTerms`` adds
them up for the warm-up or for a given c; ``CARBObjective`` is the one stateful piece -- it owns
the warm-up rule, the loss queue and c, like a loss module with running state (``state_dict`` /
``load_state_dict``), and turns the terms of a step into the ``CARBLoss`` to back-propagate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from carbseg import distributed
from carbseg.class_argmax import class_argmax
from carbseg.data.classes import IGNORE_INDEX


# ---------------------------------------------------------------- pure functions
def restricted_argmax(logits: torch.Tensor, image_labels: torch.Tensor) -> torch.Tensor:
    """Self-prediction: argmax over the classes present in the image-level label only.

    logits (B, C, H, W), image_labels bool (B, C) -> (B, H, W) long. Absent classes get -inf, so a
    present class wins even when all its logits are negative (the release multiplied by the 0/1
    label, letting an absent class's 0 beat a present class's negative score: defect 1). An image
    with no label at all keeps the unrestricted argmax.
    """
    present = image_labels.to(torch.bool)
    present = present | ~present.any(dim=1, keepdim=True)  # no label at all: nothing to restrict to
    masked = logits.detach().masked_fill(~present[:, :, None, None], float("-inf"))
    return class_argmax(masked)


def region_masks(
    teacher: torch.Tensor, prediction: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """(consistent, inconsistent) bool (B, H, W): teacher == prediction / teacher != prediction.

    Pixels the teacher marks ``ignore_index`` (padding, outside the view) are in neither region.
    """
    valid = teacher != ignore_index
    agree = teacher == prediction
    return valid & agree, valid & ~agree


def _pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-pixel CE (B, H, W), 0 where the target is ``ignore_index``."""
    return F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")


def _region_mean(pixel_ce: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``pixel_ce`` over ``region``; an empty region gives exactly 0 with a live graph.

    Dividing by max(count, 1) instead of count keeps an empty region at 0/1 = 0 (the release got
    0/0 = NaN there: defect 2), and the gradient is a finite zero.
    """
    count = region.sum()
    total = (pixel_ce * region.to(pixel_ce.dtype)).sum()
    return total / count.clamp(min=1).to(pixel_ce.dtype), count


def masked_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    region: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE over the region's valid pixels, number of those pixels as a 0-d long tensor).

    logits (B, C, H, W), target (B, H, W) in 0..C-1 or ``ignore_index``, region bool (B, H, W)
    (None: every pixel). Empty region -> exactly 0 (not NaN), gradients finite.
    """
    valid = target != ignore_index
    region = valid if region is None else (region.to(torch.bool) & valid)
    return _region_mean(_pixel_cross_entropy(logits, target, ignore_index), region)


def adaptive_coefficient(consistent_history, inconsistent_history, coeff: float = 1.0) -> float:
    """Adaptive c = coeff * mean(consistent_history) / mean(inconsistent_history).

    Scales the noisy (inconsistent) region's loss to the magnitude of the reliable (consistent)
    one. Without information -- an empty history, or a non-positive mean inconsistent loss (no
    inconsistent pixels recently) -- there is nothing to rebalance: returns ``coeff`` (ratio 1).
    """
    cons = [float(v) for v in consistent_history]
    incons = [float(v) for v in inconsistent_history]
    if not cons or not incons:
        return float(coeff)
    mean_incons = sum(incons) / len(incons)
    if not mean_incons > 0.0:
        return float(coeff)
    return float(coeff) * (sum(cons) / len(cons)) / mean_incons


@dataclass
class CARBTerms:
    """Every term of one CARB loss evaluation, before any weighting.

    The CE terms are always computed (so warm-up runs can log how consistent teacher and model
    are); ``warmup_loss`` and ``balanced_loss`` say which of them are back-propagated. Patch terms
    are 0 without GLV.
    """

    global_ce: torch.Tensor  # warm-up: CE(global logits, teacher mask) over all valid pixels
    patch_ce: torch.Tensor  # warm-up: CE(patch logits, teacher patch mask)
    consistent: torch.Tensor  # CE_cons (global view)
    inconsistent: torch.Tensor  # CE_incons (global view)
    patch_consistent: torch.Tensor  # CE_patch_cons
    patch_inconsistent: torch.Tensor  # CE_patch_incons
    consistent_pixels: torch.Tensor
    inconsistent_pixels: torch.Tensor
    patch_consistent_pixels: torch.Tensor
    patch_inconsistent_pixels: torch.Tensor
    consistent_share: torch.Tensor  # consistent / (consistent + inconsistent) pixels, global view

    def cross_entropies(self) -> list[torch.Tensor]:
        """Every CE term (global, patch, consistent, inconsistent, ...): what a NaN/Inf guard checks."""
        return [self.global_ce, self.patch_ce, self.consistent, self.inconsistent, self.patch_consistent,
                self.patch_inconsistent]

    def warmup_loss(self) -> torch.Tensor:
        """Warm-up: plain CE on the teacher masks of both views, CE(global) + CE(patch)."""
        return self.global_ce + self.patch_ce

    def balanced_loss(self, coefficient: float | torch.Tensor) -> torch.Tensor:
        """After warm-up: CE_cons + c*CE_incons + CE_patch_cons + c*CE_patch_incons; c is a constant
        (a float, or a detached 0-d tensor on the device, never read back: the rebalancing is not
        back-propagated). Either way c is rounded to the terms' dtype first, as a Python float is."""
        if isinstance(coefficient, torch.Tensor):
            c = coefficient.detach().to(self.inconsistent.dtype)
        else:
            c = float(coefficient)
        return self.consistent + c * self.inconsistent + self.patch_consistent + c * self.patch_inconsistent


def carb_loss(
    global_logits: torch.Tensor,
    teacher_global: torch.Tensor,
    patch_logits: torch.Tensor | None,
    teacher_patch: torch.Tensor | None,
    image_labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    regions: bool = True,
) -> CARBTerms:
    """Every term of the CARB objective for one batch (pure: no state, no weighting).

    global_logits (B, C, H, W) with teacher_global (B, H, W); with GLV, patch_logits (B, C, h, w)
    -- the global logits cut out at the local patch -- with teacher_patch (B, h, w), the teacher's
    labels of the zoomed patch brought back to the patch size; both None without GLV.
    image_labels bool (B, C).

    The regions compare the teacher with the self-prediction restricted by -inf to the image-level
    classes; ``CARBTerms.warmup_loss`` / ``balanced_loss(c)`` add the terms up.

    ``regions=False`` leaves the region terms out (zeros; ``consistent_share`` NaN): a warm-up step
    back-propagates only the plain CE terms, so its regions serve its log line alone; computing them
    (the self-prediction over every pixel) took about 4 ms of the demo's 54 ms warm-up iteration.
    """
    zero = global_logits.new_zeros(())
    zero_count = torch.zeros((), dtype=torch.long, device=global_logits.device)
    with_patch = patch_logits is not None and teacher_patch is not None

    # The plain CE terms (the warm-up loss), over every valid pixel: the union of the two regions.
    pixel_ce = _pixel_cross_entropy(global_logits, teacher_global, ignore_index)
    global_ce, _ = _region_mean(pixel_ce, teacher_global != ignore_index)
    patch_ce = zero
    if with_patch:
        patch_pixel_ce = _pixel_cross_entropy(patch_logits, teacher_patch, ignore_index)
        patch_ce, _ = _region_mean(patch_pixel_ce, teacher_patch != ignore_index)
    if not regions:
        return CARBTerms(global_ce, patch_ce, zero, zero, zero, zero, zero_count, zero_count, zero_count, zero_count,
                         global_logits.new_full((), float("nan")))

    with torch.no_grad():
        prediction = restricted_argmax(global_logits, image_labels)
        cons_region, incons_region = region_masks(teacher_global, prediction, ignore_index)
    consistent, n_cons = _region_mean(pixel_ce, cons_region)
    inconsistent, n_incons = _region_mean(pixel_ce, incons_region)

    patch_cons = patch_incons = zero
    n_patch_cons = n_patch_incons = zero_count
    if with_patch:
        with torch.no_grad():
            patch_prediction = restricted_argmax(patch_logits, image_labels)
            patch_cons_region, patch_incons_region = region_masks(
                teacher_patch, patch_prediction, ignore_index
            )
        patch_cons, n_patch_cons = _region_mean(patch_pixel_ce, patch_cons_region)
        patch_incons, n_patch_incons = _region_mean(patch_pixel_ce, patch_incons_region)

    share = (n_cons.float() / (n_cons + n_incons).clamp(min=1).float()).detach()
    return CARBTerms(
        global_ce=global_ce,
        patch_ce=patch_ce,
        consistent=consistent,
        inconsistent=inconsistent,
        patch_consistent=patch_cons,
        patch_inconsistent=patch_incons,
        consistent_pixels=n_cons,
        inconsistent_pixels=n_incons,
        patch_consistent_pixels=n_patch_cons,
        patch_inconsistent_pixels=n_patch_incons,
        consistent_share=share,
    )


# ---------------------------------------------------------------- state: the adaptive-c queue and the objective
class LossQueue:
    """The last ``size`` (q) global-view CE_cons / CE_incons values, for the adaptive c.

    As in the authors' release, the queue holds the *global* consistent and inconsistent terms
    (not the patch terms, not their sum), and c = coeff * mean(CE_cons) / mean(CE_incons) scales
    both the global and the patch inconsistent terms. Unlike the release (zero-filled buffers that
    each GPU updates alone and that are lost on resume), only pushed values count, every push is
    first averaged across processes so all ranks hold the same queue and the same c, and the
    state is plain Python floats (checkpointable with ``torch.load(weights_only=True)``).

    The queue lives on the device of the values pushed (a window of q slots, oldest first, and the
    number of filled slots), and c is computed there: a training step never waits for the host to
    read a loss. ``consistent`` / ``inconsistent`` / ``len`` / ``state_dict`` read it (a device sync).
    """

    def __init__(self, size: int = 5):
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self._reset(size, [], [])

    def _reset(self, size: int, consistent: list[float], inconsistent: list[float]) -> None:
        self.size = size
        kept = min(len(consistent), size)
        self._window = torch.zeros(2, size, dtype=torch.float64)  # rows CE_cons, CE_incons; newest last
        if kept:
            self._window[:, size - kept:] = torch.tensor([consistent[-kept:], inconsistent[-kept:]],
                                                         dtype=torch.float64)
        self._filled = torch.tensor(kept)

    def _values(self, row: int) -> list[float]:
        filled = int(self._filled)
        return self._window[row, self.size - filled:].tolist()

    @property
    def consistent(self) -> list[float]:
        return self._values(0)

    @property
    def inconsistent(self) -> list[float]:
        return self._values(1)

    def __len__(self) -> int:
        return int(self._filled)

    def push(self, consistent: float | torch.Tensor, inconsistent: float | torch.Tensor,
             keep: bool | torch.Tensor = True) -> None:
        """Append one step's (CE_cons, CE_incons), averaged over all processes first (a collective:
        every rank must call it at the same step). ``keep`` (a device-side flag: the step's loss was
        finite on every process) False leaves the queue as it was, decided on the device."""
        device = consistent.device if isinstance(consistent, torch.Tensor) else torch.device("cpu")
        pair = torch.stack(
            [
                torch.as_tensor(consistent, dtype=torch.float64, device=device).detach().reshape(()),
                torch.as_tensor(inconsistent, dtype=torch.float64, device=device).detach().reshape(()),
            ]
        )
        # NCCL needs the pair on this process's GPU (named explicitly, never "the current device").
        pair = pair.to(distributed.collective_device(device))
        distributed.all_reduce_mean_(pair)
        pair = pair.to(device)
        if self._window.device != device:  # the first push after construction or a checkpoint load
            # non_blocking: a copy from pageable memory, without waiting for the device's queue.
            self._window = self._window.to(device, non_blocking=True)
            self._filled = self._filled.to(device, non_blocking=True)
        keep = torch.as_tensor(keep, device=device)
        shifted = torch.cat([self._window[:, 1:], pair[:, None]], dim=1)
        self._window = torch.where(keep, shifted, self._window)
        self._filled = torch.where(keep, (self._filled + 1).clamp(max=self.size), self._filled)

    def coefficient(self, coeff: float = 1.0) -> torch.Tensor:
        """Adaptive c from the queued values (``coeff`` when the queue is empty), as
        ``adaptive_coefficient`` computes it, but a 0-d float64 tensor on the queue's device."""
        filled = torch.arange(self.size, device=self._window.device) >= self.size - self._filled
        values = torch.where(filled, self._window, torch.zeros((), dtype=self._window.dtype,
                                                               device=self._window.device))
        count = self._filled.clamp(min=1).to(values.dtype)
        mean_cons, mean_incons = values[0].sum() / count, values[1].sum() / count
        informed = (self._filled > 0) & (mean_incons > 0)
        return torch.where(informed, float(coeff) * mean_cons / mean_incons,
                           torch.full((), float(coeff), dtype=values.dtype, device=values.device))

    def state_dict(self) -> dict:
        return {
            "size": self.size,
            "consistent": self.consistent,
            "inconsistent": self.inconsistent,
        }

    def load_state_dict(self, state: dict) -> None:
        self._reset(int(state.get("size", self.size)), [float(v) for v in state["consistent"]],
                    [float(v) for v in state["inconsistent"]])


@dataclass
class CARBLoss:
    """One step's objective: ``total`` is back-propagated; ``coefficient`` is the c that weighed the
    inconsistent terms (1.0 in warm-up, where plain CE weighs every pixel alike; the adaptive c is a
    0-d tensor on the device). ``finite``: the step's CE terms were finite on every process (a
    device-side flag; True when nobody checked)."""

    total: torch.Tensor
    coefficient: float | torch.Tensor
    warmup: bool
    terms: CARBTerms
    finite: bool | torch.Tensor = True

    def tensors(self) -> dict[str, torch.Tensor | float]:
        """Every scalar to log, still on the device (nothing read): total, c, warm-up flag, CE terms,
        pixel counts, share. ``scalars`` reads them."""
        out: dict[str, torch.Tensor | float] = {"c": self.coefficient, "warmup": float(self.warmup)}
        for key, value in vars(self.terms).items():
            out[key] = value.detach()
        out["total"] = self.total.detach()
        return out

    def scalars(self) -> dict[str, float]:
        """Every scalar as a float for the log (one device sync for all of them)."""
        return scalars_to_floats(self.tensors())


def scalars_to_floats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """``{name: 0-d tensor or float}`` as floats, the tensors read back together (one device sync)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        read = torch.stack([v.detach().to(device, torch.float64).reshape(())
                            for v in tensors.values()]).tolist()
        out.update(zip(tensors, read, strict=True))
    return {k: out[k] for k in values}


class CARBObjective:
    """The CARB objective with its running state: the warm-up rule, the loss queue and c.

    ``warmup_iters`` W: iterations 0..W-1 are plain CE (and every iteration when ``enabled`` is
    False: no CARB at all). Afterwards c is ``fixed_coefficient`` when given, else the adaptive
    c = coeff * mean(last q CE_cons) / mean(last q CE_incons), this step included. The state that a
    resume must restore is the queue (``state_dict`` is the queue's, saved as ``loss_queue``).
    """

    def __init__(self, warmup_iters: int = 0, fixed_coefficient: float | None = None, coeff: float = 1.0,
                 queue_size: int = 5, enabled: bool = True):
        self.warmup_iters = int(warmup_iters)
        self.fixed_coefficient = None if fixed_coefficient is None else float(fixed_coefficient)
        self.coeff = float(coeff)
        self.enabled = bool(enabled)
        self.queue = LossQueue(queue_size)

    @classmethod
    def from_config(cls, carb, warmup_iters: int) -> CARBObjective:
        """From the ``carb`` config section and ``train.warmup_iters``."""
        return cls(warmup_iters, carb.fixed_coefficient, carb.coeff, carb.queue_size, carb.enabled)

    def in_warmup(self, iteration: int) -> bool:
        return (not self.enabled) or iteration < self.warmup_iters

    def __call__(self, terms: CARBTerms, iteration: int, finite: bool | torch.Tensor = True) -> CARBLoss:
        """The loss of iteration ``iteration`` from its terms. With the adaptive c this pushes the
        step's global CE_cons / CE_incons into the queue first (a collective: every process calls it
        at the same iteration). ``finite`` False (a device-side flag: the step's loss was NaN/Inf on
        some process) keeps the queue as it was: nothing of such a step is kept."""
        if self.in_warmup(iteration):
            return CARBLoss(terms.warmup_loss(), 1.0, True, terms, finite)
        if self.fixed_coefficient is not None:
            c = self.fixed_coefficient
        else:
            # Adaptive c, as in the release: this step's CE_cons / CE_incons join the queue
            # (averaged over processes) before c is read; both stay on the device.
            self.queue.push(terms.consistent.detach(), terms.inconsistent.detach(), keep=finite)
            c = self.queue.coefficient(self.coeff)
        return CARBLoss(terms.balanced_loss(c), c, False, terms, finite)

    def state_dict(self) -> dict:
        return self.queue.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.queue.load_state_dict(state)
