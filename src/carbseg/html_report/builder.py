"""Build the browsable HTML report of an evaluation (or of pseudo-masks): ``DIR/index.html``.

The page is static and self-contained: it opens from ``file://`` with no server and no network.
Its script and style are the package's ``page.js`` / ``page.css``, inlined into ``index.html``
together with the summary (the ``--json`` report verbatim, the confusion counts) and one record
per image (per-image mIoU and per-class IoU, the classes present). Beside it, per image:

- ``photos/N.jpg``: the photo at display size (at most ``display_width`` wide);
- ``thumbs/N.jpg``: a small photo with the prediction blended over it, for the gallery;
- ``labels/N.js``: one RGB PNG at display size, as a data URI inside a script (R = prediction,
  G = ground truth, B = teacher's pseudo-mask; 255 = ignore / absent). The page loads it on demand
  with a script tag, which ``file://`` allows where ``fetch`` does not, and a data-URI image can be
  read back from a canvas, so the page draws every layer (prediction, ground truth, error map,
  teacher, CARB's consistent / inconsistent regions) and the class highlight from the class ids
  themselves rather than from colours.

``N`` is the image's position in the dataset, so image ids with slashes, spaces or non-ASCII
letters never become file names. Images are added from the evaluation's own pass (``add`` is
called by ``evaluate_predictions`` / ``evaluate_checkpoint`` with the counts they computed, from
their worker threads), so nothing is evaluated twice.

The whole folder is written under a temporary name beside ``DIR`` and renamed into place at the
end; an existing ``DIR`` is replaced only when it is an earlier report (it holds ``MARKER``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import json
import os
import shutil
import tempfile
import threading
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from carbseg import __version__
from carbseg.data.classes import IGNORE_INDEX, ClassSet
from carbseg.errors import UserError
from carbseg.io import check_output_dir
from carbseg.metrics import iou_from_counts
from carbseg.visualize import CORRECT_COLOR, IGNORE_COLOR, WRONG_COLOR, overlay

_UMASK = os.umask(0o022)
os.umask(_UMASK)
MARKER = ".carbseg-html-report"  # names a folder as a report that a new one may replace
DISPLAY_WIDTH = 1024  # photos and layers: Cityscapes' 2048 x 1024 frames at half size
THUMB_WIDTH = 256
PHOTO_QUALITY = 85
THUMB_QUALITY = 75
# CARB's regions (docs/method.md): teacher == model on the teacher's valid pixels, and the rest.
CONSISTENT_COLOR = (0, 150, 255)
INCONSISTENT_COLOR = (255, 150, 0)


def check_report_dir(path: str | os.PathLike, option: str = "--html") -> Path:
    """Refuse, before any work, an output folder that exists and is not an earlier report."""
    path = check_output_dir(path, option)
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
        raise UserError(f"{option} {path}: exists and is not a carbseg HTML report; choose a new folder "
                        "(or remove this one)")
    return path


def _display_size(width: int, height: int, max_width: int) -> tuple[int, int]:
    if width <= max_width:
        return width, height
    return max_width, max(1, round(height * max_width / width))


def _jpeg(picture: np.ndarray, path: Path, quality: int) -> None:
    Image.fromarray(picture).save(path, format="JPEG", quality=quality)


def _resize_labels(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape[::-1] == size:
        return mask
    return np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))


def _resize_photo(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = image.shape[:2]
    if (width, height) == size:
        return np.ascontiguousarray(image)
    factor = width // size[0]
    if width == factor * size[0] and height == factor * size[1]:
        # Box averaging by a whole factor (Cityscapes' 2048 -> 1024): 5x cheaper than a bilinear resize.
        return np.asarray(Image.fromarray(image).reduce(factor))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def _percent_or_none(values: np.ndarray) -> list:
    return [None if np.isnan(v) else round(100.0 * float(v), 3) for v in values]


class HtmlReport:
    """Collects images during an evaluation, then writes the page with ``finish``.

    Use as a context manager: leaving it on an error removes the temporary folder.
    ``source`` describes what was evaluated (shown as is: model or teacher, dataset, split,
    scales, machine); ``teacher_dir`` holds the teacher's pseudo-masks ``IMAGE_ID.png`` to compare
    with the model (optional); ``prediction_name`` names the prediction layer ("pseudo-mask" when
    the teacher's masks are what is evaluated).
    """

    def __init__(self, out_dir: str | os.PathLike, classes: ClassSet, source: dict,
                 teacher_dir: str | os.PathLike | None = None, prediction_name: str = "prediction",
                 display_width: int = DISPLAY_WIDTH, thumb_width: int = THUMB_WIDTH):
        self.out_dir = check_report_dir(out_dir)
        self.classes = classes
        self.source = dict(source)
        self.teacher_dir = None if teacher_dir is None else Path(teacher_dir)
        if self.teacher_dir is not None and not self.teacher_dir.is_dir():
            raise UserError(f"{self.teacher_dir}: teacher pseudo-mask folder not found; pass the --out folder of "
                            "carbseg pseudo-masks")
        self.prediction_name = prediction_name
        self.display_width = display_width
        self.thumb_width = thumb_width
        self._images: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._tmp: Path | None = None

    def __enter__(self) -> HtmlReport:
        parent = self.out_dir.absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".tmp", dir=parent))
        os.chmod(self._tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private; the report is a normal folder
        for sub in ("photos", "thumbs", "labels"):
            (self._tmp / sub).mkdir()
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # ------------------------------------------------------------ per image (worker threads)
    def _teacher_mask(self, image_id: str, shape: tuple[int, int]) -> np.ndarray | None:
        if self.teacher_dir is None:
            return None
        from carbseg.engine.evaluate import prediction_path, read_prediction

        path = prediction_path(self.teacher_dir, image_id)
        if not path.is_file():
            raise UserError(f"{path}: teacher pseudo-mask missing; pass the folder that carbseg pseudo-masks "
                            "wrote for this split")
        return read_prediction(path, self.classes.num_classes, shape).astype(np.uint8)

    def add(self, index: int, image_id: str, image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None,
            matrix: np.ndarray | None = None, missed: np.ndarray | None = None) -> None:
        """One evaluated image: the photo (H, W, 3) uint8, its prediction and ground truth (H, W)
        train ids, and the evaluation's confusion counts of it (``confusion_counts``)."""
        if self._tmp is None:
            raise RuntimeError("HtmlReport.add outside its with-block")
        height, width = pred.shape
        size = _display_size(width, height, self.display_width)
        pred8 = np.asarray(pred, dtype=np.uint8)
        teacher = self._teacher_mask(image_id, pred8.shape)
        # An absent plane (no ground truth, no teacher) is all ignore: the page draws nothing there.
        planes = [np.full(size[::-1], IGNORE_INDEX, np.uint8) if p is None
                  else _resize_labels(np.asarray(p, np.uint8), size) for p in (pred8, gt, teacher)]
        buffer = io.BytesIO()
        Image.fromarray(np.dstack(planes)).save(buffer, format="PNG", compress_level=1)
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        (self._tmp / "labels" / f"{index}.js").write_text(f"carbsegLabels({index},{json.dumps(uri)});\n",
                                                         encoding="ascii")
        photo = _resize_photo(image[..., :3], size)
        _jpeg(photo, self._tmp / "photos" / f"{index}.jpg", PHOTO_QUALITY)
        thumb_size = _display_size(size[0], size[1], self.thumb_width)
        thumb = np.asarray(Image.fromarray(photo).resize(thumb_size, Image.BILINEAR))
        _jpeg(overlay(thumb, _resize_labels(planes[0], thumb_size), self.classes, alpha=0.5),
              self._tmp / "thumbs" / f"{index}.jpg", THUMB_QUALITY)
        record = {"n": index, "id": image_id, "w": size[0], "h": size[1], "width": width, "height": height}
        if matrix is not None:
            iou = iou_from_counts(matrix, missed)
            total = int(matrix.sum() + (0 if missed is None else missed.sum()))
            record["miou"] = round(100.0 * float(np.nanmean(iou)), 3) if np.isfinite(iou).any() else None
            record["acc"] = round(100.0 * float(np.trace(matrix)) / total, 3) if total else None
            record["iou"] = _percent_or_none(iou)
            record["gt"] = np.flatnonzero(matrix.sum(axis=1) + (0 if missed is None else missed)).tolist()
        else:
            record["gt"] = []
        predicted = np.bincount(pred8.reshape(-1), minlength=256)[: self.classes.num_classes]
        record["pred"] = np.flatnonzero(predicted).tolist()
        with self._lock:
            self._images[index] = record

    # ------------------------------------------------------------ the page
    def page_data(self, report: dict | None, confusion=None) -> dict:
        images = [self._images[k] for k in sorted(self._images)]
        return {
            "generator": f"carbseg {__version__}",
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "source": self.source,
            "classes": list(self.classes.names),
            "palette": [list(c) for c in self.classes.palette],
            "colors": {"correct": list(CORRECT_COLOR), "wrong": list(WRONG_COLOR), "ignored": list(IGNORE_COLOR),
                       "consistent": list(CONSISTENT_COLOR), "inconsistent": list(INCONSISTENT_COLOR)},
            "prediction_name": self.prediction_name,
            "has_gt": report is not None,
            "has_teacher": self.teacher_dir is not None,
            # The --json report's own text, so that the page shows exactly its numbers.
            "report_json": None if report is None else json.dumps(report, indent=2, sort_keys=False),
            "confusion": None if confusion is None else confusion.matrix.tolist(),
            "missed": None if confusion is None else confusion.missed.tolist(),
            "images": images,
        }

    def finish(self, report: dict | None, confusion=None) -> Path:
        """Write ``index.html`` and move the folder into place; returns the page's path."""
        if self._tmp is None:
            raise RuntimeError("HtmlReport.finish outside its with-block")
        data = json.dumps(self.page_data(report, confusion), ensure_ascii=True, allow_nan=False)
        page = render_page(data)
        (self._tmp / "index.html").write_text(page, encoding="utf-8")
        (self._tmp / MARKER).write_text(f"carbseg {__version__} HTML report; may be replaced by the next one\n",
                                        encoding="utf-8")
        _move_into_place(self._tmp, self.out_dir)
        self._tmp = None
        return self.out_dir / "index.html"


def render_page(data_json: str) -> str:
    """index.html: the template with the package's style, script and the page data inlined."""
    package = resources.files("carbseg.html_report")
    template = package.joinpath("page.html").read_text(encoding="utf-8")
    # "</" would end the <script> element early: JSON allows "<\/" for it.
    data = data_json.replace("</", "<\\/")
    return (template.replace("/*STYLE*/", package.joinpath("page.css").read_text(encoding="utf-8"))
            .replace("/*SCRIPT*/", package.joinpath("page.js").read_text(encoding="utf-8"))
            .replace("/*DATA*/", data))


def _move_into_place(built: Path, out_dir: Path) -> None:
    """Rename the finished folder to ``out_dir``; an earlier report (or empty folder) there is replaced."""
    old = None
    if out_dir.exists():
        check_report_dir(out_dir)  # it may have changed since the start
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.absolute().parent))
        os.replace(out_dir, old / "report")
    os.replace(built, out_dir)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)


def image_hook(report: HtmlReport, dataset):
    """The ``on_image`` hook (``carbseg.engine.evaluate.ImageHook``) that adds each evaluated image of
    ``dataset`` to ``report``, reading its photo when the evaluation did not have it at hand."""

    def on_image(index, image, pred, gt, matrix, missed) -> None:
        photo = dataset.load_image(index) if image is None else image
        report.add(index, dataset.ids[index], photo, pred, gt, matrix, missed)

    return on_image


def machine_description(device="cpu") -> str:
    """Where the evaluation ran: host name and ``carbseg.precision.machine_summary``."""
    import platform

    from carbseg.precision import machine_summary

    return f"{platform.node() or 'unknown host'}; {machine_summary(device)}"


def write_mask_page(out_dir: str | os.PathLike, dataset, mask_dir: str | os.PathLike, source: dict,
                    progress: bool = True) -> tuple[Path, dict | None]:
    """The page of a folder of pseudo-masks (``carbseg pseudo-masks --html``): scored against the
    ground truth in the evaluation's own pass where the split has it, shown without scores where not.
    Returns the page's path and the evaluation report (None without ground truth)."""
    from carbseg.engine.evaluate import check_predictions_exist, evaluate_predictions, prediction_path

    with HtmlReport(out_dir, dataset.classes, source, prediction_name="pseudo-mask") as html:
        if dataset.has_masks:
            confusion, _ = evaluate_predictions(dataset, mask_dir, progress=progress,
                                                on_image=image_hook(html, dataset))
            report = confusion.report(dataset.classes.names)
            return html.finish(report, confusion), report
        from carbseg.io import read_label_png

        check_predictions_exist(dataset, mask_dir)
        for index, image_id in enumerate(dataset.ids):
            html.add(index, image_id, dataset.load_image(index),
                     read_label_png(prediction_path(mask_dir, image_id)), None)
        return html.finish(None), None
