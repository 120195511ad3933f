"""Report writers: the stdout table, report.md / report.json, and the pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from carbseg.data.classes import ClassSet
from carbseg.engine.report import (
    QualitativeSample,
    format_markdown,
    format_table,
    print_table,
    qualitative_grid,
    write_report,
)
from carbseg.metrics import ConfusionMatrix

TINY = ClassSet(name="tiny", names=("road", "pole", "sky"), text_names=("road", "pole", "sky"),
                palette=((128, 64, 128), (153, 153, 153), (70, 130, 180)), small_classes=("pole",))
GT = np.array([[0, 0, 1, 1],
               [0, 0, 1, 1],
               [0, 0, 0, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [0, 0, 255, 1],
                 [0, 0, 0, 0]], dtype=np.uint8)


def _confusion() -> ConfusionMatrix:
    cm = ConfusionMatrix(3)
    cm.update(PRED, GT)
    return cm


def test_report_values_used_by_the_writers():
    # road: TP 6, GT 7, predicted 6 -> 6/7 ; pole: TP 3, GT 4 (one abstained pixel), predicted 4 -> 3/5 ;
    # sky: absent from GT and prediction -> None.
    r = _confusion().report(TINY.names)
    assert r["iou"]["road"] == pytest.approx(100 * 6 / 7)
    assert r["iou"]["pole"] == pytest.approx(60.0)
    assert r["iou"]["sky"] is None
    assert r["miou"] == pytest.approx(100 * (6 / 7 + 0.6) / 2)
    assert r["pixel_acc"] == pytest.approx(100 * 9 / 11)


def test_table_is_aligned_marks_small_classes_and_ends_with_means(capsys):
    r = _confusion().report(TINY.names)
    print_table(r, TINY)
    out = capsys.readouterr().out
    assert out == format_table(r, TINY) + "\n"
    lines = out.splitlines()
    assert lines[0].split() == ["class", "IoU", "(%)"]
    rows = {line[:16].strip(): line[16:].strip() for line in lines if line and not line.startswith(("-", "("))}
    assert rows["road"] == "85.71"
    assert rows["pole *"] == "60.00"
    assert rows["sky"] == "n/a"
    assert rows["mIoU"] == "72.86"
    assert rows["pixel accuracy"] == "81.82"
    value_lines = [line for line in lines[2:] if not line.startswith(("-", "("))]
    assert len({len(line) for line in value_lines}) == 1  # right-aligned values end in one column
    assert lines[-4].startswith("-") and lines[-3].startswith("mIoU") and lines[-2].startswith("pixel accuracy")


def test_markdown_table():
    r = _confusion().report(TINY.names)
    md = format_markdown(r, TINY, ["iou_bar.png"], {"iou_bar.png": "caption"})
    assert "| road | 85.71 |  |" in md
    assert "| pole | 60.00 | yes |" in md
    assert "| sky | n/a |  |" in md
    assert "- mIoU: **72.86**" in md
    assert "![iou_bar](iou_bar.png)\n\ncaption" in md


def test_write_report_files(tmp_path):
    cm = _confusion()
    r = cm.report(TINY.names)
    image = np.zeros((3, 4, 3), dtype=np.uint8)
    sample = QualitativeSample(id="f1", image=image, gt=GT, pred=PRED, miou=72.9)
    written = write_report(tmp_path / "rep", r, cm, TINY, samples={"worst": [sample], "best": [sample, sample]})
    names = sorted(p.name for p in written)
    assert names == sorted(["report.json", "report.md", "iou_bar.png", "confusion.png", "qualitative_worst.png",
                            "qualitative_best.png"])
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == names  # no temporary files left behind
    assert json.loads((tmp_path / "rep" / "report.json").read_text()) == r
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "worst images by per-image mIoU, top to bottom: f1 (72.9)" in md
    for picture in ("iou_bar.png", "confusion.png"):
        with Image.open(tmp_path / "rep" / picture) as img:
            assert img.format == "PNG" and img.width > 200 and img.height > 200
    with Image.open(tmp_path / "rep" / "qualitative_best.png") as img:
        best = np.asarray(img)
    with Image.open(tmp_path / "rep" / "qualitative_worst.png") as img:
        worst = np.asarray(img)
    assert best.shape[1] == worst.shape[1]
    assert best.shape[0] - worst.shape[0] == 3 + 4  # one more row of height 3 plus its padding


def test_write_report_without_samples_or_json(tmp_path):
    cm = _confusion()
    written = write_report(tmp_path, cm.report(TINY.names), cm, TINY, write_json=False)
    assert sorted(p.name for p in written) == ["confusion.png", "iou_bar.png", "report.md"]


def test_qualitative_grid_layout_and_colours():
    image = np.full((3, 4, 3), 7, dtype=np.uint8)
    from carbseg.engine.report import QUALITATIVE_TITLES
    from carbseg.visualize import colorize, error_key, error_map, legend, make_grid

    with_keys = qualitative_grid([QualitativeSample("f", image, GT, PRED, 50.0)], TINY)
    # The order of the demo's scenes.png (image | pseudo-mask | prediction | ground truth), errors last.
    assert QUALITATIVE_TITLES == ["image", "prediction", "ground truth", "errors"]
    grid = make_grid([[image, colorize(PRED, TINY), colorize(GT, TINY), error_map(PRED, GT)]],
                     list(QUALITATIVE_TITLES))
    np.testing.assert_array_equal(with_keys[: grid.shape[0], : grid.shape[1]], grid)
    # Below the grid: the legend of the classes in GT or prediction, then the error-map key.
    present = sorted({int(v) for v in np.unique(np.concatenate([GT.ravel(), PRED.ravel()]))} - {255})
    classes_key, errors_key = legend(TINY, present, max_height=4 + 5 * 18), error_key()
    band = with_keys[grid.shape[0]:]
    np.testing.assert_array_equal(band[: classes_key.shape[0], 4: 4 + classes_key.shape[1]], classes_key)
    x = 4 + classes_key.shape[1] + 4
    np.testing.assert_array_equal(band[: errors_key.shape[0], x: x + errors_key.shape[1]], errors_key)
    pad = 4
    assert grid.shape[1] == 4 * 4 + 5 * pad
    bottom = grid[-pad - 3: -pad]  # the one row of pictures, just above the bottom padding
    cells = [bottom[:, pad + c * (4 + pad): pad + c * (4 + pad) + 4] for c in range(4)]
    np.testing.assert_array_equal(cells[0], image)
    np.testing.assert_array_equal(cells[1][0, 1], TINY.palette[1])  # predicted pole
    np.testing.assert_array_equal(cells[2][0, 1], TINY.palette[0])  # ground-truth road
    # errors: (0,1) wrong, (0,0) right, (2,3) ignored in GT -> three different colours
    assert len({tuple(cells[3][0, 1]), tuple(cells[3][0, 0]), tuple(cells[3][2, 3])}) == 3


def test_qualitative_grid_shrinks_large_frames():
    big = np.zeros((512, 1024, 3), dtype=np.uint8)
    mask = np.zeros((512, 1024), dtype=np.uint8)
    grid = qualitative_grid([QualitativeSample("f", big, mask, mask, 100.0)], TINY, max_width=256)
    assert grid.shape[1] == 4 * 256 + 5 * 4


def test_iou_bar_explains_the_small_object_mark():
    from carbseg.engine.report import iou_bar_figure, pyplot

    cm = _confusion()
    fig = iou_bar_figure(cm.report(TINY.names), TINY)
    try:
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["road", "pole*", "sky"]
        assert ax.get_xlabel().startswith("* small-object class")
    finally:
        pyplot().close(fig)
    plain = ClassSet(name="plain", names=TINY.names, text_names=TINY.text_names, palette=TINY.palette)
    fig = iou_bar_figure(cm.report(plain.names), plain)
    try:
        assert fig.axes[0].get_xlabel() == ""  # no mark, nothing to explain
    finally:
        pyplot().close(fig)


def _records(warmup_iters: int) -> list[dict]:
    # Records after 0, 2, 4, 6, 8 finished iterations; region terms logged throughout, as a run logs them.
    return [{"iteration": i, "warmup": float(i <= warmup_iters), "total": 2.0 - 0.1 * i, "global_ce": 1.0,
             "patch_ce": 0.0, "consistent": 0.5,
             "inconsistent": 3.0, "patch_consistent": 0.0, "patch_inconsistent": 0.0,
             **({"val_miou": 10.0 + i} if i == 8 else {})} for i in range(0, 10, 2)]


def test_learning_curve_draws_region_terms_from_the_warm_up_end_only(tmp_path):
    from carbseg.engine.report import (
        learning_curve_figure,
        learning_curve_series,
        plot_learning_curve,
        pyplot,
    )

    series = learning_curve_series(_records(4), warmup_iters=4)
    # A record counts the iterations finished: the one at 4 is the warm-up's last step (plain CE, as the
    # log's "warmup" flag says), so CARB's regions start at 6; patch terms are 0 throughout (no GLV).
    assert [r["warmup"] for r in _records(4)] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert series == {"total": [(0, 2.0), (2, 1.8), (4, 1.6), (6, 1.4), (8, 1.2)],
                      "global_ce": [(0, 1.0), (2, 1.0), (4, 1.0), (6, 1.0), (8, 1.0)],
                      "consistent": [(6, 0.5), (8, 0.5)], "inconsistent": [(6, 3.0), (8, 3.0)]}
    assert "inconsistent" not in learning_curve_series(_records(8), warmup_iters=8)  # still warming up
    fig = learning_curve_figure(_records(4), 4, 20.0, "pseudo-masks")
    try:
        # Both legends right of their plots (they cannot cover a line), naming what is drawn.
        fig.canvas.draw()
        for ax, names in zip(fig.axes, (["total", "global_ce", "consistent", "inconsistent"],
                                        ["segmenter, validation mIoU", "pseudo-masks"])):
            key = ax.get_legend()
            assert [t.get_text() for t in key.get_texts()] == names
            assert key.get_window_extent().x0 >= ax.get_window_extent().x1
    finally:
        pyplot().close(fig)
    plot_learning_curve(tmp_path / "curve.png", _records(4), 4, 20.0, "pseudo-masks")
    with Image.open(tmp_path / "curve.png") as img:  # the saved picture keeps the legends (tight bbox)
        assert img.size[0] > 830 and img.size[1] > 500
