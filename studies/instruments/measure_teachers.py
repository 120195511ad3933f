"""Measure the research instruments that stand in for CLIP (docs/teacher.md, "Instruments" table).

For each teacher on a CamVid split: pseudo-mask mIoU at native scale and on views zoomed 2x (the
teacher labels the upscaled frame; its labels are brought back to the frame, nearest), the mean of
the four small classes (pole, signsymbol, pedestrian, bicyclist) and of the seven large ones, the
error persistence in a flipped view and in a view shifted by half a 16-px cell
(``carbseg.teacher.persistence``), and the cost per image. The proxy teacher's fit images are left
out. Teachers measured:

- ``proxy``: the proxy teacher of ``--proxy-weights``;
- ``simulated``: the simulated teacher (persistent noise, frame-keyed);
- ``simulated_per_view``: the same with the previous release's per-view noise (loaded from git
  ``--before-commit``), for the before/after rows. Omit it with ``--no-before``.

    python studies/instruments/measure_teachers.py --root ../shared/data/camvid --split val \
        --proxy-weights runs/proxy_camvid.safetensors --out docs/instruments
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from carbseg.data.base import WithoutIds
from carbseg.data.datasets import build_dataset
from carbseg.data.frames import FrameMaps
from carbseg.metrics import ConfusionMatrix
from carbseg.teacher.persistence import PersistenceCount, error_persistence
from carbseg.teacher.proxy import load_proxy_teacher, read_fit_ids
from carbseg.teacher.simulated import SimulatedTeacher

SMALL = ("pole", "signsymbol", "pedestrian", "bicyclist")


class _PerViewNoise:
    """The previous release's simulated teacher (noise seeded per view); ``frames`` is dropped."""

    reads_ground_truth = True

    def __init__(self, commit: str, classes, patch_size: int, noise: float):
        source = subprocess.run(["git", "show", f"{commit}:src/carbseg/teacher/simulated.py"], check=True,
                                capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2]).stdout
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location("simulated_before", f.name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.inner = module.SimulatedTeacher(classes, patch_size=patch_size, noise=noise)
        self.num_classes = classes.num_classes

    def __call__(self, images, image_labels, gt=None, valid=None, frames=None):
        return self.inner(images, image_labels, gt=gt, valid=valid)


def zoomed_labels(teacher, image, gt, labels, image_id, zoom: float) -> torch.Tensor:
    """The teacher's labels of the frame upscaled by ``zoom``, brought back to the frame (nearest)."""
    h, w = image.shape[-2:]
    size = (round(h * zoom), round(w * zoom))
    big = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)
    big_gt = F.interpolate(gt[None, None].float(), size=size, mode="nearest-exact")[0].long()
    frames = FrameMaps.whole_frames([image_id]).zoomed(0, 0, (h, w), size)
    out = teacher(big, labels[None], gt=big_gt if teacher.reads_ground_truth else None, frames=frames)
    return F.interpolate(out[None].float(), size=(h, w), mode="nearest-exact")[0, 0].long()


def measure(name: str, teacher, dataset, max_images: int | None) -> dict:
    names = dataset.classes.names
    native, zoom2 = ConfusionMatrix(len(names)), ConfusionMatrix(len(names))
    persistence = {"flip": PersistenceCount(), "shift": PersistenceCount()}
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    seconds = 0.0
    for index in range(count):
        sample = dataset[index]
        image = torch.from_numpy(sample.image).permute(2, 0, 1).float()
        gt = torch.from_numpy(sample.mask).long()
        present = gt.unique()
        labels = torch.zeros(len(names), dtype=torch.bool)
        labels[present[present < len(names)]] = True
        frames = FrameMaps.whole_frames([sample.id])
        started = time.perf_counter()
        mask = teacher(image[None], labels[None], gt=gt[None] if teacher.reads_ground_truth else None,
                       frames=frames)[0]
        seconds += time.perf_counter() - started
        native.update(mask, gt)
        zoom2.update(zoomed_labels(teacher, image, gt, labels, sample.id, 2.0), gt)
        for view in persistence:
            persistence[view] = persistence[view].add(error_persistence(teacher, image, gt, labels, sample.id, view))
    row = {"teacher": name, "images": count, "seconds_per_image": seconds / max(count, 1)}
    for tag, matrix in (("native", native), ("zoom2", zoom2)):
        report = matrix.report(names)
        iou = report["iou"]
        row[f"{tag}_miou"] = report["miou"]
        row[f"{tag}_small"] = sum(iou[c] or 0.0 for c in SMALL) / len(SMALL)
        large = [c for c in names if c not in SMALL]
        row[f"{tag}_large"] = sum(iou[c] or 0.0 for c in large) / len(large)
        row[f"{tag}_iou"] = iou
    for view, counted in persistence.items():
        row[f"persistence_{view}"] = counted.share
    return row


def markdown(rows: list[dict], split: str) -> str:
    lines = [
        f"| teacher (CamVid {split}) | images | mIoU native | small / large | mIoU zoom 2x | small / large (2x) "
        "| errors repeated: flip | shift 8 px | s / image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['teacher']} | {r['images']} | {r['native_miou']:.1f} | {r['native_small']:.1f} / "
            f"{r['native_large']:.1f} | {r['zoom2_miou']:.1f} | {r['zoom2_small']:.1f} / {r['zoom2_large']:.1f} "
            f"| {r['persistence_flip']:.1f}% | {r['persistence_shift']:.1f}% | {r['seconds_per_image']:.3f} |")
    return "\n".join(lines) + "\n"


def calibration(dataset, patch_size: int, levels: list[float]) -> str:
    """Per-class IoU of the simulated teacher's masks at several noise levels (whole frames)."""
    names = dataset.classes.names
    lines = ["| noise | mIoU | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for noise in levels:
        teacher = SimulatedTeacher(dataset.classes, patch_size=patch_size, noise=noise)
        matrix = ConfusionMatrix(len(names))
        for index in range(len(dataset)):
            sample = dataset[index]
            gt = torch.from_numpy(sample.mask).long()
            present = gt.unique()
            labels = torch.zeros(1, len(names), dtype=torch.bool)
            labels[0, present[present < len(names)]] = True
            mask = teacher(torch.zeros(1, 3, *gt.shape), labels, gt=gt[None],
                           frames=FrameMaps.whole_frames([sample.id]))[0]
            matrix.update(mask, gt)
        report = matrix.report(names)
        lines.append(f"| {noise:g} | {report['miou']:.1f} | "
                     + " | ".join(f"{(report['iou'][c] or 0):.0f}" for c in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="CamVid root (train/, val/, ...annot/)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--proxy-weights", help="proxy teacher file (carbseg fit-proxy-teacher); omit to skip it")
    parser.add_argument("--patch-size", type=int, default=16, help="simulated teacher grid (default 16)")
    parser.add_argument("--noise", type=float, default=0.3, help="simulated teacher noise (default 0.3)")
    parser.add_argument("--before-commit", default="30166c2", help="commit with the per-view simulated noise")
    parser.add_argument("--no-before", action="store_true", help="skip the per-view (before) simulated teacher")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibrate", default=None, metavar="N[,N...]",
                        help="instead: per-class IoU of the simulated teacher at these noise levels")
    parser.add_argument("--out", required=True, help="folder for teachers.md and teachers.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dataset = build_dataset("camvid", args.root, args.split)
    if args.calibrate:
        table = calibration(dataset, args.patch_size, [float(v) for v in args.calibrate.split(",")])
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "calibration.md").write_text(table)
        sys.stdout.write(table)
        return 0
    rows = []
    if args.proxy_weights:
        proxy = load_proxy_teacher(args.proxy_weights, dataset.classes)
        rows.append(measure("proxy", proxy, WithoutIds(dataset, read_fit_ids(args.proxy_weights)), args.max_images))
    simulated = SimulatedTeacher(dataset.classes, patch_size=args.patch_size, noise=args.noise)
    rows.append(measure(f"simulated {args.patch_size} px / {args.noise}", simulated, dataset, args.max_images))
    if not args.no_before:
        before = _PerViewNoise(args.before_commit, dataset.classes, args.patch_size, args.noise)
        rows.append(measure(f"simulated, per-view noise (before, {args.before_commit})", before, dataset,
                            args.max_images))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "teachers.json").write_text(json.dumps(rows, indent=1))
    (out / "teachers.md").write_text(markdown(rows, args.split))
    sys.stdout.write(markdown(rows, args.split))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
