"""CARB loss: hand-computed cross-entropies, the -inf restriction, empty regions, adaptive c, the queue."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from carbseg.losses.carb import (
    CARBObjective,
    LossQueue,
    adaptive_coefficient,
    carb_loss,
    masked_cross_entropy,
    region_masks,
    restricted_argmax,
)


def ce2(target_logit: float, other_logit: float) -> float:
    """Two-class cross-entropy by hand: -log(e^t / (e^t + e^o)) = log(1 + e^(o - t))."""
    return math.log(1.0 + math.exp(other_logit - target_logit))


# 2 classes, one 2x2 image. Class-0 and class-1 logits per pixel:
#   (0,0): (2, 0)  (0,1): (0, 1)
#   (1,0): (0, 3)  (1,1): (1, 0)
# -> self-prediction [[0, 1], [1, 0]]; teacher [[0, 0], [1, 1]]
# -> consistent pixels (0,0), (1,0); inconsistent (0,1), (1,1).
LOGITS = [[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [3.0, 0.0]]]
TEACHER = [[0, 0], [1, 1]]
CE_00, CE_01, CE_10, CE_11 = ce2(2, 0), ce2(0, 1), ce2(3, 0), ce2(0, 1)
CE_CONS = (CE_00 + CE_10) / 2
CE_INCONS = (CE_01 + CE_11) / 2


def example(requires_grad: bool = True):
    logits = torch.tensor([LOGITS], requires_grad=requires_grad)
    teacher = torch.tensor([TEACHER])
    labels = torch.tensor([[True, True]])
    return logits, teacher, labels


def test_restricted_argmax_uses_minus_inf_not_zero_one_multiplication():
    # One pixel, three classes, class 2 absent from the image-level label.
    logits = torch.tensor([-1.0, -2.0, 5.0]).view(1, 3, 1, 1)
    labels = torch.tensor([[True, True, False]])
    # The release's defect 1: scores * 0/1 label -> (-1, -2, 0): the absent class 2 wins.
    assert int((logits * labels[:, :, None, None]).argmax(1)) == 2
    assert int(restricted_argmax(logits, labels)) == 0
    # Same with an absent class whose score is below the present ones: 0 still beats -1 and -2.
    logits_low = torch.tensor([-1.0, -2.0, -5.0]).view(1, 3, 1, 1)
    assert int((logits_low * labels[:, :, None, None]).argmax(1)) == 2
    assert int(restricted_argmax(logits_low, labels)) == 0


def test_restricted_argmax_without_any_label_is_plain_argmax():
    logits = torch.tensor([0.0, 3.0, 1.0]).view(1, 3, 1, 1)
    assert int(restricted_argmax(logits, torch.zeros(1, 3, dtype=torch.bool))) == 1


def test_region_masks_split_valid_pixels_and_skip_ignore():
    teacher = torch.tensor([[[0, 0], [1, 255]]])
    prediction = torch.tensor([[[0, 1], [1, 1]]])
    cons, incons = region_masks(teacher, prediction)
    assert cons.tolist() == [[[True, False], [True, False]]]
    assert incons.tolist() == [[[False, True], [False, False]]]


def test_masked_cross_entropy_by_hand():
    logits, teacher, _ = example()
    cons, incons = region_masks(teacher, torch.tensor([[[0, 1], [1, 0]]]))
    loss, count = masked_cross_entropy(logits, teacher, cons)
    assert int(count) == 2
    assert loss.item() == pytest.approx(CE_CONS, rel=1e-6)
    loss, count = masked_cross_entropy(logits, teacher, incons)
    assert (loss.item(), int(count)) == (pytest.approx(CE_INCONS, rel=1e-6), 2)
    # region None = every valid pixel; ignore pixels are excluded from the mean and the count
    teacher_ignore = teacher.clone()
    teacher_ignore[0, 1, 1] = 255
    loss, count = masked_cross_entropy(logits, teacher_ignore)
    assert int(count) == 3
    assert loss.item() == pytest.approx((CE_00 + CE_01 + CE_10) / 3, rel=1e-6)


def test_empty_region_gives_exact_zero_and_finite_gradient():
    logits, teacher, _ = example()
    empty = torch.zeros(1, 2, 2, dtype=torch.bool)
    loss, count = masked_cross_entropy(logits, teacher, empty)
    assert int(count) == 0 and loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))
    # The release's defect 2: averaging an empty region the usual way is NaN.
    assert math.isnan(
        F.cross_entropy(logits.detach(), torch.full_like(teacher, 255), ignore_index=255).item()
    )


def test_carb_loss_after_warmup_by_hand():
    logits, teacher, labels = example()
    terms = carb_loss(logits, teacher, None, None, labels)
    assert terms.consistent.item() == pytest.approx(CE_CONS, rel=1e-6)
    assert terms.inconsistent.item() == pytest.approx(CE_INCONS, rel=1e-6)
    assert (int(terms.consistent_pixels), int(terms.inconsistent_pixels)) == (2, 2)
    assert terms.consistent_share.item() == pytest.approx(0.5)
    assert terms.balanced_loss(0.5).item() == pytest.approx(CE_CONS + 0.5 * CE_INCONS, rel=1e-6)
    assert terms.patch_consistent.item() == 0.0 and terms.patch_inconsistent.item() == 0.0
    # c is a plain float: the gradient of the inconsistent pixels is scaled by exactly c.
    terms.balanced_loss(0.5).backward()
    grad_full = logits.grad.clone()
    logits.grad = None
    carb_loss(logits, teacher, None, None, labels).balanced_loss(1.0).backward()
    assert torch.allclose(grad_full[..., 0, 1], 0.5 * logits.grad[..., 0, 1])  # inconsistent pixel
    assert torch.allclose(grad_full[..., 0, 0], logits.grad[..., 0, 0])  # consistent pixel


def test_carb_loss_with_patch_terms_by_hand():
    logits, teacher, labels = example()
    # The local patch is the top row (cut out of the global logits): pixel (0,0) consistent, (0,1) not.
    # The teacher's patch labels differ from its global ones: it says class 1 at (0,0) -> inconsistent,
    # and class 1 at (0,1) -> consistent with the self-prediction 1.
    patch_logits = logits[..., :1, :]
    teacher_patch = torch.tensor([[[1, 1]]])
    terms = carb_loss(logits, teacher, patch_logits, teacher_patch, labels)
    patch_cons, patch_incons = ce2(1, 0), ce2(0, 2)  # (0,1) target 1: logits (0,1); (0,0) target 1: (2,0)
    assert terms.patch_consistent.item() == pytest.approx(patch_cons, rel=1e-6)
    assert terms.patch_inconsistent.item() == pytest.approx(patch_incons, rel=1e-6)
    assert (int(terms.patch_consistent_pixels), int(terms.patch_inconsistent_pixels)) == (1, 1)
    expected = CE_CONS + 0.25 * CE_INCONS + patch_cons + 0.25 * patch_incons
    assert terms.balanced_loss(0.25).item() == pytest.approx(expected, rel=1e-6)
    # Warm-up: plain CE on both views, no c.
    all_global = (CE_00 + CE_01 + CE_10 + CE_11) / 4
    assert terms.global_ce.item() == pytest.approx(all_global, rel=1e-6)
    assert terms.warmup_loss().item() == pytest.approx(all_global + (patch_cons + patch_incons) / 2, rel=1e-6)


def test_carb_self_prediction_is_restricted_to_image_classes():
    # 3 classes; class 2 absent but with the largest logit. Teacher says class 0 everywhere.
    logits = torch.tensor([[[[-1.0]], [[-2.0]], [[5.0]]]])
    teacher = torch.tensor([[[0]]])
    labels = torch.tensor([[True, True, False]])
    terms = carb_loss(logits, teacher, None, None, labels)
    # restricted prediction = 0 = teacher -> consistent (the 0/1 product would have said 2: inconsistent)
    assert (int(terms.consistent_pixels), int(terms.inconsistent_pixels)) == (1, 0)
    assert terms.inconsistent.item() == 0.0
    assert math.isfinite(terms.balanced_loss(1.0).item())


def test_carb_loss_all_consistent_is_finite_with_gradients():
    logits, _, labels = example()
    teacher = torch.tensor([[[0, 1], [1, 0]]])  # = the self-prediction
    terms = carb_loss(logits, teacher, logits[..., :1, :], teacher[:, :1, :], labels)
    assert int(terms.inconsistent_pixels) == 0 and terms.inconsistent.item() == 0.0
    terms.balanced_loss(3.0).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_objective_owns_warmup_fixed_and_adaptive_c():
    logits, teacher, labels = example()
    terms = carb_loss(logits, teacher, None, None, labels)
    # Warm-up (iterations 0, 1): plain CE, c = 1, the queue untouched.
    adaptive = CARBObjective(warmup_iters=2, coeff=0.5, queue_size=2)
    warm = adaptive(terms, 1)
    assert warm.warmup and warm.coefficient == 1.0 and len(adaptive.queue) == 0
    assert warm.total.item() == pytest.approx((CE_00 + CE_01 + CE_10 + CE_11) / 4, rel=1e-6)
    # After: this step joins the queue before c = coeff * mean(cons) / mean(incons) is read.
    after = adaptive(terms, 2)
    c = 0.5 * CE_CONS / CE_INCONS
    assert not after.warmup and after.coefficient == pytest.approx(c, rel=1e-6)
    assert after.total.item() == pytest.approx(CE_CONS + c * CE_INCONS, rel=1e-6)
    assert list(adaptive.queue.consistent) == pytest.approx([CE_CONS], rel=1e-6)
    # A fixed c never touches the queue; carb.enabled = false is warm-up forever.
    fixed = CARBObjective(warmup_iters=0, fixed_coefficient=2.0)
    assert fixed(terms, 0).total.item() == pytest.approx(CE_CONS + 2.0 * CE_INCONS, rel=1e-6)
    assert len(fixed.queue) == 0
    assert CARBObjective(enabled=False)(terms, 10**6).warmup
    scalars = after.scalars()
    assert scalars["c"] == after.coefficient and scalars["warmup"] == 0.0
    assert scalars["total"] == pytest.approx(after.total.item()) and scalars["consistent_pixels"] == 2.0


def test_objective_state_is_the_checkpoints_loss_queue(tmp_path):
    # Checkpoints keep the queue under "loss_queue" in LossQueue's own format, before and after the objective.
    old = LossQueue(size=3)
    for cons, incons in [(0.5, 2.0), (0.25, 1.0)]:
        old.push(cons, incons)
    path = tmp_path / "state.pt"
    torch.save({"loss_queue": old.state_dict()}, path)
    objective = CARBObjective(queue_size=3)
    objective.load_state_dict(torch.load(path, weights_only=True)["loss_queue"])
    assert objective.state_dict() == old.state_dict()
    logits, teacher, labels = example()
    c = objective(carb_loss(logits, teacher, None, None, labels), 0).coefficient
    assert c == pytest.approx((0.5 + 0.25 + CE_CONS) / (2.0 + 1.0 + CE_INCONS), rel=1e-6)


def test_adaptive_coefficient_values_and_edge_cases():
    assert adaptive_coefficient([1.0, 2.0, 3.0], [2.0, 4.0]) == pytest.approx(2.0 / 3.0)
    assert adaptive_coefficient([1.0, 2.0, 3.0], [2.0, 4.0], coeff=0.5) == pytest.approx(1.0 / 3.0)
    assert adaptive_coefficient([], [], coeff=0.7) == 0.7  # nothing known yet: no rebalancing
    assert adaptive_coefficient([1.0], [0.0], coeff=1.0) == 1.0  # no inconsistent loss: no rebalancing


def test_loss_queue_keeps_last_q_and_feeds_c():
    queue = LossQueue(size=2)
    assert queue.coefficient(0.9) == 0.9
    queue.push(10.0, 1.0)
    queue.push(torch.tensor(1.0), torch.tensor(2.0))
    queue.push(3.0, 6.0)  # drops (10, 1)
    assert list(queue.consistent) == [1.0, 3.0] and list(queue.inconsistent) == [2.0, 6.0]
    assert queue.coefficient() == pytest.approx(2.0 / 4.0)
    assert queue.coefficient(2.0) == pytest.approx(1.0)


def test_loss_queue_checkpoint_round_trip(tmp_path):
    queue = LossQueue(size=3)
    for cons, incons in [(0.5, 2.0), (0.25, 1.0), (0.75, 3.0), (1.0, 4.0)]:
        queue.push(cons, incons)
    path = tmp_path / "state.pt"
    torch.save({"loss_queue": queue.state_dict()}, path)
    restored = LossQueue(size=3)
    restored.load_state_dict(torch.load(path, weights_only=True)["loss_queue"])
    assert list(restored.consistent) == [0.25, 0.75, 1.0]
    assert restored.coefficient() == queue.coefficient() == pytest.approx(2.0 / 8.0)
    restored.push(9.0, 9.0)
    assert len(restored) == 3  # maxlen survives the round trip


def _queue_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        queue = LossQueue(size=5)
        queue.push(float(rank + 1), float(2 * (rank + 1)))  # rank 0: (1, 2); rank 1: (2, 4)
        torch.save(queue.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_loss_queue_push_goes_through_the_cross_process_mean(monkeypatch):
    # Stand-in for a 2-process all-reduce where the other rank pushed (3, 5): the mean is stored.
    import carbseg.distributed

    def fake_mean_(tensor):
        tensor.add_(torch.tensor([3.0, 5.0], dtype=tensor.dtype)).div_(2)
        return tensor

    monkeypatch.setattr(carbseg.distributed, "all_reduce_mean_", fake_mean_)
    queue = LossQueue(size=5)
    queue.push(1.0, 1.0)
    assert list(queue.consistent) == [2.0] and list(queue.inconsistent) == [3.0]


@pytest.mark.slow
def test_loss_queue_push_is_averaged_across_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_queue_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert states[0] == states[1]
    assert states[0]["consistent"] == [1.5] and states[0]["inconsistent"] == [3.0]


def test_without_regions_the_warmup_terms_are_bit_identical_and_the_regions_left_out():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 12, 16, requires_grad=True)
    teacher = torch.randint(0, 5, (2, 12, 16))
    teacher[:, :2] = 255
    patch_logits, patch_teacher = logits[:, :, 2:8, 4:12], torch.randint(0, 5, (2, 6, 8))
    labels = torch.rand(2, 5) > 0.3
    full = carb_loss(logits, teacher, patch_logits, patch_teacher, labels)
    light = carb_loss(logits, teacher, patch_logits, patch_teacher, labels, regions=False)
    assert torch.equal(light.global_ce, full.global_ce) and torch.equal(light.patch_ce, full.patch_ce)
    assert torch.equal(light.warmup_loss(), full.warmup_loss())
    (grad_full,) = torch.autograd.grad(full.warmup_loss(), logits)
    (grad_light,) = torch.autograd.grad(light.warmup_loss(), logits)
    assert torch.equal(grad_full, grad_light)
    assert full.consistent > 0 and light.consistent == 0 and light.inconsistent_pixels == 0
    assert torch.isnan(light.consistent_share)


# ---------------------------------------------------------------- edge cases found by mutation testing
def test_restricted_argmax_restricts_each_image_alone_and_accepts_0_1_labels():
    # Image 0 is labelled {0}; image 1 has no label at all and keeps the unrestricted argmax (class 2),
    # whatever its neighbour in the batch holds. Labels as 0/1 floats mean the same as booleans.
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]).view(2, 3, 1, 1)
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert restricted_argmax(logits, labels).flatten().tolist() == [0, 2]
    assert restricted_argmax(logits, labels.bool()).flatten().tolist() == [0, 2]


def test_masked_cross_entropy_accepts_a_0_1_region():
    logits, teacher, _ = example()
    region = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # the consistent pixels (0,0), (1,0)
    loss, count = masked_cross_entropy(logits, teacher, region)
    assert int(count) == 2 and loss.item() == pytest.approx(CE_CONS, rel=1e-6)


def test_adaptive_coefficient_with_one_history_empty_or_small_losses():
    assert adaptive_coefficient([], [1.0], coeff=0.7) == 0.7  # nothing consistent known yet
    assert adaptive_coefficient([1.0], [], coeff=0.7) == 0.7
    assert adaptive_coefficient([1.0], [0.5]) == pytest.approx(2.0)  # a loss below 1 is information too


def test_balanced_loss_rounds_a_tensor_c_to_the_terms_dtype_like_a_float():
    logits, teacher, labels = example()
    terms = carb_loss(logits, teacher, None, None, labels)
    as_tensor = terms.balanced_loss(torch.tensor(1.0 / 3.0, dtype=torch.float64))
    assert as_tensor.dtype == torch.float32
    assert torch.equal(as_tensor, terms.balanced_loss(1.0 / 3.0))


def test_carb_loss_counts_are_long_and_regions_use_the_given_ignore_index():
    logits, teacher, labels = example()
    for regions in (True, False):
        terms = carb_loss(logits, teacher, None, None, labels, regions=regions)
        counts = [terms.consistent_pixels, terms.inconsistent_pixels, terms.patch_consistent_pixels,
                  terms.patch_inconsistent_pixels]
        assert all(count.dtype == torch.long for count in counts)
    # ignore_index 1: the teacher's class-1 pixels (bottom row) are in neither region, on both views.
    terms = carb_loss(logits, teacher, logits, teacher, labels, ignore_index=1)
    assert (int(terms.consistent_pixels), int(terms.inconsistent_pixels)) == (1, 1)  # (0,0) agrees, (0,1) not
    assert (int(terms.patch_consistent_pixels), int(terms.patch_inconsistent_pixels)) == (1, 1)
    assert terms.consistent.item() == pytest.approx(CE_00, rel=1e-6)
    assert terms.patch_inconsistent.item() == pytest.approx(CE_01, rel=1e-6)


def test_carb_loss_needs_both_patch_inputs_for_patch_terms():
    logits, teacher, labels = example()
    terms = carb_loss(logits, teacher, logits[..., :1, :], None, labels)
    assert terms.patch_ce.item() == 0.0 and int(terms.patch_consistent_pixels) == 0
    assert terms.warmup_loss().item() == pytest.approx(terms.global_ce.item())


def test_carb_loss_without_regions_has_every_region_term_zero():
    logits, teacher, labels = example()
    light = carb_loss(logits, teacher, logits, teacher, labels, regions=False)
    for value in (light.consistent, light.inconsistent, light.patch_consistent, light.patch_inconsistent,
                  light.consistent_pixels, light.inconsistent_pixels, light.patch_consistent_pixels,
                  light.patch_inconsistent_pixels):
        assert isinstance(value, torch.Tensor) and value.item() == 0


def test_consistent_share_of_a_single_pixel():
    logits = torch.tensor([[[[2.0]], [[0.0]]]])
    terms = carb_loss(logits, torch.tensor([[[0]]]), None, None, torch.tensor([[True, True]]))
    assert terms.consistent_share.item() == 1.0
    terms = carb_loss(logits, torch.tensor([[[1]]]), None, None, torch.tensor([[True, True]]))
    assert terms.consistent_share.item() == 0.0


def test_loss_queue_default_size_is_q_5_and_size_1_is_allowed():
    queue = LossQueue()
    for value in range(1, 8):
        queue.push(float(value), 1.0)
    assert queue.consistent == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert CARBObjective().queue.size == 5
    single = LossQueue(size=1)
    single.push(1.0, 2.0)
    single.push(3.0, 4.0)
    assert single.consistent == [3.0] and single.inconsistent == [4.0]
    with pytest.raises(ValueError, match="queue size must be >= 1, got 0"):
        LossQueue(size=0)


def test_loss_queue_keeps_python_floats_exactly():
    # The queue is float64: 0.1 pushed or loaded comes back as 0.1, not as its float32 rounding.
    queue = LossQueue(size=3)
    queue.push(0.1, 0.3)
    assert queue.consistent == [0.1] and queue.inconsistent == [0.3]
    loaded = LossQueue(size=3)
    loaded.load_state_dict({"size": 3, "consistent": [0.1, 0.7], "inconsistent": [0.3, 0.9]})
    assert loaded.consistent == [0.1, 0.7] and loaded.inconsistent == [0.3, 0.9]


def test_loss_queue_coefficient_with_no_or_small_inconsistent_loss():
    queue = LossQueue(size=3)
    queue.push(1.0, 0.0)  # no inconsistent pixels: nothing to rebalance
    assert queue.coefficient(0.7).item() == 0.7
    queue = LossQueue(size=3)
    queue.push(1.0, 0.5)
    assert queue.coefficient().item() == pytest.approx(2.0)


def test_loss_queue_state_carries_its_size():
    queue = LossQueue(size=3)
    queue.push(1.0, 2.0)
    state = queue.state_dict()
    assert state["size"] == 3
    restored = LossQueue(size=5)
    restored.load_state_dict(state)
    assert restored.size == 3
    legacy = LossQueue(size=4)  # a state without "size" keeps the queue's own
    legacy.load_state_dict({"consistent": [1.0], "inconsistent": [2.0]})
    assert legacy.size == 4 and legacy.consistent == [1.0]


def test_scalars_to_floats_reads_large_counts_exactly():
    from carbseg.losses.carb import scalars_to_floats

    # A pixel count above 2^24 (a batch of 8 Cityscapes frames) is not representable in float32.
    values = {"pixels": torch.tensor(2**24 + 1), "loss": torch.tensor(0.5), "c": 0.25}
    assert scalars_to_floats(values) == {"pixels": 16777217.0, "loss": 0.5, "c": 0.25}


def test_objective_from_config_and_the_losses_it_returns():
    from carbseg.config import CARBConfig

    objective = CARBObjective.from_config(CARBConfig(enabled=True, queue_size=3, coeff=0.5,
                                                     fixed_coefficient=None), warmup_iters=7)
    assert (objective.warmup_iters, objective.fixed_coefficient, objective.coeff, objective.queue.size,
            objective.enabled) == (7, None, 0.5, 3, True)
    fixed = CARBObjective.from_config(CARBConfig(enabled=False, fixed_coefficient=0.03), warmup_iters=0)
    assert fixed.fixed_coefficient == 0.03 and not fixed.enabled
    logits, teacher, labels = example()
    terms = carb_loss(logits, teacher, None, None, labels)
    flag = torch.tensor(True)
    warm = objective(terms, 6, finite=flag)
    assert warm.terms is terms and warm.finite is flag and warm.coefficient == 1.0 and warm.warmup is True
    after = objective(terms, 7, finite=flag)
    assert after.terms is terms and after.finite is flag and after.warmup is False


def test_objective_keeps_nothing_of_a_non_finite_step():
    logits, teacher, labels = example()
    terms = carb_loss(logits, teacher, None, None, labels)
    objective = CARBObjective(coeff=0.7)
    loss = objective(terms, 0, finite=torch.tensor(False))
    assert len(objective.queue) == 0 and loss.coefficient.item() == 0.7
    objective(terms, 1)
    assert len(objective.queue) == 1


def test_the_queue_and_every_term_live_on_the_device_of_the_logits(monkeypatch):
    """The "meta" device stands in for a GPU: anything made on the CPU (the window, the fill count, the
    zero pixel counts, the coefficient's positions) would show, without a GPU."""
    import dataclasses

    from carbseg.losses import carb

    # single process: the collective is a no-op; let the pair stay where it is (NCCL's GPU case)
    monkeypatch.setattr(carb.distributed, "collective_device", lambda preferred=None: torch.device(preferred))
    queue = carb.LossQueue(3)
    queue.load_state_dict({"size": 3, "consistent": [1.0], "inconsistent": [2.0]})  # a checkpoint: CPU
    meta = torch.device("meta")
    queue.push(torch.tensor(1.0, device=meta), torch.tensor(2.0, device=meta), keep=torch.tensor(True, device=meta))
    queue.push(torch.tensor(1.0, device=meta), torch.tensor(2.0, device=meta))
    assert {queue._window.device, queue._filled.device, queue.coefficient(0.5).device} == {meta}
    logits = torch.zeros(2, 3, 4, 4, device=meta)
    teacher = torch.zeros(2, 4, 4, dtype=torch.long, device=meta)
    labels = torch.ones(2, 3, dtype=torch.bool, device=meta)
    for patch, regions in [(None, True), (None, False), (logits[..., :2, :2], True)]:
        terms = carb.carb_loss(logits, teacher, patch, None if patch is None else teacher[..., :2, :2], labels,
                               regions=regions)
        assert {getattr(terms, f.name).device for f in dataclasses.fields(terms)} == {meta}, (patch, regions)


def test_push_gathers_the_pair_on_the_collective_device_and_brings_it_back(monkeypatch):
    """CPU values with a collective on another device (meta stands in for NCCL's GPU): the pair is averaged
    there and the queue stays on the values' device; a float pushed beside a tensor joins the tensor's device."""
    from carbseg.losses import carb

    seen = []
    monkeypatch.setattr(carb.distributed, "collective_device", lambda preferred=None: torch.device("meta"))
    monkeypatch.setattr(carb.distributed, "all_reduce_mean_", lambda t: seen.append(t.device.type))
    queue = carb.LossQueue(2)
    with pytest.raises(NotImplementedError, match="meta"):  # meta holds no values to bring back ...
        queue.push(torch.tensor(1.0), 2.0)
    assert seen == ["meta"]  # ... but the all-reduce saw the pair on the collective device
    monkeypatch.setattr(carb.distributed, "collective_device", lambda preferred=None: torch.device(preferred))
    meta = torch.device("meta")
    queue = carb.LossQueue(2)
    queue.push(torch.tensor(1.0, device=meta), 2.0)  # CE_incons as a float beside a CE_cons tensor
    assert queue._window.device == meta and seen[-1] == "meta"
