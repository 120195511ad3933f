"""engine/step.py on its own: what the teacher is handed, the views it labels, the logits and the loss.

A recording stand-in teacher and a fixed 1x1-convolution segmenter make every value checkable by hand.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from carbseg.data import views
from carbseg.data.frames import FrameMaps
from carbseg.engine import step
from carbseg.losses.carb import CARBObjective

C = 3


class RecordingTeacher:
    """Labels every pixel with one class, and records what it was called with."""

    def __init__(self, reads_ground_truth: bool, label: int = 1):
        self.reads_ground_truth = reads_ground_truth
        self.label = label
        self.calls = []

    def __call__(self, images, image_labels, gt=None, valid=None, frames=None):
        self.calls.append({"images": images, "gt": gt, "valid": valid, "frames": frames})
        return torch.full((images.shape[0], *images.shape[-2:]), self.label, dtype=torch.long)


def glv_cfg(enabled: bool = True):
    return SimpleNamespace(glv=SimpleNamespace(enabled=enabled, patch_size=(4, 6), scale_offset=1.5, scale_rate=1.0))


def make_batch(frames: bool = True) -> dict:
    gen = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.randint(0, 256, (2, 3, 8, 12), generator=gen, dtype=torch.uint8),
        "valid": torch.ones(2, 8, 12, dtype=torch.bool),
        "masks": torch.randint(0, C, (2, 8, 12), generator=gen),
        "image_labels": torch.tensor([[True, True, False], [True, False, True]]),
    }
    batch["valid"][:, :, -3:] = False  # padding on the right
    if frames:
        batch["frame_keys"] = torch.tensor([11, 12])
        batch["frames"] = torch.tensor([[1.0, 0.0, 1.0, 0.0], [2.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    return batch


def expected_patch(batch, cfg, seed: int = 5):
    return views.sample_local_patch(tuple(batch["images"].shape[-2:]), cfg.glv.patch_size, cfg.glv.scale_offset,
                                    cfg.glv.scale_rate, torch.Generator().manual_seed(seed))


def recording_timer(names: list):
    def timer(name):
        names.append(name)
        return torch.autograd.profiler.record_function(name)
    return timer


def test_batch_to_device_moves_all_but_the_host_entries_and_makes_images_float():
    batch = make_batch()
    moved = step.batch_to_device(batch, torch.device("meta"))
    assert moved["images"].device.type == "meta" and moved["images"].dtype == torch.float32
    assert moved["valid"].device.type == "meta" and moved["masks"].device.type == "meta"
    assert moved["frames"] is batch["frames"] and moved["frame_keys"] is batch["frame_keys"]
    assert set(moved) == set(batch)


def test_a_teacher_that_reads_no_ground_truth_gets_neither_masks_nor_frames():
    batch, cfg = make_batch(), glv_cfg()
    teacher = RecordingTeacher(reads_ground_truth=False)
    out = step.teacher_views(teacher, batch, cfg, torch.Generator().manual_seed(5), single_path=False)
    assert len(teacher.calls) == 2
    assert all(call["gt"] is None and call["frames"] is None for call in teacher.calls)
    assert torch.equal(teacher.calls[0]["valid"], batch["valid"])
    assert out.patch == expected_patch(batch, cfg)


def test_the_simulated_teacher_gets_masks_valid_and_frames_of_both_views():
    batch, cfg = make_batch(), glv_cfg()
    teacher = RecordingTeacher(reads_ground_truth=True, label=2)
    names = []
    out = step.teacher_views(teacher, batch, cfg, torch.Generator().manual_seed(5), single_path=False,
                             timer=recording_timer(names))
    patch = expected_patch(batch, cfg)
    assert names == ["teacher_global", "teacher_local"]
    assert out.patch == patch
    global_call, local_call = teacher.calls
    assert torch.equal(global_call["images"], batch["images"]) and torch.equal(global_call["gt"], batch["masks"])
    assert torch.equal(global_call["valid"], batch["valid"])
    assert torch.equal(global_call["frames"].keys, batch["frame_keys"])
    assert torch.equal(global_call["frames"].affine, batch["frames"])
    # The local view: zoomed pixels, labels, valid mask and frame maps of the same patch.
    assert torch.equal(local_call["images"], views.zoom_images(batch["images"], patch))
    assert torch.equal(local_call["gt"], views.zoom_labels(batch["masks"], patch))
    assert torch.equal(local_call["valid"], views.zoom_labels(batch["valid"], patch))
    zoomed = FrameMaps(batch["frame_keys"], batch["frames"]).zoomed(patch.top, patch.left,
                                                                    (patch.height, patch.width), patch.zoomed_hw)
    assert torch.equal(local_call["frames"].affine, zoomed.affine)
    assert out.global_labels.eq(2).all() and out.patch_labels.shape == (2, patch.height, patch.width)
    assert out.patch_labels.eq(2).all()
    # Without frame maps in the batch, none are made up.
    teacher.calls.clear()
    step.teacher_views(teacher, make_batch(frames=False), cfg, torch.Generator().manual_seed(5), single_path=False)
    assert teacher.calls[0]["frames"] is None and teacher.calls[1]["frames"] is None


def test_single_path_labels_are_the_offline_masks_with_padding_ignored():
    batch, cfg = make_batch(), glv_cfg()
    out = step.teacher_views(None, batch, cfg, torch.Generator().manual_seed(5), single_path=True)
    expected = batch["masks"].clone()
    expected[:, :, -3:] = 255
    assert torch.equal(out.global_labels, expected)
    assert torch.equal(out.patch_labels, views.cut_out(expected, expected_patch(batch, cfg)))
    plain = step.teacher_views(None, batch, glv_cfg(enabled=False), torch.Generator().manual_seed(5),
                               single_path=True)
    assert torch.equal(plain.global_labels, expected) and plain.patch is None and plain.patch_labels is None


def fixed_segmenter() -> torch.nn.Module:
    model = torch.nn.Conv2d(3, C, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.01, 0.0, 0.0], [0.0, 0.01, 0.0], [0.0, 0.0, 0.01]]).view(C, 3, 1, 1))
        model.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return model


def test_segmenter_logits_run_under_the_given_autocast_and_cut_out_the_patch():
    model, images = fixed_segmenter(), make_batch()["images"].float()
    patch = views.LocalPatch(top=2, left=3, height=4, width=6, scale=1.5)
    logits, patch_logits = step.segmenter_logits(model, images, patch)
    assert torch.equal(logits, model(images)) and torch.equal(patch_logits, logits[:, :, 2:6, 3:9])
    assert step.segmenter_logits(model, images, None)[1] is None
    low, _ = step.segmenter_logits(model, images, None, amp=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(images).float()
    assert low.dtype == torch.float32 and torch.equal(low, reference) and not torch.equal(low, logits)


def run_step(iteration=0, log_terms=True, teacher=None, single_path=False, amp=None, model=None, names=None,
             objective=None, glv=True):
    batch, cfg = make_batch(), glv_cfg(glv)
    batch["images"] = batch["images"].float()
    teacher = teacher or RecordingTeacher(reads_ground_truth=False, label=1)
    kwargs = {} if log_terms is None else {"log_terms": log_terms}
    if names is not None:
        kwargs["timer"] = recording_timer(names)
    objective = objective or CARBObjective(warmup_iters=1)
    return step.training_step(model or fixed_segmenter(), teacher, batch, cfg, torch.Generator().manual_seed(5),
                              iteration=iteration, objective=objective, single_path=single_path, amp=amp,
                              **kwargs), batch, cfg


def reference_terms(batch, cfg, global_labels, amp=None):
    from carbseg.losses.carb import carb_loss

    patch = expected_patch(batch, cfg)
    logits, patch_logits = step.segmenter_logits(fixed_segmenter(), batch["images"], patch, amp)
    patch_labels = views.cut_out(global_labels, patch)
    return carb_loss(logits, global_labels, patch_logits, patch_labels, batch["image_labels"])


def test_training_step_is_the_carb_loss_of_the_teacher_views_and_the_logits():
    names = []
    loss, batch, cfg = run_step(iteration=1, names=names)  # after warm-up
    assert names == ["teacher_global", "teacher_local", "forward", "loss"]
    expected = reference_terms(batch, cfg, torch.ones(2, 8, 12, dtype=torch.long))
    assert not loss.warmup and loss.terms.patch_ce.item() > 0
    for name in ("global_ce", "patch_ce", "consistent", "inconsistent", "patch_consistent", "patch_inconsistent"):
        assert getattr(loss.terms, name).item() == pytest.approx(getattr(expected, name).item(), rel=1e-6), name
    assert bool(loss.finite)
    # The single path reads the offline masks, not the teacher.
    single, batch, cfg = run_step(iteration=1, single_path=True)
    expected = reference_terms(batch, cfg, batch["masks"].masked_fill(~batch["valid"], 255))
    assert single.terms.global_ce.item() == pytest.approx(expected.global_ce.item(), rel=1e-6)
    assert single.terms.patch_ce.item() == pytest.approx(expected.patch_ce.item(), rel=1e-6)


def test_training_step_without_glv_has_no_patch_terms():
    loss, batch, cfg = run_step(iteration=1, glv=False)
    assert loss.terms.patch_ce.item() == 0.0 and int(loss.terms.patch_consistent_pixels) == 0
    logits, _ = step.segmenter_logits(fixed_segmenter(), batch["images"], None)
    from carbseg.losses.carb import carb_loss

    expected = carb_loss(logits, torch.ones(2, 8, 12, dtype=torch.long), None, None, batch["image_labels"])
    assert loss.total.item() == pytest.approx(expected.balanced_loss(loss.coefficient).item(), rel=1e-6)


def test_training_step_runs_the_segmenter_under_its_amp():
    loss, batch, cfg = run_step(iteration=1, amp=torch.bfloat16)
    expected = reference_terms(batch, cfg, torch.ones(2, 8, 12, dtype=torch.long), amp=torch.bfloat16)
    plain = reference_terms(batch, cfg, torch.ones(2, 8, 12, dtype=torch.long))
    assert loss.terms.global_ce.item() == pytest.approx(expected.global_ce.item(), rel=1e-6)
    assert expected.global_ce.item() != plain.global_ce.item()


def test_warmup_steps_skip_the_regions_only_when_nobody_logs_them():
    logged, _, _ = run_step(iteration=0, log_terms=None)  # default: the terms are logged
    assert int(logged.terms.consistent_pixels) + int(logged.terms.inconsistent_pixels) > 0
    quiet, _, _ = run_step(iteration=0, log_terms=False)
    assert int(quiet.terms.consistent_pixels) == 0 and math.isnan(quiet.terms.consistent_share.item())
    assert quiet.total.item() == pytest.approx(logged.total.item(), rel=1e-6)
    after, _, _ = run_step(iteration=1, log_terms=False)  # after warm-up the regions are the loss
    assert int(after.terms.consistent_pixels) + int(after.terms.inconsistent_pixels) > 0


def test_a_non_finite_step_is_flagged_and_leaves_the_queue_alone():
    model = fixed_segmenter()
    with torch.no_grad():
        model.bias[0] = float("nan")
    objective = CARBObjective(warmup_iters=0)
    loss, _, _ = run_step(iteration=0, model=model, objective=objective)
    assert not bool(loss.finite) and len(objective.queue) == 0
