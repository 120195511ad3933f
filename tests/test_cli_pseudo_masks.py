"""`carbseg pseudo-masks` through the real entry point: outputs, resume, atomicity, sharding, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from carbseg.cli import main
from carbseg.data.classes import CAMVID
from carbseg.data.datasets import build_dataset
from carbseg.distributed import shard
from carbseg.teacher.generate import generate_pseudo_masks
from carbseg.teacher.simulated import SimulatedTeacher
from carbseg.teacher.tiny import TINY_VIT_CONFIG, write_tiny_config

NAMES = ["road", "building", "sky"]


@pytest.fixture
def folder_data(tmp_path):
    """A folder dataset of 5 small images with masks, its labels JSON, a tiny CLIP config and weights."""
    root = tmp_path / "data"
    (root / "images" / "val").mkdir(parents=True)
    (root / "masks" / "val").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = {}
    for k in range(5):
        image_id = f"img{k}"
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "images" / "val" / f"{image_id}.png")
        mask = np.zeros((40, 56), np.uint8)
        mask[:15] = 2
        mask[15:25, : 10 + 8 * k] = 1
        Image.fromarray(mask).save(root / "masks" / "val" / f"{image_id}.png")
        labels[image_id] = [0, 1, 2] if k != 3 else [0, 2]  # image 3: building "absent" by its labels
    (tmp_path / "classes.json").write_text(json.dumps({"names": NAMES}))
    (tmp_path / "labels.json").write_text(json.dumps({"dataset": "folder", "classes": NAMES, "labels": labels}))
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_VIT_CONFIG)
    torch.save({k: v for k, v in model.state_dict().items()}, tmp_path / "tiny.bin")
    write_tiny_config(tmp_path / "tiny.json")
    return tmp_path, labels


def _args(tmp, out, *extra):
    return ["pseudo-masks", "--dataset", "folder", "--root", str(tmp / "data"), "--split", "val",
            "--classes", str(tmp / "classes.json"), "--labels", str(tmp / "labels.json"), "--out", str(out),
            "--workers", "0", "--no-progress", *extra]


def test_clip_teacher_writes_one_png_per_id_resumes_and_is_deterministic(folder_data, capsys):
    tmp, labels = folder_data
    out = tmp / "masks"
    clip = ["--clip-model", str(tmp / "tiny.json"), "--clip-pretrained", str(tmp / "tiny.bin"),
            "--cache-dir", str(tmp / "cache"), "--batch-size", "2"]
    assert main(_args(tmp, out, *clip)) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"img{k}.png" for k in range(5)]
    first = {k: np.asarray(Image.open(out / f"img{k}.png")) for k in range(5)}
    for k, mask in first.items():
        assert mask.shape == (40, 56) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= set(labels[f"img{k}"])  # only the image's classes
    assert "wrote 5, skipped 0" in capsys.readouterr().out
    # Resume: finished files are skipped (untouched), the missing one is redone identically.
    before = {k: (out / f"img{k}.png").stat().st_mtime_ns for k in range(5)}
    (out / "img2.png").unlink()
    assert main(_args(tmp, out, *clip)) == 0
    assert "wrote 1, skipped 4" in capsys.readouterr().out
    assert all((out / f"img{k}.png").stat().st_mtime_ns == before[k] for k in (0, 1, 3, 4))
    assert np.array_equal(np.asarray(Image.open(out / "img2.png")), first[2])


def test_a_killed_run_leaves_only_complete_files(folder_data):
    tmp, labels = folder_data
    dataset = build_dataset("folder", tmp / "data", "val", classes_file=tmp / "classes.json")
    simulated = SimulatedTeacher(dataset.classes, noise=0.0)
    calls = []

    def dying_teacher(images, image_labels, gt=None, valid=None, frames=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while working on the third image
        return simulated(images, image_labels, gt=gt, valid=valid, frames=frames)

    dying_teacher.reads_ground_truth, dying_teacher.num_classes = True, 3
    out = tmp / "killed"
    with pytest.raises(KeyboardInterrupt):
        generate_pseudo_masks(dataset, labels, dying_teacher, out, batch_size=1, progress=False)
    assert sorted(os.listdir(out)) == ["img0.png", "img1.png"]  # no partial or temporary files
    report = generate_pseudo_masks(dataset, labels, simulated, out, batch_size=1, progress=False)
    assert (report.skipped, report.written) == (2, 3)


def test_two_shards_are_disjoint_and_cover_the_split(folder_data):
    tmp, labels = folder_data
    dataset = build_dataset("folder", tmp / "data", "val", classes_file=tmp / "classes.json")
    teacher = SimulatedTeacher(dataset.classes, noise=0.3)
    rank0, rank1 = shard(dataset.ids, 0, 2), shard(dataset.ids, 1, 2)
    assert not set(rank0) & set(rank1) and sorted(rank0 + rank1) == sorted(dataset.ids)
    out = tmp / "sharded"
    r0 = generate_pseudo_masks(dataset, labels, teacher, out, shard_rank=0, num_shards=2, progress=False)
    assert sorted(p.stem for p in out.iterdir()) == sorted(rank0)
    r1 = generate_pseudo_masks(dataset, labels, teacher, out, shard_rank=1, num_shards=2, progress=False)
    assert (r0.written, r1.written) == (len(rank0), len(rank1)) and r0.written + r1.written == 5
    # Same masks as one unsharded run (deterministic noise).
    single = tmp / "single"
    generate_pseudo_masks(dataset, labels, teacher, single, batch_size=3, progress=False)
    for image_id in dataset.ids:
        assert np.array_equal(np.asarray(Image.open(out / f"{image_id}.png")),
                              np.asarray(Image.open(single / f"{image_id}.png")))


def test_missing_weights_offline_exits_2_with_one_line_and_writes_nothing(folder_data):
    tmp, _ = folder_data
    out = tmp / "never"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-empty")}
    proc = subprocess.run([sys.executable, "-m", "carbseg", *_args(tmp, out, "--cache-dir", str(tmp / "empty"))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "ViT-B-16/openai" in lines[0] and "--clip-pretrained PATH" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.slow  # ~20 s on a shared CPU; tests/test_teacher_simulated.py checks the band on a subset by default
def test_simulated_teacher_on_real_camvid_val_lands_in_the_documented_band(camvid_root, tmp_path):
    labels = {}
    dataset = build_dataset("camvid", camvid_root, "val")
    conf = np.zeros((11, 11), np.int64)
    masks = {i: dataset.load_mask(k) for k, i in enumerate(dataset.ids)}
    for image_id, mask in masks.items():
        labels[image_id] = np.flatnonzero(np.bincount(mask[mask < 11], minlength=11)).tolist()
    (tmp_path / "labels.json").write_text(json.dumps({"dataset": "camvid", "classes": list(CAMVID.names),
                                                     "labels": labels}))
    out = tmp_path / "sim"
    code = main(["pseudo-masks", "--dataset", "camvid", "--root", str(camvid_root), "--split", "val",
                 "--labels", str(tmp_path / "labels.json"), "--out", str(out), "--teacher", "simulated",
                 "--workers", "0", "--batch-size", "8", "--no-progress"])
    assert code == 0 and len(list(out.glob("*.png"))) == len(dataset.ids)
    for image_id, gt in masks.items():
        pred = np.asarray(Image.open(out / f"{image_id}.png")).astype(np.int64)
        keep = (gt < 11) & (pred < 11)
        conf += np.bincount(gt[keep].astype(np.int64) * 11 + pred[keep], minlength=121).reshape(11, 11)
    iou = np.diag(conf) / np.maximum(conf.sum(0) + conf.sum(1) - np.diag(conf), 1)
    assert 40.0 <= 100 * iou.mean() <= 55.0  # docs/teacher.md: 46.5% at the defaults


def test_crf_without_the_extra_exits_2_before_writing(folder_data, capsys):
    if importlib.util.find_spec("pydensecrf2") or importlib.util.find_spec("pydensecrf"):
        pytest.skip("the [crf] extra is installed")
    tmp, _ = folder_data
    out = tmp / "crf"
    assert main(_args(tmp, out, "--teacher", "simulated", "--crf")) == 2
    assert "pip install -e '.[crf]' in the carbseg checkout" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # three interpreters importing torch and open_clip: ~1 min on a shared 2-core machine
def test_torchrun_shards_of_the_clip_teacher_equal_one_process(folder_data):
    # Two ranks under torchrun (gloo) each write their shard of the split; together they must give
    # exactly the masks of one process (the CLIP teacher is deterministic; the batch differs).
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    tmp, _ = folder_data
    clip = ["--clip-model", str(tmp / "tiny.json"), "--clip-pretrained", str(tmp / "tiny.bin"),
            "--cache-dir", str(tmp / "cache"), "--device", "cpu"]
    single = tmp / "single"
    assert main(_args(tmp, single, *clip, "--batch-size", "5")) == 0
    sharded = tmp / "sharded"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "carbseg", *_args(tmp, sharded, *clip, "--batch-size", "2")],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Each rank wrote only its own share (3 + 2 of the 5 images), not the whole split.
    import re
    assert sorted(int(n) for n in re.findall(r"wrote (\d+), skipped 0", proc.stdout)) == [2, 3], proc.stdout
    assert sorted(p.name for p in sharded.iterdir()) == [f"img{k}.png" for k in range(5)]
    for k in range(5):
        assert np.array_equal(np.asarray(Image.open(sharded / f"img{k}.png")),
                              np.asarray(Image.open(single / f"img{k}.png"))), f"img{k}"


# ---------------------------------------------------------------- teacher settings: KEY=VALUE as in train
def _teacher(*argv):
    from carbseg.cli import build_parser, teacher_config_from_args

    args = build_parser().parse_args(["pseudo-masks", "--dataset", "synthetic", "--root", "r", "--split", "val",
                                      "--labels", "l.json", "--out", "o", *argv])
    return teacher_config_from_args(args)


def test_teacher_settings_are_the_config_section_and_the_flags_are_its_aliases():
    from carbseg.config import TeacherConfig, load_config

    assert _teacher() == TeacherConfig() == load_config(None).teacher  # one set of defaults, the config's
    by_keys = _teacher("kind=proxy", "proxy_weights=p.safetensors", "teacher.clip_model=ViT-B-32", "dense=naclip",
                       "naclip_sigma=3", "text_templates=single", "scales=[0.75,1.5]", "key_smoothing=true",
                       "prompt_denoising=true", "confidence_threshold=0.4", "grid_cell=8", "noise=0.1",
                       "cache_dir=c", "clip_pretrained=none")
    by_flags = _teacher("--teacher", "proxy", "--proxy-weights", "p.safetensors", "--clip-model", "ViT-B-32",
                        "--dense", "naclip", "--naclip-sigma", "3", "--templates", "single", "--scales", "0.75,1.5",
                        "--key-smoothing", "--prompt-denoising", "--confidence-threshold", "0.4",
                        "--patch-size", "8", "--noise", "0.1", "--cache-dir", "c", "--clip-pretrained", "none")
    assert by_keys == by_flags == TeacherConfig(
        kind="proxy", proxy_weights="p.safetensors", clip_model="ViT-B-32", clip_pretrained="none", dense="naclip",
        naclip_sigma=3.0, text_templates="single", scales=[0.75, 1.5], key_smoothing=True, prompt_denoising=True,
        confidence_threshold=0.4, grid_cell=8, noise=0.1, cache_dir="c")
    assert _teacher("--grid-cell", "4").grid_cell == 4
    assert _teacher("--noise", "0.2", "noise=0.5").noise == 0.2  # a flag wins, as in carbseg train


def test_teacher_overrides_drive_the_masks_and_old_keys_are_refused(folder_data, capsys):
    tmp, _ = folder_data
    assert main(_args(tmp, tmp / "flags", "--teacher", "simulated", "--patch-size", "8", "--noise", "0.3")) == 0
    assert main(_args(tmp, tmp / "keys", "kind=simulated", "grid_cell=8", "teacher.noise=0.3")) == 0
    assert main(_args(tmp, tmp / "coarse", "kind=simulated", "grid_cell=32", "teacher.noise=0.3")) == 0
    for k in range(5):
        by_flags = np.asarray(Image.open(tmp / "flags" / f"img{k}.png"))
        assert np.array_equal(by_flags, np.asarray(Image.open(tmp / "keys" / f"img{k}.png")))
    assert any(not np.array_equal(np.asarray(Image.open(tmp / "flags" / f"img{k}.png")),
                                  np.asarray(Image.open(tmp / "coarse" / f"img{k}.png"))) for k in range(5))
    capsys.readouterr()
    assert main(_args(tmp, tmp / "old", "kind=simulated", "patch_size=8")) == 2
    assert capsys.readouterr().err == (
        "carbseg pseudo-masks: error: pseudo-masks teacher settings: teacher.patch_size was renamed "
        "teacher.grid_cell (same value, no order change); set teacher.grid_cell to 8 instead\n")
    assert main(_args(tmp, tmp / "bad", "kind=simulated", "train.lr=0.1")) == 2
    assert "only teacher settings apply here" in capsys.readouterr().err
    assert not (tmp / "old").exists() and not (tmp / "bad").exists()
