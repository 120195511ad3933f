"""Evaluation reports: the per-class table on stdout, and a folder with Markdown, JSON and pictures.

The report dict is the evaluation contract of ``ConfusionMatrix.report``: ``miou`` and
``pixel_acc`` in percent, ``iou`` class name -> percent (None when the class is absent from both
GT and prediction), ``num_images``. Classes that the method calls small objects (the ones GLV is
meant to recover) are marked with ``*``. Every file is written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carbseg.data.classes import ClassSet
from carbseg.io import atomic_path, write_json_atomic, write_text_atomic
from carbseg.metrics import ConfusionMatrix

SMALL_MARK = "*"
# The column order of every picture grid (the demo's scenes add the pseudo-mask after the image):
# image | [pseudo-mask] | prediction | ground truth | [errors].
QUALITATIVE_TITLES = ["image", "prediction", "ground truth", "errors"]


@dataclass
class QualitativeSample:
    """One row of a qualitative grid: the picture, its GT and prediction (train ids), its mIoU (%)."""

    id: str
    image: np.ndarray
    gt: np.ndarray
    pred: np.ndarray
    miou: float


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(report: dict, classes: ClassSet) -> str:
    """Aligned per-class IoU table, small classes marked, mIoU and pixel accuracy last."""
    small = set(classes.small_classes)
    names = [n + (f" {SMALL_MARK}" if n in small else "") for n in classes.names]
    width = max([len(n) for n in names] + [len("pixel accuracy"), len("class")])
    rule = "-" * (width + 10)
    lines = [f"{'class':<{width}}  {'IoU (%)':>7}", rule]
    for name, shown in zip(classes.names, names):
        lines.append(f"{shown:<{width}}  {_percent(report['iou'].get(name)):>7}")
    lines.append(rule)
    lines.append(f"{'mIoU':<{width}}  {_percent(report['miou']):>7}")
    lines.append(f"{'pixel accuracy':<{width}}  {_percent(report['pixel_acc']):>7}")
    lines.append(f"({report['num_images']} images; n/a = class absent from GT and prediction, excluded from the mean"
                 + (f"; {SMALL_MARK} = small-object class" if small else "") + ")")
    return "\n".join(lines)


def print_table(report: dict, classes: ClassSet) -> None:
    print(format_table(report, classes))


def format_markdown(report: dict, classes: ClassSet, pictures: list[str] = (),
                    captions: dict[str, str] | None = None) -> str:
    small = set(classes.small_classes)
    lines = [
        f"# Evaluation report ({classes.name})",
        "",
        f"- mIoU: **{_percent(report['miou'])}**",
        f"- pixel accuracy: {_percent(report['pixel_acc'])}",
        f"- images: {report['num_images']}",
        "",
        "| class | IoU (%) | small object |",
        "|---|---:|:---:|",
    ]
    for name in classes.names:
        lines.append(f"| {name} | {_percent(report['iou'].get(name))} | {'yes' if name in small else ''} |")
    lines += ["", "n/a: the class is absent from both ground truth and prediction; it is excluded from the mean.", ""]
    for picture in pictures:
        lines += [f"![{Path(picture).stem}]({picture})", ""]
        if captions and picture in captions:
            lines += [captions[picture], ""]
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # headless: reports are written on servers without a display
    import matplotlib.pyplot as plt

    return plt


def small_mark_footnote(classes: ClassSet) -> str | None:
    """What the ``*`` after a class name means, for pictures that show it; None without small classes."""
    if not classes.small_classes:
        return None
    return f"{SMALL_MARK} small-object class (one that Global-Local View training is meant to recover)"


def iou_bar_figure(report: dict, classes: ClassSet):
    """The matplotlib figure of ``plot_iou_bars`` (open; the caller saves or closes it)."""
    plt = pyplot()
    values = [report["iou"].get(n) for n in classes.names]
    colours = [tuple(v / 255.0 for v in c) for c in classes.palette]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * classes.num_classes + 2), 4.0))
    x = np.arange(classes.num_classes)
    ax.bar(x, [0.0 if v is None else v for v in values], color=colours, edgecolor="black", linewidth=0.5)
    for xi, v in zip(x, values):
        ax.text(xi, (0.0 if v is None else v) + 1.0, "n/a" if v is None else f"{v:.0f}",
                ha="center", va="bottom", fontsize=7)
    if report["miou"] is not None:
        ax.axhline(report["miou"], color="black", linestyle="--", linewidth=1,
                   label=f"mIoU {report['miou']:.1f}")
        ax.legend(loc="upper right", fontsize=8)
    small = set(classes.small_classes)
    ax.set_xticks(x, [n + (SMALL_MARK if n in small else "") for n in classes.names], rotation=60, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("IoU (%)")
    ax.set_title(f"{classes.name}: per-class IoU ({report['num_images']} images)")
    footnote = small_mark_footnote(classes)
    if footnote:
        # As the x-axis label, matplotlib places it below the rotated class names, whatever their length.
        ax.set_xlabel(footnote, loc="left", fontsize=8)
    return fig


def plot_iou_bars(path: Path, report: dict, classes: ClassSet) -> None:
    """Per-class IoU bars in the class colours; classes without an IoU are labelled n/a; small-object
    classes are marked ``*``, explained in a footnote of the picture."""
    save_figure(iou_bar_figure(report, classes), path)


def plot_confusion(path: Path, confusion: ConfusionMatrix, classes: ClassSet) -> None:
    """Row-normalised confusion heat map (each GT class sums to 1; a 'none' column holds misses)."""
    plt = pyplot()
    counts = confusion.matrix.astype(np.float64)
    columns = list(classes.names)
    if confusion.missed.any():
        counts = np.concatenate([counts, confusion.missed[:, None].astype(np.float64)], axis=1)
        columns.append("none (ignore)")
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    size = max(5.0, 0.4 * classes.num_classes + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(np.arange(len(columns)), columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(np.arange(classes.num_classes), classes.names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    save_figure(fig, path)


# The loss terms a training run logs (log.jsonl): the back-propagated total and the CARB
# objective's cross-entropies (carbseg.losses.carb.CARBTerms).
LOSS_TERMS = ("total", "global_ce", "patch_ce", "consistent", "inconsistent", "patch_consistent",
              "patch_inconsistent")
# CARB's region terms: logged during the warm-up too, but only back-propagated after it (the warm-up
# is plain CE on the teacher masks), so the curves draw them from the warm-up's end on.
REGION_TERMS = ("consistent", "inconsistent", "patch_consistent", "patch_inconsistent")


def learning_curve_series(records: list[dict], warmup_iters: int) -> dict[str, list[tuple[int, float]]]:
    """The (iteration, value) points that ``plot_learning_curve`` draws per loss term: region terms
    only after the warm-up; terms that are 0 (or missing) throughout are left out. A record's
    ``iteration`` counts the iterations finished, so the one at ``warmup_iters`` is the warm-up's last."""
    series = {}
    for term in LOSS_TERMS:
        after = warmup_iters if term in REGION_TERMS else -1
        points = [(r["iteration"], r[term]) for r in records
                  if r.get(term) is not None and r["iteration"] > after]
        if points and any(v for _, v in points):
            series[term] = points
    return series


def learning_curve_figure(records: list[dict], warmup_iters: int, reference_miou: float | None = None,
                          reference_label: str = "reference"):
    """The matplotlib figure of ``plot_learning_curve`` (open; the caller saves or closes it)."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for term, points in learning_curve_series(records, warmup_iters).items():
        top.plot(*zip(*points), label=term, linewidth=1.2 if term == "total" else 0.9)
    top.set_ylabel("loss")
    outside = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=7)
    if top.get_lines():
        top.legend(**outside)
    val = [(r["iteration"], r["val_miou"]) for r in records if r.get("val_miou") is not None]
    if val:
        bottom.plot(*zip(*val), marker="o", label="segmenter, validation mIoU")
    if reference_miou is not None:
        bottom.axhline(reference_miou, color="grey", linestyle=":", label=reference_label)
    bottom.set_ylabel("mIoU (%)")
    bottom.set_xlabel("iteration")
    if bottom.get_lines():
        bottom.legend(**outside)
    for ax in (top, bottom):
        ax.axvline(warmup_iters, color="black", linestyle="--", linewidth=0.8)
    top.set_title("warm-up (plain CE) until the dashed line, CARB's region terms after it")
    return fig


def plot_learning_curve(path: Path, records: list[dict], warmup_iters: int, reference_miou: float | None = None,
                        reference_label: str = "reference") -> None:
    """Loss terms (top) and validation mIoU (bottom) of a run's log records against the iteration,
    the end of the CARB warm-up marked; ``reference_miou`` (e.g. the pseudo-masks') as a dotted line.
    Legends sit right of the plots, so that they never cover a line."""
    save_figure(learning_curve_figure(records, warmup_iters, reference_miou, reference_label), path)


def _shrink(picture: np.ndarray, max_width: int) -> np.ndarray:
    """Nearest-neighbour downscale to at most ``max_width`` (keeps label colours and error pixels exact)."""
    from PIL import Image

    h, w = picture.shape[:2]
    if w <= max_width:
        return picture
    size = (max_width, max(1, round(h * max_width / w)))
    return np.asarray(Image.fromarray(picture).resize(size, resample=Image.Resampling.NEAREST))


# Height of the legend band under the picture grids: five classes per column, columns side by side.
KEY_HEIGHT = 4 + 5 * 18


def qualitative_grid(samples: list[QualitativeSample], classes: ClassSet, max_width: int = 512) -> np.ndarray:
    """Rows of image | prediction | ground truth | errors, each picture at most ``max_width`` wide
    (full-resolution Cityscapes frames would make a grid of tens of megapixels)."""
    from carbseg.visualize import below, colorize, error_key, error_map, legend, make_grid, present_classes

    rows = [[_shrink(p, max_width) for p in (s.image, colorize(s.pred, classes), colorize(s.gt, classes),
                                              error_map(s.pred, s.gt, classes.ignore_index))]
            for s in samples]
    grid = make_grid(rows, list(QUALITATIVE_TITLES))
    # Under the grid: which colour is which class (those in these rows' GT or prediction), and the
    # key of the error maps, so the picture reads on its own.
    present = present_classes(*(s.gt for s in samples), *(s.pred for s in samples), classes=classes)
    return below(grid, [legend(classes, present, max_height=KEY_HEIGHT), error_key()])


def write_report(out_dir: str | os.PathLike, report: dict, confusion: ConfusionMatrix, classes: ClassSet,
                 samples: dict[str, list[QualitativeSample]] | None = None, write_json: bool = True) -> list[Path]:
    """Write report.json (if ``write_json``), report.md, iou_bar.png, confusion.png and, given
    ``samples`` ({"worst": [...], "best": [...]}), qualitative_worst.png / qualitative_best.png.

    Returns the paths written.
    """
    from carbseg.visualize import save_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if write_json:
        write_json_atomic(out_dir / "report.json", report)
        written.append(out_dir / "report.json")
    plot_iou_bars(out_dir / "iou_bar.png", report, classes)
    plot_confusion(out_dir / "confusion.png", confusion, classes)
    pictures = ["iou_bar.png", "confusion.png"]
    captions: dict[str, str] = {}
    for kind in ("worst", "best"):
        rows = (samples or {}).get(kind) or []
        if rows:
            name = f"qualitative_{kind}.png"
            save_png(out_dir / name, qualitative_grid(rows, classes))
            pictures.append(name)
            captions[name] = f"{kind} images by per-image mIoU, top to bottom: " + ", ".join(
                f"{r.id} ({r.miou:.1f})" for r in rows)
    write_text_atomic(out_dir / "report.md", format_markdown(report, classes, pictures, captions))
    written += [out_dir / "report.md"] + [out_dir / p for p in pictures]
    return written
