"""carbseg predict: train-id PNGs, overlays, Cityscapes test-server files, videos, resumability, CLI."""

from __future__ import annotations

import copy
import fnmatch
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from carbseg.cli import main
from carbseg.config import Config, ModelConfig
from carbseg.data.classes import CAMVID, CITYSCAPES
from carbseg.engine.checkpoint import load_model, read_model_metadata, save_model
from carbseg.engine.inference import predict_whole
from carbseg.engine.predict import predict_path, train_ids_to_cityscapes_ids
from carbseg.errors import UserError
from carbseg.io import read_label_png
from carbseg.models.segmenter import build_segmenter
from carbseg.visualize import legend, overlay_with_legend


def _checkpoint(tmp_path, classes=CAMVID, name="model.safetensors", scale_hw=(32, 64)):
    cfg = Config(name="predict-test")
    cfg.data.scale_size = list(scale_hw)  # predict rescales every image to fit it, aspect kept
    cfg.model = ModelConfig(backbone="tiny", pretrained="none", classifier="learned", head_channels=32,
                            aspp_dilations=[1, 2])
    torch.manual_seed(0)
    model = build_segmenter(cfg.model, classes.num_classes, load_pretrained=False)
    with torch.no_grad():  # spread the random classifier's outputs so several classes win somewhere
        model.classifier.weight.mul_(20.0)
    return save_model(tmp_path / name, model, cfg, classes)


def _expected_train_ids(checkpoint, image: np.ndarray, test_hw: tuple[int, int]) -> np.ndarray:
    """The image resized (bilinear) to ``test_hw``, predicted whole, the logits resized back, argmax."""
    model = load_model(checkpoint).model
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=test_hw, mode="bilinear", align_corners=False)
    logits = F.interpolate(predict_whole(model, resized), size=image.shape[:2], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy().astype(np.uint8)


def _write_images(folder, specs):
    rng = np.random.default_rng(0)
    images = {}
    for rel, (h, w) in specs.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(path)
        images[path.stem] = image
    return images


def test_folder_prediction_writes_train_ids_and_overlays_and_resumes(tmp_path):
    checkpoint = _checkpoint(tmp_path)
    inputs = tmp_path / "in"
    _write_images(inputs, {"a.png": (24, 40), "sub/b.jpg": (32, 32)})
    out = inputs / "pred"  # inside the input folder: its PNGs must not be taken as new inputs
    summary = predict_path(checkpoint, inputs, out, device="cpu", progress=False)
    assert (summary.written, summary.skipped) == (2, 0)
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png"]
    seen = set()
    # Fitted into data.scale_size 32x64 (h, w), aspect kept: 24x40 by min(64/40, 32/24) = 4/3 -> 32x53;
    # 32x32 by min(64/32, 32/32) = 1 -> as it is.
    for image_id, test_hw in (("a", (32, 53)), ("b", (32, 32))):
        image = np.asarray(Image.open(inputs / ("a.png" if image_id == "a" else "sub/b.jpg")).convert("RGB"))
        expected = _expected_train_ids(checkpoint, image, test_hw)
        pred = read_label_png(out / f"{image_id}.png")
        np.testing.assert_array_equal(pred, expected)
        np.testing.assert_array_equal(np.asarray(Image.open(out / "overlay" / f"{image_id}.png")),
                                      overlay_with_legend(image, expected, CAMVID))
        seen |= set(np.unique(pred).tolist())
    assert len(seen) > 1 and max(seen) < CAMVID.num_classes

    # Second run: everything is already there, nothing is rewritten.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    summary = predict_path(checkpoint, inputs, out, device="cpu", progress=False)
    assert (summary.written, summary.skipped) == (0, 2)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_cityscapes_format_uses_label_ids_and_server_file_names(tmp_path):
    from cityscapesscripts.helpers.csHelpers import getCsFileInfo
    from cityscapesscripts.helpers.labels import id2label

    checkpoint = _checkpoint(tmp_path, classes=CITYSCAPES)
    inputs = tmp_path / "leftImg8bit" / "test" / "berlin"
    _write_images(inputs, {"berlin_000123_000019_leftImg8bit.png": (24, 48)})
    out = tmp_path / "results"
    predict_path(checkpoint, inputs.parent, out, fmt="cityscapes", device="cpu", progress=False)
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["berlin_000123_000019_leftImg8bit.png"]
    assert sorted(p.name for p in out.rglob("*")) == written  # nothing else: no overlays to confuse the server
    # The server (cityscapesscripts' getPrediction) matches <city>_<seq>_<frame>*.png per GT file.
    gt = getCsFileInfo("berlin_000123_000019_gtFine_labelIds.png")
    assert fnmatch.fnmatch(written[0], f"{gt.city}_{gt.sequenceNb}_{gt.frameNb}*.png")
    label_ids = read_label_png(out / written[0])
    image = np.asarray(Image.open(inputs / "berlin_000123_000019_leftImg8bit.png"))
    expected_train = _expected_train_ids(checkpoint, image, (32, 64))  # 24x48 fitted into 32x64
    # Every pixel maps back to its train id through the official table, and only evaluated ids occur.
    back = np.vectorize(lambda v: id2label[int(v)].trainId)(label_ids)
    np.testing.assert_array_equal(back, expected_train)
    assert all(not id2label[int(v)].ignoreInEval for v in np.unique(label_ids))


def test_train_id_to_label_id_table():
    # Hand-checked against the Cityscapes label table: road 7, sidewalk 8, building 11, sky 23,
    # person 24, car 26, bicycle 33; an ignore pixel becomes 0 (unlabeled).
    train = np.array([[0, 1, 2, 10], [11, 13, 18, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(train_ids_to_cityscapes_ids(train), [[7, 8, 11, 23], [24, 26, 33, 0]])


def test_cityscapes_submission_scored_by_the_official_evaluator(tmp_path, cityscapes_sample_root):
    """Our label-id file, found and scored by cityscapesscripts, gives the IoUs carbseg computes in train ids."""
    sys_argv = sys.argv
    sys.argv = ["evalPixelLevelSemanticLabeling"]
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    finally:
        sys.argv = sys_argv
    from carbseg.data.datasets import build_dataset
    from carbseg.engine.evaluate import evaluate_predictions

    checkpoint = _checkpoint(tmp_path, classes=CITYSCAPES)
    image_dir = cityscapes_sample_root / "leftImg8bit" / "val"
    predict_path(checkpoint, image_dir, tmp_path / "server", fmt="cityscapes", device="cpu", progress=False)
    predict_path(checkpoint, image_dir, tmp_path / "train_ids", device="cpu", progress=False)

    gt_file = str(next((cityscapes_sample_root / "gtFine" / "val").rglob("*_gtFine_labelIds.png")))
    args = copy.copy(official.args)
    args.predictionPath, args.predictionWalk = str(tmp_path / "server"), None
    args.quiet, args.JSONOutput, args.evalInstLevelScore = True, False, False
    pred_file = official.getPrediction(args, gt_file)
    assert os.path.basename(pred_file) == "frankfurt_000000_000294_leftImg8bit.png"
    result = official.evaluateImgLists([pred_file], [gt_file], args)

    dataset = build_dataset("cityscapes", cityscapes_sample_root, "val")
    confusion, _ = evaluate_predictions(dataset, tmp_path / "train_ids", progress=False, workers=1)
    ours = confusion.iou()
    for train_id, name in enumerate(CITYSCAPES.names):
        theirs = result["classScores"][name]
        if np.isnan(ours[train_id]):
            assert np.isnan(theirs), name
        else:
            assert theirs == pytest.approx(ours[train_id], abs=1e-9), name
    assert np.isfinite(ours).sum() >= 2


def test_cityscapes_format_refuses_other_file_names(tmp_path):
    checkpoint = _checkpoint(tmp_path, classes=CITYSCAPES)
    _write_images(tmp_path / "in", {"holiday.png": (16, 16)})
    with pytest.raises(UserError, match=r"holiday\.png: --format cityscapes needs Cityscapes file names"):
        predict_path(checkpoint, tmp_path / "in", tmp_path / "out", fmt="cityscapes", device="cpu", progress=False)


def test_gif_video_gives_an_overlay_animation(tmp_path):
    checkpoint = _checkpoint(tmp_path)
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in range(3)]
    video = tmp_path / "clip.gif"
    frames[0].save(video, save_all=True, append_images=frames[1:], duration=80, loop=0)
    summary = predict_path(checkpoint, video, tmp_path / "out", device="cpu", progress=False)
    assert summary.written == 1
    with Image.open(tmp_path / "out" / "overlay" / "clip.gif") as result:
        # every frame: the overlay, then a legend of all classes (one size for all frames) beside it
        key = legend(read_model_metadata(checkpoint)[1], max_height=20)
        assert result.n_frames == 3 and result.size == (30 + 4 + key.shape[1], max(20, key.shape[0]))
        assert result.info["duration"] == 80
    assert predict_path(checkpoint, video, tmp_path / "out", device="cpu", progress=False).skipped == 1


def test_mp4_video_gives_an_overlay_video(tmp_path):
    av = pytest.importorskip("av", reason="PyAV (optional video extra) not installed")
    checkpoint = _checkpoint(tmp_path)
    video = tmp_path / "drive.mp4"
    rng = np.random.default_rng(2)
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for _ in range(4):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    predict_path(checkpoint, video, tmp_path / "out", device="cpu", progress=False)
    with av.open(str(tmp_path / "out" / "overlay" / "drive.mp4")) as result:
        decoded = [f.to_ndarray(format="rgb24") for f in result.decode(video=0)]
    key = legend(read_model_metadata(checkpoint)[1], max_height=24)
    width, height = 32 + 4 + key.shape[1], max(24, key.shape[0])
    assert len(decoded) == 4 and decoded[0].shape == (height + height % 2, width + width % 2, 3)


def test_cli_predict_and_its_errors(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path)
    _write_images(tmp_path / "in", {"x.png": (16, 24)})
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "in" / "x.png"),
                 "--out", str(out), "--mode", "slide", "--device", "cpu"]) == 0
    assert read_label_png(out / "x.png").shape == (16, 24)
    capsys.readouterr()

    pickle_file = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pickle_file)
    assert main(["predict", "--checkpoint", str(pickle_file), "--input", str(tmp_path / "in"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.pt" in err and "pickle" in err and len(err.splitlines()) == 1

    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "nothing"),
                 "--out", str(out)]) == 2
    assert "input not found" in capsys.readouterr().err


def test_python_m_carbseg_predict_subprocess(tmp_path):
    checkpoint = _checkpoint(tmp_path)
    _write_images(tmp_path / "in", {"y.png": (16, 16)})
    done = subprocess.run(
        [sys.executable, "-m", "carbseg", "predict", "--checkpoint", str(checkpoint), "--input",
         str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "1 written" in done.stdout
    assert (tmp_path / "out" / "y.png").is_file() and (tmp_path / "out" / "overlay" / "y.png").is_file()


def test_video_without_pyav_is_a_clear_user_error(tmp_path, monkeypatch):
    checkpoint = _checkpoint(tmp_path)
    video = tmp_path / "drive.mp4"
    video.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail as if it were not installed
    with pytest.raises(UserError, match="videos needs PyAV: pip install av"):
        predict_path(checkpoint, video, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out" / "overlay" / "drive.mp4").exists()
