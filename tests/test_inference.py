"""Whole / sliding-window / TTA inference and checkpoint evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carbseg.config import Config, ModelConfig
from carbseg.data.base import SegmentationDataset
from carbseg.data.classes import CAMVID
from carbseg.engine.checkpoint import load_model, save_model
from carbseg.engine.evaluate import rank_images
from carbseg.engine.inference import (
    evaluate_checkpoint,
    predict_slide,
    predict_tta,
    predict_whole,
    slide_windows,
)
from carbseg.metrics import confusion_matrix

NUM_CLASSES = 5


class PixelwiseModel(nn.Module):
    """A 1x1 convolution: each output pixel depends on its own input pixel only (finite receptive field)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return self.conv(x / 255.0)


class GlobalContextModel(nn.Module):
    """Per-pixel logits plus the crop's mean colour: the output depends on the whole crop."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        torch.manual_seed(1)
        self.local = nn.Conv2d(3, num_classes, 3, padding=1)
        self.context = nn.Linear(3, num_classes)

    def forward(self, x):
        x = x / 255.0
        return self.local(x) + self.context(x.mean(dim=(2, 3)))[:, :, None, None]


class SymmetricConvModel(nn.Module):
    """A 3x3 convolution whose kernels are mirror-symmetric left/right, at stride 2 then upsampled
    by the inference code: mirroring the input mirrors the output (flip-equivariant)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, num_classes, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)

    def forward(self, x):
        return self.conv(x / 255.0)


def _images(batch=2, height=23, width=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=gen).float()


def test_slide_windows_follow_the_mmseg_grid():
    # H=10, crop 4, stride 3 -> ceil((10 - 4) / 3) + 1 = 3 rows: 0-4, 3-7, 6-10 (last one shifted in).
    # W=5, crop 4, stride 3 -> ceil(1 / 3) + 1 = 2 columns: 0-4, then 3-7 shifted back to 1-5.
    boxes = slide_windows(10, 5, (4, 4), (3, 3))
    assert boxes == [(0, 4, 0, 4), (0, 4, 1, 5), (3, 7, 0, 4), (3, 7, 1, 5), (6, 10, 0, 4), (6, 10, 1, 5)]
    # A crop larger than the image gives one window of the image's size.
    assert slide_windows(10, 5, (16, 32), (8, 8)) == [(0, 10, 0, 5)]


def test_slide_with_crop_at_least_the_image_equals_whole():
    model = GlobalContextModel().eval()
    images = _images()
    whole = predict_whole(model, images)
    slide = predict_slide(model, images, crop_hw=(23, 64), stride_hw=(5, 5), num_classes=NUM_CLASSES)
    assert whole.shape == (2, NUM_CLASSES, 23, 37)
    torch.testing.assert_close(slide, whole, rtol=0, atol=0)


def test_slide_on_a_pixelwise_model_equals_whole():
    model = PixelwiseModel().eval()
    images = _images()
    whole = predict_whole(model, images)
    slide = predict_slide(model, images, crop_hw=(8, 12), stride_hw=(5, 7), num_classes=NUM_CLASSES,
                          windows_per_batch=3)
    # Each pixel averages 1 to 4 identical values: equal up to the division's rounding.
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)


def test_slide_averages_overlapping_windows_by_their_count():
    model = GlobalContextModel().eval()
    images = _images(batch=1, height=10, width=5)
    slide = predict_slide(model, images, crop_hw=(4, 4), stride_hw=(3, 3), num_classes=NUM_CLASSES)
    # Reference: run every window separately and average per pixel by hand.
    total = torch.zeros(1, NUM_CLASSES, 10, 5)
    count = torch.zeros(10, 5)
    with torch.no_grad():
        for y1, y2, x1, x2 in slide_windows(10, 5, (4, 4), (3, 3)):
            total[:, :, y1:y2, x1:x2] += model(images[:, :, y1:y2, x1:x2])
            count[y1:y2, x1:x2] += 1
    assert count[0, 0] == 1 and count[3, 1] == 4  # row 3 in two row windows, column 1 in both columns
    torch.testing.assert_close(slide, total / count, rtol=0, atol=1e-6)


def test_whole_upsamples_low_resolution_logits_to_the_input_size():
    class StrideTwo(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, NUM_CLASSES, 1, stride=2)

        def forward(self, x):
            return self.conv(x)

    model = StrideTwo().eval()
    images = _images(batch=1, height=8, width=12)
    out = predict_whole(model, images)
    with torch.no_grad():
        expected = F.interpolate(model(images), size=(8, 12), mode="bilinear", align_corners=False)
    assert out.shape == (1, NUM_CLASSES, 8, 12) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_flip_tta_on_a_flip_equivariant_model_equals_no_tta():
    model = SymmetricConvModel().eval()
    images = _images()
    whole = predict_whole(model, images)
    # Averaging logits of the image and of its mirror (mirrored back) gives the same logits...
    tta_logits = predict_tta(model, images, scales=(1.0,), flip=True, average="logits")
    torch.testing.assert_close(tta_logits, whole, rtol=0, atol=1e-5)
    # ...and averaging probabilities gives the log-probabilities of the single view.
    tta_soft = predict_tta(model, images, scales=(1.0,), flip=True)
    torch.testing.assert_close(tta_soft, whole.log_softmax(dim=1), rtol=0, atol=1e-5)


def test_flip_tta_differs_from_no_tta_on_an_asymmetric_model():
    # Guards the test above: a model that is not flip-equivariant must change under flip TTA.
    model = GlobalContextModel().eval()
    images = _images()
    tta = predict_tta(model, images, scales=(1.0,), flip=True, average="logits")
    assert (tta - predict_whole(model, images)).abs().max() > 1e-3


def test_multiscale_tta_averages_softmax_of_rescaled_views():
    model = PixelwiseModel().eval()
    images = _images(batch=1, height=16, width=24)
    out = predict_tta(model, images, scales=(0.5, 1.0), flip=False)
    with torch.no_grad():
        half = F.interpolate(images, size=(8, 12), mode="bilinear", align_corners=False)
        half_logits = F.interpolate(model(half), size=(16, 24), mode="bilinear", align_corners=False)
        expected = ((half_logits.softmax(1) + model(images).softmax(1)) / 2).log()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_tta_in_slide_mode_with_one_view_equals_slide():
    model = GlobalContextModel().eval()
    images = _images()
    slide = predict_slide(model, images, (8, 12), (5, 7), NUM_CLASSES)
    tta = predict_tta(model, images, scales=(1.0,), flip=False, mode="slide", crop_hw=(8, 12), stride_hw=(5, 7),
                      num_classes=NUM_CLASSES, average="logits")
    torch.testing.assert_close(tta, slide, rtol=0, atol=0)


# ---------------------------------------------------------------- evaluate_checkpoint (real segmenter)
class TinyDataset(SegmentationDataset):
    """Three in-memory images (two sizes) with random train-id masks including ignore."""

    def __init__(self, classes=CAMVID):
        self.classes = classes
        rng = np.random.default_rng(0)
        shapes = [(24, 40), (24, 40), (32, 32)]
        self.ids = [f"img{i}" for i in range(len(shapes))]
        self.images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
        self.masks = []
        for h, w in shapes:
            mask = rng.integers(0, classes.num_classes, (h, w)).astype(np.uint8)
            mask[:3] = 255
            self.masks.append(mask)

    def load_image(self, index):
        return self.images[index]

    def _load_raw_mask(self, index):
        return self.masks[index]


def _tiny_checkpoint(tmp_path, classifier="learned", mode="whole"):
    from carbseg.models.segmenter import build_segmenter

    cfg = Config(name="tiny")
    # Small widths keep the test fast; head 32 -> embeddings 16 also exercises the text projection.
    cfg.model = ModelConfig(backbone="tiny", pretrained="none", classifier=classifier, head_channels=32,
                            embed_dim=16, aspp_dilations=[1, 2])
    cfg.eval.mode = mode
    cfg.eval.crop_size = [16, 24]
    cfg.eval.stride = [10, 12]
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(CAMVID.num_classes, 16), dim=1) if classifier == "text" else None
    model = build_segmenter(cfg.model, CAMVID.num_classes, class_embeddings=embeddings, load_pretrained=False)
    path = tmp_path / "model.safetensors"
    save_model(path, model, cfg, CAMVID)
    return path


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_evaluate_checkpoint_matches_a_manual_loop(tmp_path, mode):
    path = _tiny_checkpoint(tmp_path, mode=mode)
    dataset = TinyDataset()
    confusion, stats, samples = evaluate_checkpoint(dataset, path, batch_size=2, progress=False, keep_samples=1)

    model = load_model(path).model
    expected = np.zeros((CAMVID.num_classes,) * 2, dtype=np.int64)
    for i in range(len(dataset)):
        image = torch.from_numpy(dataset.images[i]).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            if mode == "whole":
                logits = F.interpolate(model(image), size=image.shape[-2:], mode="bilinear", align_corners=False)
            else:
                logits = predict_slide(model, image, (16, 24), (10, 12), CAMVID.num_classes)
        pred = logits.argmax(1)[0].numpy()
        expected += confusion_matrix(pred, dataset.masks[i], CAMVID.num_classes)
    np.testing.assert_array_equal(confusion.matrix, expected)
    assert confusion.missed.sum() == 0 and confusion.num_images == 3
    assert [s.id for s in stats] == ["img0", "img1", "img2"]
    # The kept samples are exactly the worst and the best image by per-image mIoU.
    worst, best = rank_images(stats, 1)
    assert sorted(s.id for s in samples) == sorted({worst[0].id, best[0].id})
    assert all(s.pred.shape == s.mask.shape == s.image.shape[:2] for s in samples)


def test_evaluate_checkpoint_overrides_mode_and_tta(tmp_path):
    path = _tiny_checkpoint(tmp_path, classifier="text")
    dataset = TinyDataset()
    flip_whole, _, _ = evaluate_checkpoint(dataset, path, mode="whole", flip=True, progress=False)
    model = load_model(path).model
    expected = np.zeros((CAMVID.num_classes,) * 2, dtype=np.int64)
    for i in range(len(dataset)):
        image = torch.from_numpy(dataset.images[i]).permute(2, 0, 1)[None].float()
        pred = predict_tta(model, image, scales=(1.0,), flip=True).argmax(1)[0].numpy()
        expected += confusion_matrix(pred, dataset.masks[i], CAMVID.num_classes)
    np.testing.assert_array_equal(flip_whole.matrix, expected)
    # The restored text embeddings discriminate: zero placeholders would predict class 0 everywhere.
    assert (flip_whole.matrix.sum(axis=0) > 0).sum() > 1


def test_evaluate_checkpoint_refuses_a_dataset_with_another_class_count(tmp_path):
    from carbseg.data.classes import CITYSCAPES
    from carbseg.errors import UserError

    path = _tiny_checkpoint(tmp_path)
    with pytest.raises(UserError, match="11 classes"):
        evaluate_checkpoint(TinyDataset(classes=CITYSCAPES), path, progress=False)
