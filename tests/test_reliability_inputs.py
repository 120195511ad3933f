"""Reliability matrix, inputs: bad files and bad usage give one clear line, exit 2, and write nothing half."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from carbseg.cli import main
from carbseg.io import read_image, read_label_png
from test_reliability_common import all_files, error_line, make_checkpoint, make_scenes, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes_template(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"))


@pytest.fixture
def scenes(scenes_template, tmp_path):
    """A private copy of 4 train + 2 val synthetic scenes (64x32) that a test may damage."""
    return shutil.copytree(scenes_template, tmp_path / "scenes")


@pytest.fixture
def labels_json(scenes, tmp_path):
    out = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--out", str(out)]) == 0
    return out


def _pseudo_masks(scenes, labels, out, *extra):
    return main(["pseudo-masks", "--dataset", "synthetic", "--root", str(scenes), "--split", "train",
                 "--labels", str(labels), "--out", str(out), "--teacher", "simulated", "--workers", "0",
                 "--no-progress", *extra])


def test_truncated_image_is_named_and_nothing_is_written(scenes, labels_json, tmp_path, capsys):
    image = scenes / "images" / "train" / "synth_train_000001.png"
    image.write_bytes(image.read_bytes()[:200])
    capsys.readouterr()
    out = tmp_path / "masks"
    assert _pseudo_masks(scenes, labels_json, out) == 2
    error_line(capsys.readouterr().err, "pseudo-masks", str(image), "truncated", "re-download or remove")
    assert all_files(out) == []  # the batch holding the bad image was not half written

    assert main(["predict", "--checkpoint", str(make_checkpoint(tmp_path / "m.safetensors")), "--input", str(image),
                 "--out", str(tmp_path / "pred")]) == 2
    error_line(capsys.readouterr().err, "predict", str(image), "truncated")
    assert all_files(tmp_path / "pred") == []


def test_garbage_image_and_garbage_mask_fail_labels(scenes, tmp_path, capsys):
    image = scenes / "images" / "train" / "synth_train_000002.png"
    image.write_bytes(b"this is not a PNG")
    out = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--out", str(out)]) == 2
    error_line(capsys.readouterr().err, "labels", str(image), "cannot read image")
    assert not out.exists()
    mask = scenes / "masks" / "val" / "synth_val_000001.png"
    mask.write_bytes(mask.read_bytes()[:100])
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--split", "val", "--out", str(out)]) == 2
    error_line(capsys.readouterr().err, "labels", str(mask), "cannot read label map")
    assert not out.exists()


def test_gray_rgba_and_16_bit_images_are_read_as_rgb(scenes, tmp_path):
    """Three encodings of one picture: the pipeline sees the RGB image they all stand for."""
    rgb = read_image(scenes / "images" / "train" / "synth_train_000000.png")
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # 8 -> 16 bit: v * 257
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    expected_gray = np.repeat(gray[..., None], 3, axis=2)
    assert np.array_equal(read_image(tmp_path / "gray.png"), expected_gray)
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped, colours kept
    assert np.array_equal(read_image(tmp_path / "sixteen.png"), expected_gray)  # 65535 -> 255 exactly

    # Through `carbseg predict`: the gray and 16-bit files give the prediction of the gray RGB image.
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("gray.png", "rgba.png", "sixteen.png"):
        shutil.copy(tmp_path / name, inputs / name)
    Image.fromarray(expected_gray).save(inputs / "gray_rgb.png")
    Image.fromarray(rgb).save(inputs / "rgb.png")
    checkpoint = make_checkpoint(tmp_path / "m.safetensors")
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--out", str(tmp_path / "o"),
                 "--device", "cpu"]) == 0
    pred = {n: read_label_png(tmp_path / "o" / f"{n}.png") for n in ("gray", "sixteen", "gray_rgb", "rgba", "rgb")}
    assert pred["gray"].shape == (32, 64)
    assert np.array_equal(pred["gray"], pred["gray_rgb"]) and np.array_equal(pred["sixteen"], pred["gray_rgb"])
    assert np.array_equal(pred["rgba"], pred["rgb"])


@pytest.mark.parametrize("damage, fragments", [
    ("size", ["mask size 10x10 differs from its image 64x32", "nearest neighbour"]),
    ("value", ["label value 40 is outside the 19-class set", "valid 0..18 and 255"]),
    ("missing", ["mask missing for image", "restore the missing masks"]),  # found when the split is opened
])
def test_bad_ground_truth_is_named(scenes, tmp_path, capsys, damage, fragments):
    mask = scenes / "masks" / "train" / "synth_train_000001.png"
    if damage == "size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
    elif damage == "value":
        values = read_label_png(mask).astype(np.uint8)
        values[0, 0] = 40
        Image.fromarray(values).save(mask)
    else:
        mask.unlink()
    out = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--out", str(out)]) == 2
    error_line(capsys.readouterr().err, "labels", str(mask), *fragments)
    assert not out.exists()


def test_missing_predictions_are_counted_and_the_first_named(scenes, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(scenes / "masks" / "val" / "synth_val_000000.png", pred)
    report = tmp_path / "report.json"
    assert main(["evaluate", "--dataset", "synthetic", "--root", str(scenes), "--split", "val", "--pred", str(pred),
                 "--json", str(report)]) == 2
    error_line(capsys.readouterr().err, "evaluate", str(pred / "synth_val_000001.png"), "1 of 2 images")
    assert not report.exists()


def test_image_whose_label_is_empty_gets_an_all_ignore_pseudo_mask(scenes, labels_json, tmp_path):
    data = json.loads(labels_json.read_text())
    data["labels"]["synth_train_000002"] = []
    labels_json.write_text(json.dumps(data))
    out = tmp_path / "masks"
    assert _pseudo_masks(scenes, labels_json, out) == 0
    empty = read_label_png(out / "synth_train_000002.png")
    assert empty.shape == (32, 64) and (empty == 255).all()  # nothing to restrict to: the teacher abstains
    other = read_label_png(out / "synth_train_000001.png")
    assert set(np.unique(other).tolist()) - {255} <= set(data["labels"]["synth_train_000001"])
    assert (other != 255).any()


def test_duplicate_ids_are_refused(tmp_path, capsys):
    # folder dataset: the same file name with two extensions
    root = tmp_path / "folder"
    (root / "images" / "train").mkdir(parents=True)
    for ext in ("png", "jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "train" / f"a.{ext}")
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"names": ["road", "car"]}))
    assert main(["evaluate", "--dataset", "folder", "--root", str(root), "--split", "train", "--classes", str(classes),
                 "--pred", str(tmp_path)]) == 2
    error_line(capsys.readouterr().err, "evaluate", "duplicate image id 'a'")
    # predict: one id in two sub-folders would write one output twice
    (root / "images" / "train" / "sub").mkdir()
    shutil.copy(root / "images" / "train" / "a.png", root / "images" / "train" / "sub" / "a.png")
    (root / "images" / "train" / "a.jpg").unlink()
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(make_checkpoint(tmp_path / "m.safetensors")), "--input",
                 str(root / "images"), "--out", str(out)]) == 2
    error_line(capsys.readouterr().err, "predict", "duplicate image id 'a'")
    assert all_files(out) == []
    # labels JSON: "city/x" and "x" are the same IMAGE_ID
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"dataset": "folder", "classes": ["road", "car"],
                                  "labels": {"berlin/x": [0], "x": [1]}}))
    assert main(["pseudo-masks", "--dataset", "folder", "--root", str(root), "--split", "train", "--classes",
                 str(classes), "--labels", str(labels), "--out", str(tmp_path / "pm"), "--teacher", "simulated"]) == 2
    error_line(capsys.readouterr().err, "pseudo-masks", str(labels), "'x' appears twice")
    assert not (tmp_path / "pm").exists()


@pytest.mark.parametrize("dataset, fragments", [
    ("cityscapes", ["leftImg8bit/train: folder not found", "gtFine"]),
    ("camvid", ["not a recognised CamVid layout", "annot"]),
])
def test_unrecognised_layout_names_the_expected_one(scenes_template, tmp_path, capsys, dataset, fragments):
    out = tmp_path / "labels.json"
    assert main(["labels", "--dataset", dataset, "--root", str(scenes_template), "--split", "train",
                 "--out", str(out)]) == 2
    error_line(capsys.readouterr().err, "labels", *fragments)
    assert not out.exists()


@pytest.mark.parametrize("content, fragments", [
    ({"trian": {"max_iters": 3}}, ["unknown key 'trian'", "valid keys here: name, seed, device, data"]),
    ({"train": {"max_itres": 3}}, ["unknown key 'train.max_itres'", "max_iters, warmup_iters"]),
    ({"train": {"max_iters": "three"}}, ["train.max_iters must be int, got 'three'"]),
    ({"glv": {"enabled": "yes"}}, ["glv.enabled must be true or false"]),
    ({"model": {"backbone": "resnet51"}}, ["model.backbone = 'resnet51'", "resnet50, resnet101, efficientnet_lite0, small, tiny"]),
    ({"train": {"amp": "bf32"}}, ["train.amp = 'bf32'", "auto, bf16, fp16, off"]),
    ({"data": {"crop_size": 512}}, ["data.crop_size must be a list"]),
    ({"train": 3}, ["train must be a mapping"]),
    (["a", "b"], ["the config must be a mapping"]),
])
def test_config_typos_and_wrong_types_name_the_key_and_choices(tmp_path, capsys, content, fragments):
    import yaml

    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(content))
    out = tmp_path / "run"
    overrides = ["train.lr=0.01"] if isinstance(content, list) else []  # a list config with overrides too
    assert main(["train", "--config", str(config), "--out", str(out), *overrides]) == 2
    error_line(capsys.readouterr().err, "train", str(config), *fragments)
    assert not out.exists()


def test_config_override_typo_names_the_key(scenes_template, tmp_path, capsys):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes_template)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "train.lr=fast"]) == 2
    error_line(capsys.readouterr().err, "train", "train.lr must be float, got 'fast'")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "carb.queue=5"]) == 2
    error_line(capsys.readouterr().err, "train", "unknown key 'carb.queue'", "queue_size")
    assert not (tmp_path / "run").exists()


def test_labels_of_another_dataset_are_refused(scenes, tmp_path, capsys):
    labels = tmp_path / "camvid_labels.json"
    labels.write_text(json.dumps({"dataset": "camvid", "classes": [f"c{i}" for i in range(11)],
                                  "labels": {"synth_train_000000": [0]}}))
    out = tmp_path / "masks"
    assert _pseudo_masks(scenes, labels, out) == 2
    error_line(capsys.readouterr().err, "pseudo-masks", str(labels), "11 classes", "19 classes",
               "carbseg labels --dataset synthetic")
    assert not out.exists()
    # the authors' labels.npy of another dataset: vectors of the wrong length
    npy = tmp_path / "labels.npy"
    np.save(npy, np.array({"synth_train_000000": np.ones(11, np.float32)}, dtype=object), allow_pickle=True)
    assert main(["labels", "--dataset", "synthetic", "--from-npy", str(npy), "--out", str(tmp_path / "l.json")]) == 2
    error_line(capsys.readouterr().err, "labels", str(npy), "11 entries", "19")
    assert not (tmp_path / "l.json").exists()
