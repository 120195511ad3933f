"""carbseg predict at the model's scale and the photo's orientation: the test-time resize to data.scale_size,
EXIF orientation, and the warning for an image the model cannot segment well."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from carbseg.config import Config, ModelConfig
from carbseg.data.classes import CAMVID, SYNTHETIC
from carbseg.data.datasets import build_dataset
from carbseg.engine.checkpoint import LoadedModel
from carbseg.engine.inference import evaluate_checkpoint
from carbseg.engine.predict import InferenceSettings, predict_path
from carbseg.io import read_image, read_image_size, read_label_png
from carbseg.models.segmenter import build_segmenter
from test_reliability_common import make_scenes

pytestmark = pytest.mark.usefixtures("one_thread")


class EdgeSegmenter(torch.nn.Module):
    """A deterministic stand-in for a trained segmenter that, like one, answers to structure at the pixel
    scale it was made for: class 1 where the Sobel gradient of the gray image exceeds 60, class 2 where the
    image is bright, class 0 elsewhere; logits averaged over 8x8 cells (output stride 8)."""

    def __init__(self, num_classes: int):
        super().__init__()
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("kernels", torch.stack([sobel, sobel.T])[:, None])
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gray = images.mean(1, keepdim=True)
        gradient = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), self.kernels).norm(dim=1, keepdim=True)
        logits = images.new_zeros(images.shape[0], self.num_classes, *images.shape[-2:])
        logits[:, 1:2] = (gradient - 60.0) / 10.0
        logits[:, 2:3] = (gray - 128.0) / 10.0
        return F.avg_pool2d(logits, 8, ceil_mode=True)


def _loaded(model: torch.nn.Module, classes, scale_hw, ratio_range=(0.75, 1.5), eval_scales=(1.0,)) -> LoadedModel:
    cfg = Config(name="predict-scale")
    cfg.data.scale_size, cfg.data.ratio_range = list(scale_hw), list(ratio_range)
    cfg.eval.scales = list(eval_scales)
    return LoadedModel(model.eval(), cfg, classes)


# ---------------------------------------------------------------- the test-time resize
def test_a_4x_enlarged_frame_gets_the_labels_of_the_frame_itself(camvid_root, tmp_path, caplog):
    frame_path = sorted((camvid_root / "val").glob("*.png"))[0]
    frame = read_image(frame_path)  # 360x480, the data.scale_size of the model below
    model = EdgeSegmenter(CAMVID.num_classes)
    loaded = _loaded(model, CAMVID, scale_hw=(360, 480))
    enlarged = tmp_path / "in" / "enlarged.png"
    enlarged.parent.mkdir()
    Image.fromarray(frame).resize((1920, 1440), Image.BILINEAR).save(enlarged)
    with caplog.at_level(logging.WARNING):
        predict_path(loaded, enlarged, tmp_path / "out", device="cpu", progress=False)
    labels = read_label_png(tmp_path / "out" / "enlarged.png")
    assert labels.shape == (1440, 1920)
    # The native frame's prediction, its logits brought to the enlarged size as predict brings them back.
    with torch.no_grad():
        native_logits = model(torch.from_numpy(frame.copy()).permute(2, 0, 1)[None].float())
    native = F.interpolate(native_logits, size=(1440, 1920), mode="bilinear", align_corners=False).argmax(1)[0]
    assert len(np.unique(native.numpy())) == 3  # every class of the stand-in occurs
    assert (labels == native.numpy()).mean() >= 0.95  # ~0.98; at the photo's own size ~0.5
    # 4x the trained scale (480x360 times at most 1.5) is far outside it: one warning line.
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{enlarged}: 1920x1440 is 4.0x larger than the scale the model was trained at (data.scale_size "
        "480x360 times 0.75..1.5); it is reduced to 480x360, so details smaller than about 32 px of the "
        "image are lost"]


def test_predict_gives_the_labels_evaluation_gives_frames_it_brings_to_the_trained_scale(tmp_path):
    # The camvid_carb case: frames half the trained scale, which evaluation reaches with eval.scales [2.0]
    # and predict with its resize to data.scale_size (the single eval scale is not applied again).
    scenes = make_scenes(tmp_path / "scenes", train=1, val=3, size=(32, 64))
    model_cfg = ModelConfig(backbone="tiny", pretrained="none", classifier="learned", head_channels=16,
                            aspp_dilations=[1, 2])
    torch.manual_seed(0)
    model = build_segmenter(model_cfg, SYNTHETIC.num_classes, load_pretrained=False)
    with torch.no_grad():  # spread the random classifier so that several classes win somewhere
        model.classifier.weight.mul_(20.0)
    loaded = _loaded(model, SYNTHETIC, scale_hw=(64, 128), eval_scales=(2.0,))
    loaded.config.model = model_cfg
    dataset = build_dataset("synthetic", scenes, "val")
    _, _, samples = evaluate_checkpoint(dataset, loaded, device="cpu", progress=False, keep_samples=3)
    predict_path(loaded, scenes / "images" / "val", tmp_path / "out", device="cpu", progress=False)
    assert len(samples) == 3
    for sample in samples:
        np.testing.assert_array_equal(read_label_png(tmp_path / "out" / f"{sample.id}.png"), sample.pred)
    assert len(np.unique(np.concatenate([s.pred.ravel() for s in samples]))) > 1


def test_test_size_fits_the_image_into_scale_size_keeping_its_aspect():
    settings = InferenceSettings("whole", (1, 1), (1, 1), (1.0,), False, scale_hw=(360, 480))
    # 3000x4000 (h, w) by min(480/4000, 360/3000) = 0.12; a portrait 4000x3000 fits its long side to 480.
    assert settings.test_size(3000, 4000) == (360, 480)
    assert settings.test_size(4000, 3000) == (480, 360)
    assert settings.test_size(90, 100) == (360, 400)  # by min(480/100, 360/90) = 4
    assert InferenceSettings("whole", (1, 1), (1, 1), (1.0,), False).test_size(90, 100) == (90, 100)


def test_a_single_eval_scale_becomes_1_and_tta_scales_stay_ratios():
    loaded = _loaded(EdgeSegmenter(3), SYNTHETIC, scale_hw=(64, 128), eval_scales=(2.0,))
    assert InferenceSettings.from_checkpoint(loaded).scales == (1.0,)
    assert InferenceSettings.from_checkpoint(loaded, tta=True).scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    loaded.config.eval.scales = [0.75, 1.0, 1.25]
    assert InferenceSettings.from_checkpoint(loaded).scales == (0.75, 1.0, 1.25)


# ---------------------------------------------------------------- warnings
def test_scale_warnings_name_what_the_model_cannot_do():
    settings = InferenceSettings("whole", (1, 1), (1, 1), (1.0,), False, scale_hw=(360, 480),
                                 ratio_range=(0.75, 1.5), output_stride=8)
    assert settings.scale_warning(360, 480) is None
    assert settings.scale_warning(180, 240) is None  # enlarged 2x: within 2x of the smallest trained scale
    assert settings.scale_warning(7, 30) == ("30x7 is smaller than one cell of the model's output grid (8 px): "
                                             "too little of a scene to segment; the prediction is one blurred guess")
    assert settings.scale_warning(8, 8) == (
        "8x8 is 45.0x smaller than the scale the model was trained at (data.scale_size 480x360 times 0.75..1.5); "
        "it is enlarged to 360x360, which adds no detail: expect a coarse prediction")
    assert settings.scale_warning(3000, 4000) == (
        "4000x3000 is 8.3x larger than the scale the model was trained at (data.scale_size 480x360 times "
        "0.75..1.5); it is reduced to 480x360, so details smaller than about 67 px of the image are lost")


def test_a_folder_of_tiny_images_warns_once_per_size(tmp_path, caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((6, 6, 3), 90, np.uint8)).save(inputs / f"{name}.png")
    loaded = _loaded(EdgeSegmenter(SYNTHETIC.num_classes), SYNTHETIC, scale_hw=(64, 128))
    with caplog.at_level(logging.WARNING):
        summary = predict_path(loaded, inputs, tmp_path / "out", device="cpu", progress=False)
    assert summary.written == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{inputs / 'a.png'}: 6x6 is smaller than one cell of the model's output grid (8 px): "
                        "too little of a scene to segment; the prediction is one blurred guess"]


# ---------------------------------------------------------------- EXIF orientation
_UPRIGHT_FROM_STORED = {  # EXIF orientation -> what a viewer does to the stored pixels, by hand
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise
    8: lambda a: np.rot90(a, 1),  # rotate 90 degrees counter-clockwise
}


def _exif_jpeg(path: Path, stored: np.ndarray, orientation: int) -> np.ndarray:
    """Save ``stored`` as a JPEG (or PNG, by ``path``'s suffix) tagged with ``orientation``; return the
    pixels as decoded (stored orientation)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", sorted(_UPRIGHT_FROM_STORED))
def test_images_are_read_upright(tmp_path, orientation, suffix):
    stored = np.random.default_rng(orientation).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    path = tmp_path / f"photo{suffix}"
    decoded = _exif_jpeg(path, stored, orientation)
    upright = _UPRIGHT_FROM_STORED[orientation](decoded)
    np.testing.assert_array_equal(read_image(path), upright)
    assert read_image_size(path) == upright.shape[:2]  # from the header only, the same answer


def test_an_exif_rotated_jpeg_is_predicted_upright(tmp_path):
    scenes = make_scenes(tmp_path / "scenes", train=1, val=1, size=(48, 80))
    upright_scene = read_image(sorted((scenes / "images" / "val").iterdir())[0])
    inputs = tmp_path / "in"
    inputs.mkdir()
    # A phone's portrait photo: stored sideways (the scene turned 90 degrees counter-clockwise), tagged 6.
    decoded = _exif_jpeg(inputs / "phone.jpg", np.ascontiguousarray(np.rot90(upright_scene, 1)), 6)
    upright = np.ascontiguousarray(np.rot90(decoded, -1))  # 48x80 again, JPEG-decoded
    Image.fromarray(upright).save(inputs / "upright.png")  # lossless: the same pixels, no tag
    loaded = _loaded(EdgeSegmenter(SYNTHETIC.num_classes), SYNTHETIC, scale_hw=(48, 80))
    predict_path(loaded, inputs, tmp_path / "out", device="cpu", progress=False)
    phone, reference = (read_label_png(tmp_path / "out" / f"{n}.png") for n in ("phone", "upright"))
    assert phone.shape == (48, 80)
    np.testing.assert_array_equal(phone, reference)
    assert len(np.unique(reference)) > 1
