"""Diagnostics of the CamVid study: how good are the labels GLV and CARB actually work with?

1. Teacher labels *in the training geometry* (no model): the simulated teacher's global-view labels
   and its GLV local-patch labels (zoomed by s, resized back), both scored against the ground truth
   of the patch window, for the first ``--batches`` training batches of the study's base config.
2. With ``--checkpoint``: the CARB split of a trained model on the same views -- the share of
   consistent pixels (teacher == restricted argmax of the model) and the teacher's accuracy inside
   the consistent and the inconsistent region. CARB only helps when the inconsistent region holds
   the teacher's errors.

The simulated teacher READS GROUND TRUTH: a research instrument, not weak supervision.

    python studies/camvid/diagnose.py --root ../shared/data/camvid --batches 40 --json runs/diag.json \
        [--checkpoint runs/study_camvid/runs/glv_carb_seed0/model.safetensors]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from carbseg.config import load_config
from carbseg.data.classes import IGNORE_INDEX
from carbseg.metrics import ConfusionMatrix, iou_from_counts

STUDY_DIR = Path(__file__).resolve().parent


def _iou_report(confusion: ConfusionMatrix, names: list[str]) -> dict:
    iou = iou_from_counts(confusion.matrix, confusion.missed) * 100
    return {"miou": float(np.nanmean(iou)), "iou": {n: float(v) for n, v in zip(names, iou)}}


def diagnose(root: str, batches: int, checkpoint: str | None, seed: int = 0) -> dict:
    from carbseg.data.datasets import build_dataset
    from carbseg.data.labels import compute_image_labels, labels_to_multi_hot
    from carbseg.data.transforms import TrainAugmentation
    from carbseg.data.views import cut_out
    from carbseg.engine.seeds import derive_seed
    from carbseg.engine.step import batch_to_device, segmenter_logits, teacher_views
    from carbseg.engine.train_data import BatchKey, TrainingSamples, collate
    from carbseg.losses.carb import region_masks, restricted_argmax
    from carbseg.teacher.build import build_teacher

    cfg = load_config(STUDY_DIR / "base.yaml", [f"data.root={root}", f"seed={seed}"])
    dataset = build_dataset("camvid", root, "train")
    names = list(dataset.classes.names)
    num_classes = dataset.classes.num_classes
    labels = compute_image_labels(dataset)
    multi_hot = labels_to_multi_hot([labels[i] for i in dataset.ids], num_classes).numpy()
    samples = TrainingSamples(dataset, multi_hot, TrainAugmentation(cfg.data), seed=seed,
                              batch_size=cfg.data.batch_size, read_gt=True)
    teacher = build_teacher(cfg.teacher, dataset.classes, torch.device("cpu"), seed=seed)
    model = None
    if checkpoint:
        from carbseg.engine.checkpoint import load_model

        model = load_model(checkpoint, device="cpu").model.eval()

    conf = {k: ConfusionMatrix(num_classes) for k in ("global_view", "global_in_patch", "glv_patch",
                                                      "glv_patch_s_below_1", "glv_patch_s_from_1")}
    split = {"consistent": 0, "inconsistent": 0, "teacher_right_consistent": 0, "teacher_right_inconsistent": 0}
    for iteration in range(batches):
        # The trainer's own batch, generator and teacher views (iteration, micro-step 0, rank 0).
        batch = batch_to_device(collate([samples[BatchKey(iteration, 0, slot)] for slot in range(cfg.data.batch_size)]),
                                torch.device("cpu"))
        generator = torch.Generator().manual_seed(derive_seed(seed, iteration, 0, 0, 1))
        global_labels, patch, patch_labels = teacher_views(teacher, batch, cfg, generator, single_path=False)
        gt = batch["masks"].masked_fill(~batch["valid"], IGNORE_INDEX)
        gt_patch = cut_out(gt, patch)
        conf["global_view"].update(global_labels.numpy(), gt.numpy())
        conf["global_in_patch"].update(cut_out(global_labels, patch).numpy(), gt_patch.numpy())
        conf["glv_patch"].update(patch_labels.numpy(), gt_patch.numpy())
        conf["glv_patch_s_below_1" if patch.scale < 1 else "glv_patch_s_from_1"].update(
            patch_labels.numpy(), gt_patch.numpy())
        if model is not None:
            with torch.inference_mode():
                logits, _ = segmenter_logits(model, batch["images"], None)
            # CARB's own split (teacher vs restricted self-prediction), scored where GT exists.
            consistent, inconsistent = region_masks(global_labels, restricted_argmax(logits, batch["image_labels"]))
            consistent, inconsistent = consistent & (gt != IGNORE_INDEX), inconsistent & (gt != IGNORE_INDEX)
            right = global_labels == gt
            split["consistent"] += int(consistent.sum())
            split["inconsistent"] += int(inconsistent.sum())
            split["teacher_right_consistent"] += int((right & consistent).sum())
            split["teacher_right_inconsistent"] += int((right & inconsistent).sum())
    result = {name: _iou_report(c, names) for name, c in conf.items()}
    if model is not None:
        total = split["consistent"] + split["inconsistent"]
        wrong = total - split["teacher_right_consistent"] - split["teacher_right_inconsistent"]
        result["carb_split"] = {
            "consistent_share": split["consistent"] / total,
            "teacher_accuracy_consistent": split["teacher_right_consistent"] / max(split["consistent"], 1),
            "teacher_accuracy_inconsistent": split["teacher_right_inconsistent"] / max(split["inconsistent"], 1),
            "teacher_errors_in_inconsistent": (split["inconsistent"] - split["teacher_right_inconsistent"])
            / max(wrong, 1),
            "checkpoint": Path(checkpoint).parent.name,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/camvid")
    parser.add_argument("--batches", type=int, default=40, help="training batches (of the base config) to look at")
    parser.add_argument("--checkpoint", default=None, help="a trained model.safetensors: CARB split statistics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = diagnose(args.root, args.batches, args.checkpoint, args.seed)
    text = json.dumps(result, indent=1)
    if args.json:
        from carbseg.io import write_text_atomic

        write_text_atomic(args.json, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
