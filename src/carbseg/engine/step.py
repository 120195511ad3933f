"""One training step of the method, callable on its own: teacher views, forward, CARB objective.

The trainer, the step benchmark (``benchmarks/bench_train_step.py``) and the study diagnostics
(``studies/camvid/diagnose.py``) all run these functions, so what is timed and what is diagnosed is
what is trained:

1. ``teacher_views``: the teacher labels the global view (dual path) or the offline pseudo-mask is
   the label (single path); GLV draws one local patch, zooms it by s, and the teacher's labels of
   the zoomed patch are resized back to the patch size. Frame maps (``batch["frames"]``) follow the
   zoom, so a teacher that reads them sees where each pixel came from;
2. ``segmenter_logits``: the segmenter runs on the global batch only, under the training autocast;
   the logits (fp32) are cut out at the patch region;
3. ``training_step``: the CARB terms on both views (``carb_loss``), the NaN/Inf flag (on the
   device, never read here), then the run's ``CARBObjective`` (warm-up rule, loss queue, c);
   it returns the ``CARBLoss``: the total to back-propagate, the flag and the terms to log.

Backward, gradient accumulation and the optimizer step stay with the caller (the trainer wraps
them in DDP's ``no_sync`` and the AMP GradScaler; the benchmark times them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch

from carbseg.data.classes import IGNORE_INDEX
from carbseg.engine.guards import all_ranks_finite
from carbseg.precision import autocast

#: ``timer(name)`` -> a context manager around one part of the step (the benchmark's stopwatch).
Timer = Callable[[str], contextlib.AbstractContextManager]


def _untimed(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class TeacherViews(NamedTuple):
    """The teacher's labels of one batch: the global view, and with GLV the local patch."""

    global_labels: torch.Tensor  # (B, H, W) train ids, 255 = ignore
    patch: object | None  # carbseg.data.views.LocalPatch, None without GLV
    patch_labels: torch.Tensor | None  # (B, h, w), the zoomed patch's labels at the patch size


#: Batch entries that stay on the host: where each view lies in its frame, read on the CPU by the
#: one teacher that reads them (the simulated one); a round trip to the GPU and back would be wasted.
HOST_ENTRIES = ("frames", "frame_keys", "indices")


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """A collated training batch on ``device``, images as float (0..255) in the collated layout: the
    segmenter brings its input to its own (``Segmenter.use_memory_format``). ``HOST_ENTRIES`` stay."""
    non_blocking = device.type == "cuda"
    batch = {k: v if k in HOST_ENTRIES else v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
    batch["images"] = batch["images"].float()
    return batch


def teacher_views(teacher, batch: dict, cfg, generator: torch.Generator, single_path: bool,
                  timer: Timer = _untimed) -> TeacherViews:
    """Teacher labels for the global view and for the GLV local patch (no gradient, ever).

    ``batch`` holds ``images``, ``valid`` and ``image_labels``, and ``masks``: the offline pseudo-mask
    in the single path, the ground truth for a teacher that reads it, absent otherwise (CLIP reads
    neither); ``frames`` / ``frame_keys`` (on the host) when the augmentation returned frame maps.
    """
    from carbseg.data import views
    from carbseg.data.frames import FrameMaps

    images, valid, image_labels = batch["images"], batch["valid"], batch["image_labels"]
    masks = batch.get("masks")
    reads_gt = teacher is not None and teacher.reads_ground_truth
    gt = masks if reads_gt else None
    # Frame maps, like the ground truth, only for the teacher that reads them (the simulated one).
    frames = None
    if reads_gt and "frames" in batch:
        frames = FrameMaps(batch["frame_keys"].cpu(), batch["frames"].cpu())
    with timer("teacher_global"):
        if single_path:
            global_labels = masks.masked_fill(~valid, IGNORE_INDEX)
        else:
            global_labels = teacher(images, image_labels, gt=gt, valid=valid, frames=frames)
    if not cfg.glv.enabled:
        return TeacherViews(global_labels, None, None)
    with timer("teacher_local"):
        patch = views.sample_local_patch(
            tuple(images.shape[-2:]), tuple(cfg.glv.patch_size), cfg.glv.scale_offset, cfg.glv.scale_rate,
            generator,
        )
        if single_path:
            patch_labels = views.cut_out(global_labels, patch)
        else:
            # GLV: zooming gives CLIP's 16-pixel patches a finer footprint on small objects.
            zoomed = views.zoom_images(images, patch)
            zoomed_gt = views.zoom_labels(gt, patch) if gt is not None else None
            zoomed_valid = views.zoom_labels(valid, patch)
            zoomed_frames = None if frames is None else frames.zoomed(
                patch.top, patch.left, (patch.height, patch.width), patch.zoomed_hw)
            zoomed_labels = teacher(zoomed, image_labels, gt=zoomed_gt, valid=zoomed_valid, frames=zoomed_frames)
            patch_labels = views.labels_to_patch_size(zoomed_labels, patch)
    return TeacherViews(global_labels, patch, patch_labels)


def segmenter_logits(model: torch.nn.Module, images: torch.Tensor, patch,
                     amp: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(global logits (B, C, H, W) in fp32, the same logits cut out at the GLV patch or None).

    The segmenter sees the global view only (as in the release); the patch's logits are a window of
    the global ones, compared with the teacher's finer labels of the zoomed patch.
    """
    from carbseg.data import views

    with autocast(images.device, amp):
        logits = model(images)
    logits = logits.float()
    return logits, (views.cut_out(logits, patch) if patch is not None else None)


def training_step(model: torch.nn.Module, teacher, batch: dict, cfg, generator: torch.Generator, *,
                  iteration: int, objective, single_path: bool, amp: torch.dtype | None = None,
                  timer: Timer = _untimed, log_terms: bool = True):
    """Teacher views, segmenter forward and CARB objective of one (micro-)batch already on its device.

    ``objective`` is the run's ``carbseg.losses.carb.CARBObjective`` (warm-up rule, loss queue, c).
    Returns its ``CARBLoss`` -- ``total`` to back-propagate, the terms to log -- with ``finite``, a
    device-side flag: every CE term finite on every process. It is decided before the objective
    pushes its queue, which keeps nothing of a non-finite step; the caller skips such a step's
    update (``carbseg.engine.guards.step_unless_nonfinite``). Nothing is read back to the host.
    ``log_terms=False`` says that nobody reads this step's terms: a warm-up step then skips the
    CARB regions it does not back-propagate (``carb_loss(regions=False)``; same gradients).
    """
    from carbseg.losses import carb

    # Outside the segmenter's autocast: the teacher runs at its own precision, so its masks
    # equal `carbseg pseudo-masks`' under any train.amp (scores promised in fp32).
    with torch.inference_mode():
        views = teacher_views(teacher, batch, cfg, generator, single_path, timer=timer)
    # Inference tensors cannot be saved for backward: the targets are cloned out of inference mode.
    global_labels = views.global_labels.clone()
    patch_labels = views.patch_labels.clone() if views.patch_labels is not None else None

    with timer("forward"):
        logits, patch_logits = segmenter_logits(model, batch["images"], views.patch, amp)
    with timer("loss"):
        regions = log_terms or not objective.in_warmup(iteration)
        terms = carb.carb_loss(logits, global_labels, patch_logits, patch_labels, batch["image_labels"],
                               regions=regions)
        finite = all_ranks_finite(terms.cross_entropies(), logits.device)
        return objective(terms, iteration, finite=finite)  # a non-finite step leaves the queue as it was
