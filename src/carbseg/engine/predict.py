"""Segment an image, a folder of images, or a video with a trained checkpoint.

Outputs (all written atomically; an existing output is skipped, so an interrupted run resumes):

* ``OUT/<id>.png``: 8-bit train ids (``--format png``), the format ``carbseg evaluate --pred`` reads;
* ``OUT/<city>_<seq>_<frame>_leftImg8bit.png``: Cityscapes *label ids* (``--format cityscapes``),
  the files the Cityscapes test server and ``cityscapesscripts``' evaluator match with the pattern
  ``<city>_<seq>_<frame>*.png`` (it wants regular ids, not train ids);
* ``OUT/overlay/<id>.png``: the class colours blended over the image, for people (not with
  ``--format cityscapes``: the server would take them for second predictions of the same frame);
* for a video: ``OUT/overlay/<name>.mp4`` (``.gif`` for a GIF), the overlay of every frame.

Videos other than GIF are decoded and encoded with PyAV (``pip install av``, an optional dependency);
GIFs only need Pillow.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence
from tqdm import tqdm

from carbseg.class_argmax import class_argmax
from carbseg.console import ProgressLog, progress_lines, show_progress
from carbseg.data.base import check_unique_ids
from carbseg.data.transforms import rescaled_size
from carbseg.devices import parse_device
from carbseg.engine.checkpoint import LoadedModel, load_model
from carbseg.engine.inference import images_to_tensor, predict, resize_logits
from carbseg.errors import UserError
from carbseg.io import IMAGE_EXTENSIONS, atomic_path, read_image, write_png_atomic
from carbseg.visualize import overlay_with_legend

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")
# Multi-scale + flip test-time augmentation used by --tta when the checkpoint's eval config names a
# single scale (the usual mmsegmentation Cityscapes TTA ratios).
DEFAULT_TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
FORMATS = ("png", "cityscapes")
CITYSCAPES_SUFFIX = "_leftImg8bit"
_CITYSCAPES_ID = re.compile(r"^[a-z_]+_\d{6}_\d{6}$")


@dataclass
class PredictSummary:
    written: int = 0
    skipped: int = 0  # outputs that already existed (resumed run)


@dataclass
class InferenceSettings:
    """How to run the model: the test-time resize, mode, sliding-window geometry, TTA; from the checkpoint's config.

    An image of any size is first rescaled, aspect kept, to fit ``scale_hw`` (the run's
    ``data.scale_size``: the scale the model was trained at, ratio 1), as mmsegmentation's test
    pipeline does (``Resize(img_scale, keep_ratio=True)``), and the prediction is brought back to the
    image's size. ``scales`` are ratios of that size (TTA). A single ``eval.scales`` value is not one:
    it is the factor that brings the dataset's own frames to that same trained scale (2.0 for CamVid's
    480x360 frames under a 960x720 ``scale_size``), which the resize already did, so it becomes 1.
    """

    mode: str
    crop_hw: tuple[int, int]
    stride_hw: tuple[int, int]
    scales: tuple[float, ...]
    flip: bool
    scale_hw: tuple[int, int] | None = None  # None: predict at the image's own size
    ratio_range: tuple[float, float] = (1.0, 1.0)  # the training scales: scale_hw times these ratios
    output_stride: int = 8

    @classmethod
    def from_checkpoint(cls, loaded: LoadedModel, mode: str | None = None, tta: bool = False) -> InferenceSettings:
        cfg = loaded.config.eval
        mode = cfg.mode if mode is None else mode
        if mode not in ("whole", "slide"):
            raise UserError(f"inference mode {mode!r} is not valid; choose whole or slide")
        scales = tuple(cfg.scales)
        if len(scales) == 1:
            scales = DEFAULT_TTA_SCALES if tta else (1.0,)
        data = loaded.config.data
        return cls(mode=mode, crop_hw=tuple(cfg.crop_size), stride_hw=tuple(cfg.stride), scales=scales,
                   flip=cfg.flip or tta, scale_hw=tuple(data.scale_size), ratio_range=tuple(data.ratio_range),
                   output_stride=loaded.config.model.output_stride)

    def test_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the model sees an image of (height, width) at: rescaled to fit ``scale_hw``, aspect kept."""
        return (height, width) if self.scale_hw is None else rescaled_size(height, width, self.scale_hw)

    def scale_warning(self, height: int, width: int) -> str | None:
        """Why an image of this size will predict poorly, or None: smaller than one cell of the output
        grid, or far (more than 2x) outside the range of scales the model was trained at."""
        if min(height, width) < self.output_stride:
            return (f"{width}x{height} is smaller than one cell of the model's output grid ({self.output_stride} "
                    f"px): too little of a scene to segment; the prediction is one blurred guess")
        if self.scale_hw is None:
            return None
        test_h, test_w = self.test_size(height, width)
        enlarged = test_h / height  # > 1: the image is enlarged to reach the trained scale
        low, high = self.ratio_range
        trained = f"data.scale_size {self.scale_hw[1]}x{self.scale_hw[0]} times {low:g}..{high:g}"
        if enlarged > 2.0 / low:
            return (f"{width}x{height} is {enlarged:.1f}x smaller than the scale the model was trained at "
                    f"({trained}); it is enlarged to {test_w}x{test_h}, which adds no detail: expect a coarse "
                    f"prediction")
        if enlarged < 1.0 / (2.0 * high):
            return (f"{width}x{height} is {1 / enlarged:.1f}x larger than the scale the model was trained at "
                    f"({trained}); it is reduced to {test_w}x{test_h}, so details smaller than about "
                    f"{self.output_stride / enlarged:.0f} px of the image are lost")
        return None


def segment(loaded: LoadedModel, settings: InferenceSettings, images: list[np.ndarray]) -> np.ndarray:
    """uint8 RGB images of one size -> uint8 train-id maps (B, H, W) at that size.

    The images are resized (bilinear) to ``settings.test_size`` and the logits bilinearly back to the
    images' size before the argmax, as evaluation's ``eval.scales`` resize a dataset frame: a frame
    that evaluation brings to the trained scale gets the same labels from both."""
    batch = images_to_tensor(images)
    size = tuple(batch.shape[-2:])
    test_hw = settings.test_size(*size)
    # Bilinear without antialiasing, as evaluation's eval.scales resize a frame (and mmseg's cv2 resize):
    # an enlarged copy of a frame reduced back this way is that frame again, up to interpolation.
    logits = predict(loaded.model, resize_logits(batch, test_hw), mode=settings.mode, crop_hw=settings.crop_hw,
                     stride_hw=settings.stride_hw, num_classes=loaded.classes.num_classes,
                     scales=settings.scales, flip=settings.flip)
    return class_argmax(resize_logits(logits, size)).to(torch.uint8).cpu().numpy()


# ---------------------------------------------------------------- Cityscapes test-server format
def train_ids_to_cityscapes_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids (0..18, 255) -> Cityscapes label ids via cityscapesscripts' ``trainId2label``.

    255 (no prediction) becomes 0 ("unlabeled"), which the evaluator ignores.
    """
    from cityscapesscripts.helpers.labels import trainId2label

    lut = np.zeros(256, dtype=np.uint8)
    for train_id, label in trainId2label.items():
        if 0 <= train_id < 255:
            lut[train_id] = label.id
    return lut[train_ids]


def cityscapes_file_name(image_id: str) -> str:
    """``frankfurt_000000_000294`` -> ``frankfurt_000000_000294_leftImg8bit.png``."""
    return f"{image_id}{CITYSCAPES_SUFFIX}.png"


# ---------------------------------------------------------------- inputs
def image_id_of(path: Path) -> str:
    """The image id: file name without extension, and without Cityscapes' ``_leftImg8bit``."""
    stem = path.stem
    return stem[: -len(CITYSCAPES_SUFFIX)] if stem.endswith(CITYSCAPES_SUFFIX) else stem


def find_images(input_path: Path, out_dir: Path) -> list[Path]:
    """One image, or every image below a folder (recursively, e.g. ``leftImg8bit/test/<city>/``).

    Files inside the output folder are left out, so writing OUT inside the input folder is safe.
    """
    if input_path.is_file():
        return [input_path]
    out_resolved = out_dir.resolve()
    found = []
    for path in sorted(input_path.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        resolved = path.resolve()
        if resolved == out_resolved or out_resolved in resolved.parents:
            continue
        found.append(path)
    if not found:
        raise UserError(f"{input_path}: no images found ({', '.join(IMAGE_EXTENSIONS)}); pass an image, "
                        "a folder of images or a video")
    return found


# ---------------------------------------------------------------- images
def predict_images(loaded: LoadedModel, settings: InferenceSettings, paths: list[Path], out_dir: Path,
                   fmt: str = "png", overlays: bool = True, progress: bool = True) -> PredictSummary:
    ids = [image_id_of(p) for p in paths]
    check_unique_ids(ids, paths[0].parent)
    if fmt == "cityscapes":
        for path, image_id in zip(paths, ids):
            if not _CITYSCAPES_ID.match(image_id):
                raise UserError(
                    f"{path}: --format cityscapes needs Cityscapes file names <city>_<seq>_<frame>_leftImg8bit.png "
                    "(e.g. berlin_000000_000019_leftImg8bit.png); use --format png for other images"
                )
        # The server (and cityscapesscripts) search the submission folder recursively for
        # <city>_<seq>_<frame>*.png: an overlay/<id>.png would count as a second prediction.
        overlays = False
    summary = PredictSummary()
    warned: set[tuple[int, int]] = set()
    lines = ProgressLog(log, "predict", len(paths), enabled=progress_lines(progress))  # without a terminal
    for path, image_id in tqdm(list(zip(paths, ids)), desc="predict", unit="img", disable=not show_progress(progress)):
        label_path = out_dir / (cityscapes_file_name(image_id) if fmt == "cityscapes" else f"{image_id}.png")
        overlay_path = out_dir / "overlay" / f"{image_id}.png"
        if label_path.is_file() and (not overlays or overlay_path.is_file()):
            summary.skipped += 1
            lines.update()
            continue
        image = read_image(path)
        _warn_about_scale(settings, image.shape[:2], path, warned)
        pred = segment(loaded, settings, [image])[0]
        label = train_ids_to_cityscapes_ids(pred) if fmt == "cityscapes" else pred
        write_png_atomic(label_path, label)
        if overlays:
            write_png_atomic(overlay_path, overlay_with_legend(image, pred, loaded.classes))
        summary.written += 1
        lines.update()
    return summary


def _warn_about_scale(settings: InferenceSettings, size_hw: tuple[int, int], where: Path,
                      warned: set[tuple[int, int]]) -> None:
    """One warning line per image size of a run (a folder of photos from one camera gets one line)."""
    if size_hw in warned:
        return
    warned.add(size_hw)
    reason = settings.scale_warning(*size_hw)
    if reason is not None:
        log.warning("%s: %s", where, reason)


# ---------------------------------------------------------------- videos
def _gif_frames(path: Path) -> tuple[Iterator[np.ndarray], int | None, float]:
    img = Image.open(path)
    duration_ms = img.info.get("duration", 100) or 100
    count = getattr(img, "n_frames", None)
    frames = (np.asarray(frame.convert("RGB")).copy() for frame in ImageSequence.Iterator(img))
    return frames, count, 1000.0 / duration_ms


def _av():
    try:
        import av
    except ImportError:
        raise UserError(
            "reading and writing videos needs PyAV: pip install av; "
            "or extract the frames to a folder of images and pass the folder"
        ) from None
    return av


def _av_frames(path: Path) -> tuple[Iterator[np.ndarray], int | None, Fraction]:
    av = _av()
    try:
        container = av.open(str(path))
        stream = container.streams.video[0]
    except (av.FFmpegError, IndexError) as err:
        raise UserError(f"{path}: cannot read the video ({err}); check the file or convert it to mp4") from None
    rate = stream.average_rate or Fraction(25)
    count = stream.frames or None

    def frames():
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        finally:
            container.close()

    return frames(), count, rate


class _AvWriter:
    """Overlay frames -> mp4 (H.264 when available, else MPEG-4 part 2), even sizes for yuv420p."""

    def __init__(self, path: Path, rate: Fraction):
        av = _av()
        self.container = av.open(str(path), mode="w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.pix_fmt = "yuv420p"
        self.av = av
        self.started = False

    def write(self, rgb: np.ndarray) -> None:
        # yuv420p subsamples chroma by 2: odd sizes get one replicated row/column.
        pad_h, pad_w = rgb.shape[0] % 2, rgb.shape[1] % 2
        if pad_h or pad_w:
            rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        h, w = rgb.shape[:2]
        if not self.started:
            self.stream.height, self.stream.width = h, w
            self.started = True
        frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def predict_video(loaded: LoadedModel, settings: InferenceSettings, path: Path, out_dir: Path,
                  batch_size: int = 4, progress: bool = True) -> PredictSummary:
    """Overlay video ``OUT/overlay/<name>.mp4`` (``.gif`` for a GIF input), skipped when it exists."""
    is_gif = path.suffix.lower() == ".gif"
    out_path = out_dir / "overlay" / f"{path.stem}{'.gif' if is_gif else '.mp4'}"
    if out_path.is_file():
        return PredictSummary(skipped=1)
    frames, count, rate = _gif_frames(path) if is_gif else _av_frames(path)
    bar = tqdm(total=count, desc=f"predict {path.name}", unit="frame", disable=not show_progress(progress))
    gif_frames: list[Image.Image] = []
    with atomic_path(out_path) as tmp:
        writer = None if is_gif else _AvWriter(tmp, rate)
        try:
            batch: list[np.ndarray] = []

            def flush():
                for image, pred in zip(batch, segment(loaded, settings, batch)):
                    picture = overlay_with_legend(image, pred, loaded.classes, all_classes=True)
                    if writer is None:
                        gif_frames.append(Image.fromarray(picture))
                    else:
                        writer.write(picture)
                bar.update(len(batch))
                batch.clear()

            warned: set[tuple[int, int]] = set()
            for frame in frames:
                _warn_about_scale(settings, frame.shape[:2], path, warned)
                if batch and (len(batch) == batch_size or batch[0].shape != frame.shape):
                    flush()
                batch.append(frame)
            if batch:
                flush()
        finally:
            if writer is not None:
                writer.close()
            bar.close()
        if writer is None:
            if not gif_frames:
                raise UserError(f"{path}: the GIF has no frames")
            gif_frames[0].save(tmp, format="GIF", save_all=True, append_images=gif_frames[1:],
                               duration=round(1000.0 / rate), loop=0)
    return PredictSummary(written=1)


# ---------------------------------------------------------------- entry point
def predict_path(
    checkpoint: str | os.PathLike | LoadedModel,
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    fmt: str = "png",
    mode: str | None = None,
    tta: bool = False,
    device: str = "auto",
    overlays: bool = True,
    progress: bool = True,
) -> PredictSummary:
    """Segment an image, a folder of images (recursively) or a video into ``out_dir``."""
    if fmt not in FORMATS:
        raise UserError(f"output format {fmt!r} is not valid; choose one of {', '.join(FORMATS)}")
    input_path, out_dir = Path(input_path), Path(out_dir)
    if not input_path.exists():
        raise UserError(f"{input_path}: input not found; pass an image, a folder of images or a video")
    is_video = input_path.is_file() and input_path.suffix.lower() in VIDEO_EXTENSIONS
    if is_video and fmt == "cityscapes":
        raise UserError(f"{input_path}: --format cityscapes is for Cityscapes test images, not videos")
    if input_path.is_file() and not is_video and input_path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UserError(f"{input_path}: not an image ({', '.join(IMAGE_EXTENSIONS)}) or a video "
                        f"({', '.join(VIDEO_EXTENSIONS)})")
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint, parse_device(device))
    settings = InferenceSettings.from_checkpoint(loaded, mode=mode, tta=tta)
    if fmt == "cityscapes" and loaded.classes.num_classes != 19:
        raise UserError(f"--format cityscapes needs a 19-class Cityscapes model; this one has "
                        f"{loaded.classes.num_classes} classes ({loaded.classes.name})")
    if is_video:
        return predict_video(loaded, settings, input_path, out_dir, progress=progress)
    return predict_images(loaded, settings, find_images(input_path, out_dir), out_dir, fmt=fmt,
                          overlays=overlays, progress=progress)
