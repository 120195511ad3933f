"""evaluate_predictions and `carbseg evaluate --pred`: values, failures, and equivalence with the
official Cityscapes pixel-level evaluator on a real frame."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carbseg.cli import main
from carbseg.data.base import SegmentationDataset
from carbseg.data.classes import CAMVID, ClassSet
from carbseg.engine.evaluate import evaluate_predictions, load_qualitative_samples, rank_images
from carbseg.errors import UserError
from carbseg.io import write_png_atomic
from carbseg.metrics import ConfusionMatrix
from test_metrics import GT, PRED  # the hand-counted 4x4 example

TINY = ClassSet(name="tiny", names=("a", "b", "c"), text_names=("a", "b", "c"),
                palette=((255, 0, 0), (0, 255, 0), (0, 0, 255)), small_classes=("c",))


class InMemoryDataset(SegmentationDataset):
    def __init__(self, masks: dict[str, np.ndarray], classes: ClassSet = TINY):
        self.classes = classes
        self.ids = list(masks)
        self.masks = list(masks.values())

    def load_image(self, index):
        h, w = self.masks[index].shape
        return np.full((h, w, 3), 60 * index % 256, dtype=np.uint8)

    def _load_raw_mask(self, index):
        return self.masks[index]


def _write_preds(folder: Path, preds: dict[str, np.ndarray]) -> Path:
    for image_id, pred in preds.items():
        write_png_atomic(folder / f"{image_id}.png", pred)
    return folder


def test_evaluate_predictions_hand_computed(tmp_path):
    # image "x": the hand-computed 4x4 case of test_metrics (IoU 0.6 / 0.5 / 0.5, 9 of 13 right);
    # image "y": a perfect prediction of the same GT.
    ds = InMemoryDataset({"x": GT, "y": GT})
    pred_dir = _write_preds(tmp_path / "pred", {"x": PRED, "y": GT})
    for workers in (1, 2):
        confusion, stats = evaluate_predictions(ds, pred_dir, progress=False, workers=workers)
        np.testing.assert_array_equal(confusion.matrix, [[3, 1, 0], [0, 3, 1], [1, 1, 3]] + np.diag([4, 4, 5]))
        report = confusion.report(TINY.names)
        assert report["num_images"] == 2
        assert report["pixel_acc"] == pytest.approx(100 * 22 / 26)
        # class a: TP 7, GT 8, predicted 8 -> 7/9
        assert report["iou"]["a"] == pytest.approx(100 * 7 / 9)
        assert [s.id for s in stats] == ["x", "y"]
        assert stats[0].miou == pytest.approx(100 * 1.6 / 3)
        assert stats[0].pixel_acc == pytest.approx(100 * 9 / 13)
        assert stats[1].miou == pytest.approx(100.0)
    worst, best = rank_images(stats, 1)
    assert worst[0].id == "x" and best[0].id == "y"
    samples = load_qualitative_samples(ds, pred_dir, stats, count=1)
    np.testing.assert_array_equal(samples["worst"][0].pred, PRED)
    np.testing.assert_array_equal(samples["best"][0].gt, GT)


def test_ignore_in_prediction_counts_as_wrong(tmp_path):
    pred = PRED.copy()
    pred[0, 0] = 255  # a pseudo-mask that abstains on a class-0 pixel
    ds = InMemoryDataset({"x": GT})
    confusion, _ = evaluate_predictions(ds, _write_preds(tmp_path, {"x": pred}), progress=False)
    report = confusion.report(TINY.names)
    assert report["pixel_acc"] == pytest.approx(100 * 8 / 13)
    assert report["iou"]["a"] == pytest.approx(40.0)  # 2 / (4 + 3 - 2)


def test_missing_predictions_named_before_any_work(tmp_path):
    ds = InMemoryDataset({"x": GT, "y": GT, "z": GT})
    pred_dir = _write_preds(tmp_path / "pred", {"y": GT})
    with pytest.raises(UserError) as err:
        evaluate_predictions(ds, pred_dir, progress=False)
    message = str(err.value)
    assert "x.png" in message and "2 of 3" in message


def test_missized_prediction_names_file_and_expected_size(tmp_path):
    ds = InMemoryDataset({"x": GT, "y": GT})
    pred_dir = _write_preds(tmp_path / "pred", {"x": GT, "y": np.zeros((4, 5), np.uint8)})
    with pytest.raises(UserError, match=r"y\.png: prediction size 5x4 differs from its ground truth 4x4"):
        evaluate_predictions(ds, pred_dir, progress=False)


def test_label_ids_instead_of_train_ids_are_refused(tmp_path):
    bad = PRED.copy()
    bad[2, 2] = 26  # e.g. the Cityscapes label id of 'car'
    ds = InMemoryDataset({"x": GT})
    with pytest.raises(UserError, match=r"x\.png: prediction value 26 is outside the 3-class set"):
        evaluate_predictions(ds, _write_preds(tmp_path, {"x": bad}), progress=False)


def test_rgb_prediction_is_refused(tmp_path):
    ds = InMemoryDataset({"x": GT})
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(UserError, match="x.png"):
        evaluate_predictions(ds, tmp_path, progress=False)


# ---------------------------------------------------------------- command line on a tiny CamVid tree
def _tiny_camvid(root: Path) -> tuple[Path, np.ndarray]:
    """SegNet-layout CamVid with two 8x6 val frames; returns (root, the GT of frame 'b' in train ids)."""
    rng = np.random.default_rng(1)
    masks = {}
    for name in ("a", "b"):
        image = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        mask = rng.integers(0, 12, size=(6, 8), dtype=np.uint8)  # 11 = void
        write_png_atomic(root / "val" / f"{name}.png", image)
        write_png_atomic(root / "valannot" / f"{name}.png", mask)
        masks[name] = np.where(mask == 11, 255, mask).astype(np.uint8)
    return root, masks


def test_cli_evaluate_pred_json_and_report(tmp_path, capsys):
    root, masks = _tiny_camvid(tmp_path / "camvid")
    pred_dir = tmp_path / "pred"
    pred_a = np.where(masks["a"] == 255, 0, masks["a"]).astype(np.uint8)
    pred_b = np.roll(pred_a, 1, axis=1)  # frame b predicted with frame a's labels: mostly wrong
    _write_preds(pred_dir, {"a": pred_a, "b": pred_b})
    code = main(["evaluate", "--dataset", "camvid", "--root", str(root), "--split", "val", "--pred", str(pred_dir),
                 "--json", str(tmp_path / "r.json"), "--report", str(tmp_path / "report")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report) == {"miou", "pixel_acc", "iou", "num_images"}
    expected = ConfusionMatrix(11)
    expected.update(pred_a, masks["a"])
    expected.update(pred_b, masks["b"])
    reference = expected.report(CAMVID.names)
    assert report["num_images"] == 2
    assert report["miou"] == pytest.approx(reference["miou"])
    assert report["pixel_acc"] == pytest.approx(reference["pixel_acc"])
    assert report["iou"] == pytest.approx(reference["iou"])
    out = capsys.readouterr().out
    assert "mIoU" in out and "pole *" in out
    for name in ("report.md", "report.json", "iou_bar.png", "confusion.png", "qualitative_worst.png",
                 "qualitative_best.png"):
        assert (tmp_path / "report" / name).is_file(), name


def test_cli_missing_prediction_exits_2_with_one_line(tmp_path):
    root, masks = _tiny_camvid(tmp_path / "camvid")
    pred_dir = _write_preds(tmp_path / "pred", {"a": np.zeros((6, 8), np.uint8)})
    proc = subprocess.run(
        [sys.executable, "-m", "carbseg", "evaluate", "--dataset", "camvid", "--root", str(root), "--split", "val",
         "--pred", str(pred_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "b.png" in lines[0] and "1 of 2" in lines[0] and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- equivalence with cityscapesscripts
def _official_pixel_level_scores(pred_label_ids_file: Path, gt_label_ids_file: Path, export_dir: Path) -> dict:
    """Run cityscapesscripts' pixel-level evaluator on one pair, quietly and writing nothing."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = copy.copy(official.args)  # the module keeps its settings in one global object
    args.evalInstLevelScore = False  # no instance-level (nIoU) evaluation: it would need instanceIds
    args.evalPixelAccuracy = False
    args.quiet = True
    args.JSONOutput = False
    args.colorized = False
    args.exportFile = str(export_dir / "unused.json")
    return official.evaluateImgLists([str(pred_label_ids_file)], [str(gt_label_ids_file)], args)


def test_equivalent_to_official_cityscapes_evaluator(cityscapes_sample_root, tmp_path):
    from cityscapesscripts.helpers.labels import labels as cs_labels

    from carbseg.data.datasets import build_dataset

    dataset = build_dataset("cityscapes", cityscapes_sample_root, "val")
    (image_id,) = dataset.ids
    gt = dataset.load_mask(0)
    # A deliberately imperfect prediction: shifted, with two classes swapped in the left half,
    # a block of a class absent from GT (IoU 0 in both evaluators) and a block of 255 where the
    # predictor abstains (both count it as a false negative of the GT class only).
    pred = np.roll(np.where(gt == 255, 0, gt), shift=(3, 7), axis=(0, 1)).astype(np.uint8)
    left = pred[:, : pred.shape[1] // 2]
    car, building = 13, 2
    left[...] = np.where(left == car, building, np.where(left == building, car, left))
    pred[10:30, 200:240] = 18  # bicycle
    pred[90:110, 20:60] = 255
    absent = sorted(set(range(19)) - set(np.unique(gt).tolist()) - set(np.unique(pred).tolist()))
    assert 18 not in np.unique(gt) and absent  # the test covers both conventions for absent classes
    write_png_atomic(tmp_path / "pred" / f"{image_id}.png", pred)

    code = main(["evaluate", "--dataset", "cityscapes", "--root", str(cityscapes_sample_root), "--split", "val",
                 "--pred", str(tmp_path / "pred"), "--json", str(tmp_path / "ours.json")])
    assert code == 0
    ours = json.loads((tmp_path / "ours.json").read_text())

    # The official evaluator reads label ids; 255 (no train id) becomes 0 'unlabeled', a label that
    # is ignored in evaluation: as a prediction it is a false negative and no class's false positive.
    train_to_label = np.zeros(256, dtype=np.uint8)
    for label in cs_labels:
        if 0 <= label.trainId < 255 and label.id >= 0:
            train_to_label[label.trainId] = label.id
    official_pred = tmp_path / "official" / f"{image_id}_pred.png"
    write_png_atomic(official_pred, train_to_label[pred])
    result = _official_pixel_level_scores(official_pred, dataset.mask_path(0), tmp_path)

    # Conventions shared by both: IoU = TP/(TP+FP+FN) over GT-labelled pixels; a class absent from
    # GT and prediction is NaN (ours: null) and left out of the mean; predicted-only classes score 0.
    for name in dataset.classes.names:
        theirs = result["classScores"][name]
        if math.isnan(theirs):
            assert ours["iou"][name] is None, name
        else:
            assert ours["iou"][name] == pytest.approx(100 * theirs, abs=1e-9), name
    assert ours["iou"]["bicycle"] == 0.0
    assert ours["miou"] == pytest.approx(100 * result["averageScoreClasses"], abs=1e-9)
    # Pixel accuracy from the official confusion matrix: diagonal over all evaluated GT rows.
    conf = np.asarray(result["confMatrix"], dtype=np.int64)
    evaluated = [label.id for label in cs_labels if label.id >= 0 and not label.ignoreInEval]
    accuracy = conf[evaluated, evaluated].sum() / conf[evaluated, :].sum()
    assert ours["pixel_acc"] == pytest.approx(100 * accuracy, abs=1e-9)
    assert ours["num_images"] == 1


def tiny_camvid_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """(root, checkpoint): three random 24x32 CamVid-layout val frames (a, b, c) with random labels
    (11 = void included) and an untrained tiny segmenter saved as a checkpoint (whole-image eval)."""
    from carbseg.config import Config, ModelConfig
    from carbseg.engine.checkpoint import save_model
    from carbseg.models.segmenter import build_segmenter

    rng = np.random.default_rng(2)
    root = tmp_path / "camvid"
    for name in ("a", "b", "c"):
        write_png_atomic(root / "val" / f"{name}.png", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        write_png_atomic(root / "valannot" / f"{name}.png", rng.integers(0, 12, (24, 32), dtype=np.uint8))
    cfg = Config(name="tiny")
    cfg.model = ModelConfig(backbone="tiny", pretrained="none", classifier="learned", head_channels=16,
                            embed_dim=16, aspp_dilations=[1, 2])
    cfg.eval.mode = "whole"
    torch.manual_seed(0)
    model = build_segmenter(cfg.model, CAMVID.num_classes, class_embeddings=None, load_pretrained=False)
    return root, save_model(tmp_path / "model.safetensors", model, cfg, CAMVID)


def test_cli_evaluate_checkpoint_reports_what_evaluate_checkpoint_counts(tmp_path):
    from carbseg.data.datasets import build_dataset
    from carbseg.engine.inference import evaluate_checkpoint

    root, checkpoint = tiny_camvid_checkpoint(tmp_path)

    code = main(["evaluate", "--dataset", "camvid", "--root", str(root), "--split", "val", "--checkpoint",
                 str(checkpoint), "--device", "cpu", "--json", str(tmp_path / "r.json"),
                 "--report", str(tmp_path / "report")])
    assert code == 0
    confusion, _, _ = evaluate_checkpoint(build_dataset("camvid", root, "val"), checkpoint, progress=False)
    report = json.loads((tmp_path / "r.json").read_text())
    expected = confusion.report(CAMVID.names)
    assert report["iou"] == pytest.approx(expected["iou"])
    assert report["miou"] == pytest.approx(expected["miou"])
    assert report["pixel_acc"] == pytest.approx(expected["pixel_acc"])
    assert report["num_images"] == 3
    assert (tmp_path / "report" / "qualitative_worst.png").is_file()
    assert (tmp_path / "report" / "qualitative_best.png").is_file()
    # --scales overrides the checkpoint's eval.scales (CamVid's release protocol: --scales 2.0).
    assert main(["evaluate", "--dataset", "camvid", "--root", str(root), "--split", "val", "--checkpoint",
                 str(checkpoint), "--device", "cpu", "--json", str(tmp_path / "r2.json"), "--scales", "2.0"]) == 0
    confusion2, _, _ = evaluate_checkpoint(build_dataset("camvid", root, "val"), checkpoint, scales=[2.0],
                                           progress=False)
    assert json.loads((tmp_path / "r2.json").read_text())["iou"] == pytest.approx(
        confusion2.report(CAMVID.names)["iou"])
    assert confusion2.report(CAMVID.names)["iou"] != expected["iou"]  # the scale does change the predictions
    assert main(["evaluate", "--dataset", "camvid", "--root", str(root), "--split", "val", "--checkpoint",
                 str(checkpoint), "--scales", "0,1"]) == 2
