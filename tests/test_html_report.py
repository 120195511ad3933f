"""The HTML report (``--html DIR``) without a browser: its data, files, replacement and refusals.
The page itself is driven in a real browser in test_html_report_browser.py."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carbseg.cli import main
from carbseg.data.datasets import build_dataset
from carbseg.engine.evaluate import evaluate_predictions
from carbseg.html_report import MARKER, HtmlReport, check_report_dir, image_hook
from carbseg.html_report.builder import write_mask_page
from carbseg.io import read_label_png
from html_report_data import CAR, POLE, ROAD, ground_truth, make_dataset, page_data, prediction


def _evaluate(root: Path, classes: Path, pred: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "--dataset", "folder", "--root", str(root), "--split", "val", "--classes", str(classes),
                 "--pred", str(pred), "--no-progress", "--html", str(out), *extra])


def _labels_png(report: Path, n: int) -> np.ndarray:
    """The (h, w, 3) label planes of image n: R prediction, G ground truth, B teacher."""
    text = (report / "labels" / f"{n}.js").read_text(encoding="ascii")
    uri = json.loads(text[text.index(",") + 1:text.rindex(")")])
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_page_data_holds_the_json_report_and_hand_computed_per_image_scores(tmp_path):
    root = tmp_path / "data set ü"
    classes, pred, ids = make_dataset(root, 3)
    out = tmp_path / "report ß 1"
    assert _evaluate(root, classes, pred, out, "--json", str(tmp_path / "e.json")) == 0
    data = page_data(out)
    # The page shows the --json file's own text.
    assert data["report_json"] + "\n" == (tmp_path / "e.json").read_text(encoding="utf-8")
    images = {im["id"]: im for im in data["images"]}
    assert sorted(images) == ids
    # Image 1 (no pole): one row of road (32 px) predicted as car, one car pixel as pole (IoU 0);
    # 8 road pixels have no GT.
    one = images[ids[1]]
    assert one["iou"] == [round(100 * 984 / 1016, 3), round(100 * 1023 / 1056, 3), 0.0]
    assert one["miou"] == round(100 * (984 / 1016 + 1023 / 1056 + 0) / 3, 3)
    assert one["gt"] == [ROAD, CAR] and one["pred"] == [ROAD, CAR, POLE]
    # Image 2: two road rows (64 px) and four pole columns (128 px) predicted as car, one car pixel missed.
    two = images[ids[2]]
    assert two["iou"] == [round(100 * 952 / 1016, 3), round(100 * 511 / 704, 3), 75.0]
    assert two["gt"] == [ROAD, CAR, POLE]
    assert images[ids[0]]["miou"] == 100.0
    # Summed per-image counts are the whole evaluation's confusion matrix.
    total = np.zeros((3, 3), dtype=np.int64)
    for k in range(3):
        gt, pr = ground_truth(k), prediction(k)
        valid = (gt != 255) & (pr != 255)
        np.add.at(total, (gt[valid], pr[valid]), 1)
    assert data["confusion"] == total.tolist() and data["missed"] == [0, 1, 0]
    # Files are named by position, never by id (ids hold spaces here).
    n = images[ids[2]]["n"]
    assert (out / "photos" / f"{n}.jpg").is_file() and (out / "thumbs" / f"{n}.jpg").is_file()
    planes = _labels_png(out, n)
    np.testing.assert_array_equal(planes[..., 0], prediction(2))
    np.testing.assert_array_equal(planes[..., 1], ground_truth(2))
    assert (planes[..., 2] == 255).all()  # no teacher given
    assert (out / MARKER).is_file()


def test_hook_sees_every_image_once_with_the_evaluations_counts(tmp_path):
    classes, pred, ids = make_dataset(tmp_path / "d", 4)
    dataset = build_dataset("folder", str(tmp_path / "d"), "val", classes_file=str(classes))
    seen = {}

    def on_image(index, image, pr, gt, matrix, missed):
        assert image is None  # evaluate_predictions leaves the photo to the hook
        seen[index] = matrix.copy()

    confusion, _ = evaluate_predictions(dataset, pred, progress=False, on_image=on_image)
    assert sorted(seen) == [0, 1, 2, 3]
    np.testing.assert_array_equal(sum(seen.values()), confusion.matrix)


@pytest.mark.parametrize("with_teacher", [True, False])
def test_layers_are_downsized_to_the_display_width_with_nearest_labels(tmp_path, with_teacher):
    classes, pred, _ = make_dataset(tmp_path / "d", 3)
    dataset = build_dataset("folder", str(tmp_path / "d"), "val", classes_file=str(classes))
    out = tmp_path / "r"
    with HtmlReport(out, dataset.classes, {"evaluated": "test"}, teacher_dir=pred if with_teacher else None,
                    display_width=48,
                    thumb_width=16) as html:
        confusion, _ = evaluate_predictions(dataset, pred, progress=False, on_image=image_hook(html, dataset))
        html.finish(confusion.report(dataset.classes.names), confusion)
    data = page_data(out)
    assert [(im["w"], im["h"], im["width"], im["height"]) for im in data["images"]] == [(48, 24, 64, 32)] * 3
    planes = _labels_png(out, 2)
    assert planes.shape == (24, 48, 3)
    # Nearest-neighbour: labels are picked, never blended (255 beside road, 255 beside car), and the
    # blocks' insides keep their class (display x = 3/4 of the frame's x).
    for plane, source in ((planes[..., 0], prediction(2)), (planes[..., 1], ground_truth(2))):
        assert set(np.unique(plane)) <= set(np.unique(source))
        for x, y in ((10, 20), (40, 16), (60, 16), (50, 16)):
            assert plane[y * 3 // 4, x * 3 // 4] == source[y, x]
    # The teacher's masks are the predictions here; without a teacher the plane is all 255.
    np.testing.assert_array_equal(planes[..., 2], planes[..., 0] if with_teacher else 255)
    assert Image.open(out / "photos" / "2.jpg").size == (48, 24)
    assert Image.open(out / "thumbs" / "2.jpg").size == (16, 8)
    assert data["has_teacher"] is with_teacher


def test_an_earlier_report_is_replaced_and_any_other_folder_refused(tmp_path, capsys):
    root = tmp_path / "d"
    classes, pred, _ = make_dataset(root, 2)
    out = tmp_path / "out"
    assert _evaluate(root, classes, pred, out) == 0
    (out / "stale.txt").write_text("from the earlier report")
    assert _evaluate(root, classes, pred, out) == 0
    assert not (out / "stale.txt").exists() and (out / "index.html").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    capsys.readouterr()
    assert _evaluate(root, classes, pred, other, "--json", str(tmp_path / "j.json")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a carbseg HTML report" in err and str(other) in err
    assert sorted(p.name for p in other.iterdir()) == ["mine.txt"]
    assert not (tmp_path / "j.json").exists()  # refused before any work
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_report_dir(empty) == empty


def test_a_failure_midway_leaves_neither_the_report_nor_a_temporary(tmp_path, capsys):
    root = tmp_path / "d"
    classes, pred, ids = make_dataset(root, 3)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for name in ids[:2]:  # the third image's pseudo-mask is missing
        (teacher / f"{name}.png").write_bytes((pred / f"{name}.png").read_bytes())
    assert _evaluate(root, classes, pred, tmp_path / "out", "--teacher-masks", str(teacher)) == 2
    assert "teacher pseudo-mask missing" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "teacher"]


def test_html_and_report_need_their_own_folders(tmp_path, capsys):
    root = tmp_path / "d"
    classes, pred, _ = make_dataset(root, 1)
    assert _evaluate(root, classes, pred, tmp_path / "out", "--report", str(tmp_path / "out")) == 2
    assert "the same folder as --report" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_teacher_masks_need_html(tmp_path, capsys):
    classes, pred, _ = make_dataset(tmp_path / "d", 1)
    assert main(["evaluate", "--dataset", "folder", "--root", str(tmp_path / "d"), "--split", "val", "--classes",
                 str(classes), "--pred", str(pred), "--teacher-masks", str(pred)]) == 2
    assert "add --html DIR" in capsys.readouterr().err


def test_mask_page_without_ground_truth_shows_masks_unscored(tmp_path):
    root = tmp_path / "d"
    classes, pred, ids = make_dataset(root, 2)
    for mask in (root / "masks" / "val").iterdir():
        mask.unlink()
    (root / "masks" / "val").rmdir()
    dataset = build_dataset("folder", str(root), "val", classes_file=str(classes))
    page, report = write_mask_page(tmp_path / "r", dataset, pred, {"evaluated": "pseudo-masks"}, progress=False)
    assert report is None and page == tmp_path / "r" / "index.html"
    data = page_data(tmp_path / "r")
    assert data["has_gt"] is False and data["report_json"] is None and data["prediction_name"] == "pseudo-mask"
    assert [im["pred"] for im in data["images"]] == [[ROAD, CAR, POLE], [ROAD, CAR, POLE]]
    assert "miou" not in data["images"][0]
    np.testing.assert_array_equal(_labels_png(tmp_path / "r", 1)[..., 0], read_label_png(pred / f"{ids[1]}.png"))


@pytest.mark.parametrize("text", ["</script><script>alert(1)</script>"])
def test_ids_cannot_end_the_data_script(tmp_path, text):
    root = tmp_path / "d"
    classes, pred, _ = make_dataset(root, 1, names=["a"])
    dataset = build_dataset("folder", str(root), "val", classes_file=str(classes))
    with HtmlReport(tmp_path / "r", dataset.classes, {"evaluated": text}) as html:
        html.finish(None)
    page = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert text not in page and page_data(tmp_path / "r")["source"]["evaluated"] == text


def test_pseudo_masks_html_scores_the_masks_like_evaluate(tmp_path, capsys):
    root = tmp_path / "d"
    classes, _, ids = make_dataset(root, 3)
    common = ["--dataset", "folder", "--root", str(root), "--split", "val", "--classes", str(classes)]
    assert main(["labels", *common, "--out", str(tmp_path / "labels.json"), "--no-progress"]) == 0
    masks, page = tmp_path / "masks", tmp_path / "page ü"
    assert main(["pseudo-masks", *common, "--labels", str(tmp_path / "labels.json"), "--out", str(masks),
                 "kind=simulated", "grid_cell=8", "--workers", "0", "--no-progress", "--html", str(page)]) == 0
    assert main(["evaluate", *common, "--pred", str(masks), "--json", str(tmp_path / "e.json"),
                 "--no-progress"]) == 0
    data = page_data(page)
    assert data["report_json"] + "\n" == (tmp_path / "e.json").read_text(encoding="utf-8")
    assert [im["id"] for im in data["images"]] == ids and data["prediction_name"] == "pseudo-mask"
    assert "simulated teacher" in data["source"]["evaluated"]
    np.testing.assert_array_equal(_labels_png(page, 1)[..., 0], read_label_png(masks / f"{ids[1]}.png"))
    # A folder in the way is refused before any mask is made.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    capsys.readouterr()
    assert main(["pseudo-masks", *common, "--labels", str(tmp_path / "labels.json"), "--out",
                 str(tmp_path / "masks2"), "kind=simulated", "--no-progress", "--html", str(tmp_path / "taken")]) == 2
    assert "is not a carbseg HTML report" in capsys.readouterr().err and not (tmp_path / "masks2").exists()


def test_bench_html_runs_at_a_tiny_size(tmp_path):
    import subprocess
    import sys

    from conftest import PROJECT_ROOT

    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench_html.py"), "--work",
                          str(tmp_path), "--num", "3", "--size", "96x48", "--unique", "1"],
                         capture_output=True, text=True, check=True).stdout
    assert "| evaluate + html: page build (s) |" in out and "| page folder (MB) |" in out
    assert len(page_data(tmp_path / "report")["images"]) == 3


def test_the_page_template_is_declared_as_package_data():
    # Without this, a non-editable install (pip install .) would ship a report builder without its page.
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from fnmatch import fnmatch

    from conftest import PROJECT_ROOT

    patterns = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "tool"]["setuptools"]["package-data"]["carbseg"]
    templates = sorted(p.name for p in (PROJECT_ROOT / "src" / "carbseg" / "html_report").iterdir()
                       if p.suffix in (".html", ".css", ".js"))
    assert templates == ["page.css", "page.html", "page.js"]
    for name in templates:
        assert any(fnmatch(f"html_report/{name}", pattern) for pattern in patterns), name


def test_evaluate_checkpoint_html_shows_the_checkpoints_predictions(tmp_path):
    from carbseg.engine.inference import evaluate_checkpoint
    from test_evaluate import tiny_camvid_checkpoint

    root, checkpoint = tiny_camvid_checkpoint(tmp_path)
    assert main(["evaluate", "--dataset", "camvid", "--root", str(root), "--split", "val", "--checkpoint",
                 str(checkpoint), "--device", "cpu", "--json", str(tmp_path / "r.json"), "--no-progress",
                 "--html", str(tmp_path / "page")]) == 0
    data = page_data(tmp_path / "page")
    assert data["report_json"] + "\n" == (tmp_path / "r.json").read_text(encoding="utf-8")
    assert data["source"]["evaluated"] == f"checkpoint {checkpoint}"
    _, _, kept = evaluate_checkpoint(build_dataset("camvid", root, "val"), checkpoint, progress=False,
                                     keep_samples=3)
    assert [s.id for s in kept] == [im["id"] for im in data["images"]] == ["a", "b", "c"]
    for sample in kept:
        planes = _labels_png(tmp_path / "page", sample.index)
        np.testing.assert_array_equal(planes[..., 0], sample.pred)
        np.testing.assert_array_equal(planes[..., 1], sample.mask)


def test_photos_are_box_averaged_by_a_whole_factor_and_resized_otherwise():
    from carbseg.html_report.builder import _resize_photo

    photo = np.random.default_rng(0).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    half = _resize_photo(photo, (8, 4))  # 2048 x 1024 -> 1024 x 512 in small
    box = photo.reshape(4, 2, 8, 2, 3).astype(float).mean(axis=(1, 3))
    assert half.shape == (4, 8, 3) and np.abs(half - box).max() <= 0.5
    assert _resize_photo(photo, (12, 6)).shape == (6, 12, 3)
    assert (_resize_photo(photo, (16, 8)) == photo).all()
