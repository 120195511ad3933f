"""Confusion matrix and IoU on hand-computed examples, numpy/torch agreement, and the process reduction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carbseg.metrics import ConfusionMatrix, confusion_counts, confusion_matrix, iou_from_counts

# 3 classes, a 4x4 image, 3 ignore pixels (255) in the GT.
GT = np.array([[0, 0, 1, 1],
               [0, 0, 1, 1],
               [2, 2, 2, 255],
               [2, 2, 255, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [0, 0, 1, 2],
                 [2, 2, 0, 0],
                 [2, 1, 1, 2]], dtype=np.uint8)
# Counted by hand, pixel by pixel (row = GT, column = prediction); the 3 ignore pixels are skipped:
#   GT 0: (0,0) (0,1) (0,0) (0,0)         -> [3, 1, 0]
#   GT 1: (1,1) (1,1) (1,1) (1,2)         -> [0, 3, 1]
#   GT 2: (2,2) (2,2) (2,0) (2,2) (2,1)   -> [1, 1, 3]
EXPECTED = np.array([[3, 1, 0],
                     [0, 3, 1],
                     [1, 1, 3]], dtype=np.int64)
# IoU = TP / (row + column - TP):  class 0: 3/(4+4-3) = 0.6 ; class 1: 3/(4+5-3) = 0.5 ; class 2: 3/(5+4-3) = 0.5
EXPECTED_IOU = np.array([0.6, 0.5, 0.5])


def test_confusion_matrix_hand_computed():
    m = confusion_matrix(PRED, GT, 3)
    assert m.dtype == np.int64 and m.shape == (3, 3)
    np.testing.assert_array_equal(m, EXPECTED)
    assert m.sum() == 13  # 16 pixels - 3 ignored


def test_confusion_matrix_torch_equals_numpy():
    m = confusion_matrix(torch.from_numpy(PRED), torch.from_numpy(GT), 3)
    np.testing.assert_array_equal(m, EXPECTED)
    # mixed inputs and int64 tensors work too
    m2 = confusion_matrix(torch.from_numpy(PRED.astype(np.int64)), GT, 3)
    np.testing.assert_array_equal(m2, EXPECTED)


def test_confusion_matrix_matches_loop_reference_on_random_batch():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, size=(2, 17, 23))
    gt[gt == 5] = 255  # about a fifth ignored
    pred = rng.integers(0, 5, size=gt.shape)
    reference = np.zeros((5, 5), dtype=np.int64)
    for g, p in zip(gt.reshape(-1), pred.reshape(-1)):
        if g != 255:
            reference[g, p] += 1
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 5), reference)
    np.testing.assert_array_equal(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), 5), reference)
    # 8-bit maps take a lookup-table fast path: same counts, misses included
    pred8, gt8 = pred.astype(np.uint8), gt.astype(np.uint8)
    pred8[0, 0, :3] = (255, 9, 200)
    fast = confusion_counts(pred8, gt8, 5)
    generic = confusion_counts(pred8.astype(np.int64), gt8.astype(np.int64), 5)
    np.testing.assert_array_equal(fast[0], generic[0])
    np.testing.assert_array_equal(fast[1], generic[1])
    assert fast[1].sum() == (gt8[0, 0, :3] != 255).sum()


def test_iou_accuracy_and_report_hand_computed():
    cm = ConfusionMatrix(3)
    cm.update(PRED, GT)
    np.testing.assert_allclose(cm.iou(), EXPECTED_IOU)
    assert cm.pixel_accuracy() == pytest.approx(9 / 13)
    report = cm.report(["a", "b", "c"])
    assert report == {
        "miou": pytest.approx(100 * 1.6 / 3),
        "pixel_acc": pytest.approx(100 * 9 / 13),
        "iou": {"a": pytest.approx(60.0), "b": pytest.approx(50.0), "c": pytest.approx(50.0)},
        "num_images": 1,
    }


def test_prediction_ignore_is_a_miss_not_dropped():
    pred = PRED.copy()
    pred[0, 0] = 255  # was a correct class-0 pixel; the predictor abstains there
    pred[1, 3] = 7  # a stray value on a GT-1 pixel (was predicted 2)
    matrix, missed = confusion_counts(pred, GT, 3)
    np.testing.assert_array_equal(matrix, [[2, 1, 0], [0, 3, 0], [1, 1, 3]])
    np.testing.assert_array_equal(missed, [1, 1, 0])
    # class 0: TP 2, GT 4 (miss included), predicted 3 -> 2/(4+3-2) = 0.4
    # class 1: TP 3, GT 4, predicted 5 -> 3/6 ; class 2: TP 3, GT 5, predicted 3 -> 3/5 (lost an FP)
    np.testing.assert_allclose(iou_from_counts(matrix, missed), [0.4, 0.5, 0.6])
    cm = ConfusionMatrix(3)
    cm.update(pred, GT)
    assert cm.pixel_accuracy() == pytest.approx(8 / 13)  # the misses stay in the denominator
    with pytest.raises(ValueError, match="2 evaluated pixels"):
        confusion_matrix(pred, GT, 3)
    # the torch path agrees
    t_matrix, t_missed = confusion_counts(torch.from_numpy(pred), torch.from_numpy(GT), 3)
    np.testing.assert_array_equal(t_matrix, matrix)
    np.testing.assert_array_equal(t_missed, missed)


def test_out_of_range_prediction_on_ignored_gt_is_not_counted():
    pred = PRED.copy()
    pred[3, 3] = 200  # GT ignore there
    matrix, missed = confusion_counts(pred, GT, 3)
    np.testing.assert_array_equal(matrix, EXPECTED)
    assert missed.sum() == 0


def test_absent_class_is_none_and_predicted_only_class_is_zero():
    # 4 classes: class 3 never occurs anywhere -> None, excluded from the mean.
    cm = ConfusionMatrix(4)
    cm.update(PRED, GT)
    r = cm.report(["a", "b", "c", "d"])
    assert r["iou"]["d"] is None
    assert r["miou"] == pytest.approx(100 * 1.6 / 3)
    # Predict class 3 on one GT-0 pixel: IoU(d) = 0 and it now enters the mean.
    pred = PRED.copy()
    pred[1, 0] = 3
    cm = ConfusionMatrix(4)
    cm.update(pred, GT)
    r = cm.report(["a", "b", "c", "d"])
    assert r["iou"]["d"] == 0.0
    # class 0: TP 2, GT 4, predicted 3 -> 2/5 ; others as before
    assert r["iou"]["a"] == pytest.approx(40.0)
    assert r["miou"] == pytest.approx(100 * (0.4 + 0.5 + 0.5 + 0.0) / 4)


def test_accumulates_over_images_and_batches():
    cm = ConfusionMatrix(3)
    cm.update(PRED, GT)
    cm.update(np.stack([PRED, GT]), np.stack([GT, GT]))  # a batch of two: the second is perfect
    assert cm.num_images == 3
    perfect = np.diag([4, 4, 5])
    np.testing.assert_array_equal(cm.matrix, 2 * EXPECTED + perfect)


def test_empty_confusion_has_no_scores():
    cm = ConfusionMatrix(2)
    r = cm.report(["a", "b"])
    assert r == {"miou": None, "pixel_acc": None, "iou": {"a": None, "b": None}, "num_images": 0}


def test_report_rejects_wrong_number_of_names():
    with pytest.raises(ValueError, match="2 class names"):
        ConfusionMatrix(3).report(["a", "b"])


def test_reduce_is_identity_in_one_process():
    cm = ConfusionMatrix(3)
    cm.update(PRED, GT)
    cm.reduce_()
    np.testing.assert_array_equal(cm.matrix, EXPECTED)
    assert cm.num_images == 1


# Invalid GT values (-1, 300, C = 3) are skipped like ignore; predictions outside 0..2 (300, C) are misses.
WIDE_GT = np.array([[0, 1, 2, -1, 300, 3, 255, 0]], dtype=np.int64)
WIDE_PRED = np.array([[0, 2, 300, 1, 1, 1, 1, 3]], dtype=np.int64)
WIDE_MATRIX = [[1, 0, 0], [0, 0, 1], [0, 0, 0]]  # (0,0) and (1,2)
WIDE_MISSED = [1, 0, 1]  # GT 0 predicted 3, GT 2 predicted 300


@pytest.mark.parametrize("kind", ["numpy", "torch", "torch-gt-only", "uint8-pred-int64-gt"])
def test_general_paths_skip_invalid_gt_and_count_out_of_range_predictions(kind):
    pred, gt = WIDE_PRED, WIDE_GT
    if kind == "torch":
        pred, gt = torch.from_numpy(pred), torch.from_numpy(gt)
    elif kind == "torch-gt-only":
        gt = torch.from_numpy(gt)
    elif kind == "uint8-pred-int64-gt":
        pred = np.where(pred == 300, 200, pred).astype(np.uint8)  # an 8-bit map beside a wide one
    matrix, missed = confusion_counts(pred, gt, 3)
    assert matrix.dtype == missed.dtype == np.int64
    assert matrix.tolist() == WIDE_MATRIX and missed.tolist() == WIDE_MISSED


def test_lookup_path_for_8bit_maps_by_hand(monkeypatch):
    import carbseg.metrics as metrics

    used = []
    lookup = metrics._joint_counts_uint8
    monkeypatch.setattr(metrics, "_joint_counts_uint8", lambda *a: used.append(a[2:]) or lookup(*a))
    # Class 2 absent and no ignored pixel: the counts still come out (3, 3).
    gt = np.array([[0, 1, 1, 0]], dtype=np.uint8)
    pred = np.array([[0, 1, 2, 255]], dtype=np.uint8)
    matrix, missed = confusion_counts(pred, gt, 3)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]] and missed.tolist() == [1, 0, 0]
    # ignore_index 0 skips the class-0 pixels (the abstention included); 256 ignores nothing.
    matrix, missed = confusion_counts(pred, gt, 3, ignore_index=0)
    assert matrix.tolist() == [[0, 0, 0], [0, 1, 1], [0, 0, 0]] and missed.tolist() == [0, 0, 0]
    assert confusion_matrix(pred, gt, 3, ignore_index=0).tolist() == matrix.tolist()
    matrix, missed = confusion_counts(pred, gt, 3, ignore_index=256)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]] and missed.tolist() == [1, 0, 0]
    assert used == [(3, 255), (3, 0), (3, 0), (3, 256)]  # every 8-bit pair took the lookup tables


def test_error_messages_name_the_shapes_and_the_fix():
    with pytest.raises(ValueError, match=r"^prediction shape \(2, 3\) differs from ground truth \(3, 2\)$"):
        confusion_counts(np.zeros((2, 3)), np.zeros((3, 2)), 3)
    pred = PRED.copy()
    pred[0, 0] = 255
    with pytest.raises(ValueError, match=r"^1 evaluated pixels have a prediction outside 0\.\.2; "
                                         r"use confusion_counts\(\) to count them as misses$"):
        confusion_matrix(pred, GT, 3)


def test_iou_from_counts_without_misses_and_for_a_one_pixel_class():
    np.testing.assert_allclose(iou_from_counts(EXPECTED), EXPECTED_IOU)
    np.testing.assert_array_equal(iou_from_counts(np.array([[1, 0], [0, 0]])), [1.0, np.nan])


def test_confusion_matrix_object_keeps_int64_counts_its_ignore_index_and_image_counts():
    cm = ConfusionMatrix(3, ignore_index=0)
    pred = PRED.copy()
    pred[0, 0] = 255  # on a GT-0 pixel: ignored with ignore_index 0, so no miss
    cm.update(pred, GT, num_images=5)
    assert cm.matrix.dtype == cm.missed.dtype == np.int64 and cm.num_images == 5
    assert cm.matrix.tolist() == [[0, 0, 0], [0, 3, 1], [1, 1, 3]] and cm.missed.tolist() == [0, 0, 0]
    cm.add_counts(np.eye(3, dtype=np.int64))
    assert cm.num_images == 6
    # The misses count in the IoU of ConfusionMatrix too (class 0: 2 / (4 + 3 - 2)).
    cm = ConfusionMatrix(3)
    cm.update(pred, GT)
    np.testing.assert_allclose(cm.iou(), [0.4, 0.5, 0.5])


def test_empty_confusion_scores_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" / 0-by-0 division behind the None
        assert np.isnan(ConfusionMatrix(2).miou()) and np.isnan(ConfusionMatrix(2).pixel_accuracy())


def test_reduce_packs_int64_on_the_collective_device_and_unpacks_the_sums(monkeypatch):
    import carbseg.metrics as metrics

    seen = {}

    def fake_device(device):
        seen["asked"] = device
        return torch.device("cpu")

    def fake_sum(tensor):  # two identical processes
        seen["dtype"] = tensor.dtype
        return tensor.mul_(2)

    monkeypatch.setattr(metrics, "is_distributed", lambda: True)
    monkeypatch.setattr(metrics, "collective_device", fake_device)
    monkeypatch.setattr(metrics, "all_reduce_sum_", fake_sum)
    cm = ConfusionMatrix(3)
    pred = PRED.copy()
    pred[0, 0] = 255
    cm.update(pred, GT)
    assert cm.reduce_("cuda:3") is cm
    assert seen == {"asked": "cuda:3", "dtype": torch.int64}
    assert cm.matrix.tolist() == (2 * np.array([[2, 1, 0], [0, 3, 1], [1, 1, 3]])).tolist()
    assert cm.missed.tolist() == [2, 0, 0] and cm.num_images == 2


def _reduce_worker(rank: int, store: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(3)
        if rank == 0:
            cm.update(PRED, GT)
        else:
            pred = PRED.copy()
            pred[0, 0] = 255
            cm.update(pred, GT)
            cm.update(GT, GT)
        cm.reduce_()
        queue.put((rank, cm.matrix.tolist(), cm.missed.tolist(), cm.num_images))
    finally:
        dist.destroy_process_group()


def test_reduce_packs_and_unpacks_through_a_real_process_group(tmp_path):
    # A one-process gloo group runs the whole reduce_ path (pack, all_reduce, unpack) in-process.
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cm = ConfusionMatrix(3)
        pred = PRED.copy()
        pred[0, 0] = 255
        cm.update(pred, GT)
        cm.update(GT, GT)
        cm.reduce_()
    finally:
        dist.destroy_process_group()
    np.testing.assert_array_equal(cm.matrix, [[2, 1, 0], [0, 3, 1], [1, 1, 3]] + np.diag([4, 4, 5]))
    np.testing.assert_array_equal(cm.missed, [1, 0, 0])
    assert cm.num_images == 2


@pytest.mark.slow  # spawns two Python processes that import torch (~5-20 s on a shared CPU)
def test_reduce_sums_over_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_reduce_worker, args=(str(tmp_path / "store"), queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    expected_matrix = (EXPECTED + np.array([[2, 1, 0], [0, 3, 1], [1, 1, 3]]) + np.diag([4, 4, 5])).tolist()
    for _, matrix, missed, num_images in results:
        assert matrix == expected_matrix
        assert missed == [1, 0, 0]
        assert num_images == 3
