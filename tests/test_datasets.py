"""Dataset layouts: Cityscapes, CamVid (both layouts), folder datasets, build_dataset and its checks."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carbseg.data.camvid import CamVidDataset
from carbseg.data.cityscapes import CityscapesDataset, label_id_to_train_id, normalize_image_id
from carbseg.data.classes import CAMVID, CITYSCAPES
from carbseg.data.datasets import build_dataset
from carbseg.data.folder import FolderDataset, load_class_set
from carbseg.errors import UserError
from carbseg.io import read_label_png


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(h: int = 4, w: int = 6, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


# ---------------------------------------------------------------- Cityscapes
def test_cityscapes_lookup_table_matches_official_ids():
    lut = label_id_to_train_id()
    assert lut.shape == (256,) and lut.dtype == np.uint8
    # label id -> train id, from the official table (road 7, sidewalk 8, building 11, ..., bicycle 33)
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    for label_id, train_id in expected.items():
        assert lut[label_id] == train_id
    # every other id (unlabeled, ego vehicle, parking, guard rail, caravan, ...) is ignored
    others = [i for i in range(256) if i not in expected]
    assert (lut[others] == 255).all()


def test_normalize_image_id_variants():
    assert normalize_image_id("krefeld/krefeld_000000_003707") == "krefeld_000000_003707"
    assert normalize_image_id("frankfurt_000000_000294_leftImg8bit.png") == "frankfurt_000000_000294"
    assert normalize_image_id("leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit") == \
        "frankfurt_000000_000294"
    assert normalize_image_id("0016E5_07959") == "0016E5_07959"
    assert normalize_image_id("0016E5_07959.png") == "0016E5_07959"


def _cityscapes_tree(root: Path) -> None:
    for split in ("train", "test"):
        for city, frame in (("aachen", "aachen_000000_000019"), ("bonn", "bonn_000001_000019")):
            _png(root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png", _rgb(2, 3))
            # label ids: road 7, car 26, ego vehicle 1 / sky 23, person 24, license-plate-free unlabeled 0
            ids = np.array([[7, 26, 1], [23, 24, 0]], dtype=np.uint8)
            _png(root / "gtFine" / split / city / f"{frame}_gtFine_labelIds.png", ids)


def test_cityscapes_generated_layout_maps_label_ids(tmp_path):
    _cityscapes_tree(tmp_path)
    ds = build_dataset("cityscapes", tmp_path, "train")
    assert ds.ids == ["aachen_000000_000019", "bonn_000001_000019"]
    assert ds.has_masks
    sample = ds[1]
    assert sample.image.shape == (2, 3, 3)
    np.testing.assert_array_equal(sample.mask, [[0, 13, 255], [10, 11, 255]])
    assert ds.mask_path(0).name == "aachen_000000_000019_gtFine_labelIds.png"


def test_cityscapes_test_split_has_no_masks(tmp_path):
    _cityscapes_tree(tmp_path)
    ds = CityscapesDataset(tmp_path, "test")
    assert not ds.has_masks and len(ds) == 2
    assert ds[0].mask is None


def test_cityscapes_errors(tmp_path):
    _cityscapes_tree(tmp_path)
    with pytest.raises(UserError, match="unknown Cityscapes split 'trainval'"):
        build_dataset("cityscapes", tmp_path, "trainval")
    with pytest.raises(UserError, match=r"leftImg8bit.val.*folder not found; expected leftImg8bit/<split>"):
        build_dataset("cityscapes", tmp_path, "val")
    (tmp_path / "gtFine/train/bonn/bonn_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(UserError, match=r"bonn_000001_000019_gtFine_labelIds.png: mask missing .*1 of 2"):
        build_dataset("cityscapes", tmp_path, "train")
    # a train-id file put where label ids belong is refused, naming the file and the value
    _png(tmp_path / "gtFine/train/bonn/bonn_000001_000019_gtFine_labelIds.png",
         np.array([[0, 13, 255], [10, 11, 255]], dtype=np.uint8))
    ds = build_dataset("cityscapes", tmp_path, "train")
    with pytest.raises(UserError, match=r"bonn_000001_000019_gtFine_labelIds.png: value 255 is not a Cityscapes"):
        ds.load_mask(1)


def test_cityscapes_real_sample(cityscapes_sample_root):
    ds = build_dataset("cityscapes", cityscapes_sample_root, "val")
    assert ds.ids == ["frankfurt_000000_000294"]
    sample = ds[0]
    assert sample.image.shape == (128, 256, 3)
    gt_dir = cityscapes_sample_root / "gtFine/val/frankfurt"
    train_ids = read_label_png(gt_dir / "frankfurt_000000_000294_gtFine_labelTrainIds.png")
    label_ids = read_label_png(gt_dir / "frankfurt_000000_000294_gtFine_labelIds.png")
    # The sample's two label files were downscaled separately, so a few boundary pixels disagree
    # (77 of 32768); everywhere else our mapping reproduces the official labelTrainIds file.
    assert (sample.mask == train_ids).mean() > 0.995
    np.testing.assert_array_equal(np.unique(sample.mask), np.unique(train_ids))
    np.testing.assert_array_equal(sample.mask, label_id_to_train_id()[label_ids])


# ---------------------------------------------------------------- CamVid
def test_camvid_real_val(camvid_root):
    ds = build_dataset("camvid", camvid_root, "val")
    assert len(ds) == 101 and ds.classes is CAMVID
    sample = ds[0]
    assert sample.image.shape == (360, 480, 3)
    raw = read_label_png(ds.mask_path(0))
    assert (raw == 11).sum() == 679  # the void pixels of 0016E5_07959 ...
    assert (sample.mask[raw == 11] == 255).all()  # ... all become ignore
    np.testing.assert_array_equal(sample.mask[raw != 11], raw[raw != 11])
    hist = np.zeros(256, dtype=np.int64)
    for i in range(0, len(ds), 10):
        hist += np.bincount(ds.load_mask(i).ravel(), minlength=256)
    assert hist[11:255].sum() == 0
    # a driving scene: road, building and tree are the largest classes, small classes are small
    assert set(np.argsort(-hist[:11])[:3]) == {CAMVID.index("road"), CAMVID.index("building"),
                                               CAMVID.index("tree")}
    assert hist[CAMVID.index("pole")] / hist.sum() < 0.02


def _camvid_masks() -> np.ndarray:
    return np.array([[0, 3, 11], [10, 11, 8]], dtype=np.uint8)


@pytest.mark.parametrize("layout", ["segnet", "authors"])
def test_camvid_generated_layouts(tmp_path, layout):
    image_dir, mask_dir = (tmp_path / "val", tmp_path / "valannot") if layout == "segnet" else (
        tmp_path / "img/val", tmp_path / "mask/val")
    for name in ("b_frame", "a_frame"):
        _png(image_dir / f"{name}.png", _rgb(2, 3))
        _png(mask_dir / f"{name}.png", _camvid_masks())
    ds = CamVidDataset(tmp_path, "val")
    assert ds.layout == layout
    assert ds.ids == ["a_frame", "b_frame"]
    np.testing.assert_array_equal(ds[0].mask, [[0, 3, 255], [10, 255, 8]])


def test_camvid_unknown_layout_lists_both(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError) as err:
        build_dataset("camvid", tmp_path, "val")
    assert "SegNet layout ROOT/<split>/*.png" in str(err.value)
    assert "authors' layout ROOT/img/<split>/*.png" in str(err.value)


def test_camvid_bad_value_is_named(tmp_path):
    _png(tmp_path / "train/x.png", _rgb(2, 3))
    _png(tmp_path / "trainannot/x.png", np.array([[0, 1, 2], [3, 12, 4]], dtype=np.uint8))
    ds = build_dataset("camvid", tmp_path, "train")
    with pytest.raises(UserError, match=r"x.png: label value 12 is outside the 11-class set") as err:
        ds[0]
    # The fix for CamVid's raw format is named, as the class set is CamVid's.
    assert "raw CamVid masks use 11 for void: read them with --dataset camvid, which maps it to 255" in str(err.value)


def test_camvid_void_hint_only_for_the_camvid_class_set():
    from carbseg.data.base import validate_train_ids

    bad = np.array([[0, 200]], dtype=np.uint8)
    with pytest.raises(UserError, match=r"label value 200 .*valid 0\.\.10 and 255.*raw CamVid masks use 11"):
        validate_train_ids(bad, 11, "m.png", "camvid")
    with pytest.raises(UserError) as err:
        validate_train_ids(bad, 19, "m.png", "cityscapes")
    assert "CamVid" not in str(err.value)


# ---------------------------------------------------------------- folder datasets
def _folder(root: Path, masks: bool = True) -> Path:
    for name in ("one", "two"):
        _png(root / "images/train" / f"{name}.png", _rgb(2, 2))
        if masks:
            _png(root / "masks/train" / f"{name}.png", np.array([[0, 1], [255, 1]], dtype=np.uint8))
    classes = root / "classes.json"
    classes.write_text(json.dumps({"names": ["ground", "thing"], "text_names": ["ground", "object"],
                                   "palette": [[1, 2, 3], [4, 5, 6]]}))
    return classes


def test_folder_dataset(tmp_path):
    classes_file = _folder(tmp_path)
    ds = build_dataset("folder", tmp_path, "train", classes_file=classes_file)
    assert isinstance(ds, FolderDataset)
    assert ds.classes.names == ("ground", "thing") and ds.classes.text_names == ("ground", "object")
    assert ds.classes.palette == ((1, 2, 3), (4, 5, 6))
    assert ds.ids == ["one", "two"]
    np.testing.assert_array_equal(ds[1].mask, [[0, 1], [255, 1]])


def test_folder_yaml_classes_and_default_palette(tmp_path):
    path = tmp_path / "classes.yaml"
    path.write_text("names: [road, car, sky]\n")
    classes = load_class_set(path)
    assert classes.names == ("road", "car", "sky") and classes.text_names == classes.names
    assert len(classes.palette) == 3 and load_class_set(path).palette == classes.palette


def test_folder_without_masks_has_no_gt(tmp_path):
    classes_file = _folder(tmp_path, masks=False)
    ds = build_dataset("folder", tmp_path, "train", classes_file=classes_file)
    assert not ds.has_masks and ds[0].mask is None


def test_folder_checks(tmp_path):
    classes_file = _folder(tmp_path)
    (tmp_path / "masks/train/one.png").unlink()
    with pytest.raises(UserError, match=r"one.png: mask missing for image .*one.png \(1 of 2"):
        build_dataset("folder", tmp_path, "train", classes_file=classes_file)
    _png(tmp_path / "masks/train/one.png", np.array([[0, 2], [0, 0]], dtype=np.uint8))
    with pytest.raises(UserError, match="label value 2 is outside the 2-class set"):
        build_dataset("folder", tmp_path, "train", classes_file=classes_file)[0]
    _png(tmp_path / "masks/train/one.png", np.zeros((3, 2), dtype=np.uint8))
    with pytest.raises(UserError, match="mask size 2x3 differs from its image 2x2"):
        build_dataset("folder", tmp_path, "train", classes_file=classes_file)[0]
    Image.fromarray(_rgb(2, 2)).save(tmp_path / "images/train/two.jpg")
    with pytest.raises(UserError, match="duplicate image id 'two'"):
        build_dataset("folder", tmp_path, "train", classes_file=classes_file)
    (tmp_path / "images/val").mkdir()
    with pytest.raises(UserError, match=r"images.val: no images matching"):
        build_dataset("folder", tmp_path, "val", classes_file=classes_file)
    with pytest.raises(UserError, match="needs --classes"):
        build_dataset("folder", tmp_path, "train")


def test_folder_bad_classes_file(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"names": ["a", "b"], "palette": [[1, 2, 3]]}))
    with pytest.raises(UserError, match=r"c.json: 'palette' must list one entry per class \(2\)"):
        load_class_set(bad)
    bad.write_text(json.dumps({"labels": ["a"]}))
    with pytest.raises(UserError, match="needs a non-empty list 'names'"):
        load_class_set(bad)
    with pytest.raises(UserError, match="classes file not found"):
        load_class_set(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- build_dataset
def test_build_dataset_missing_root_and_misuse(tmp_path):
    with pytest.raises(UserError, match=r"nowhere: dataset root folder not found; see docs/datasets.md"):
        build_dataset("camvid", tmp_path / "nowhere", "val")
    with pytest.raises(UserError, match="unknown dataset 'kitti'"):
        build_dataset("kitti", tmp_path, "val")
    with pytest.raises(UserError, match="--classes is only for --dataset folder"):
        build_dataset("cityscapes", tmp_path, "val", classes_file=tmp_path / "c.json")


def test_build_dataset_synthetic_delegates_to_open_synthetic(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("carbseg.data.synthetic")
    fake.open_synthetic = lambda root, split: calls.append((root, split)) or "opened"
    monkeypatch.setitem(sys.modules, "carbseg.data.synthetic", fake)
    assert build_dataset("synthetic", tmp_path, "train") == "opened"
    assert calls == [(Path(tmp_path), "train")]


def test_cityscapes_class_set_is_used(tmp_path):
    _cityscapes_tree(tmp_path)
    assert build_dataset("cityscapes", tmp_path, "train").classes is CITYSCAPES


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_validate_train_ids_names_the_smallest_bad_value_for_bytes_and_wider_masks(dtype):
    # uint8 masks are checked through a byte histogram, others through np.unique: the same verdicts.
    from carbseg.data.base import validate_train_ids

    validate_train_ids(np.array([[0, 10, 255]], dtype=dtype), 11, "ok.png")  # 0..C-1 and ignore pass
    with pytest.raises(UserError, match=r"m.png: label value 11 is outside the 11-class set"):
        validate_train_ids(np.array([[200, 0, 255], [11, 3, 40]], dtype=dtype), 11, "m.png")
    with pytest.raises(UserError, match="label value 254 is outside"):
        validate_train_ids(np.array([[254, 255]], dtype=dtype), 11, "m.png")
