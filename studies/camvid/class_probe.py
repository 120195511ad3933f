"""Is a class a trained model misses *outvoted* or *not represented*? (the thin classes of the schedule search)

A class at 0 IoU can mean two different things. Either the model's features do tell it apart and its
logit merely loses to a frequent neighbour (a calibration matter: more iterations or a class-balanced
loss would lift it), or the features do not carry it at all (a resolution or capacity matter). This
probe predicts the val split with a trained model, at the model's own evaluation protocol, and reports
for each probed class, on its ground-truth pixels:

- how often the class is the model's first and among its first two choices,
- its IoU when a constant offset is added to its logit only, for a range of offsets. The best of
  these is an *oracle chosen on the split it is scored on*: an upper bound of what re-calibrating that
  one class could give, never a result,
- which classes take its pixels (the ground-truth row of the confusion matrix, largest first).

    python studies/camvid/class_probe.py --root ../shared/data/camvid \\
        --checkpoint runs/study_proxy/runs/gt_upper_bound_seed0/model.safetensors --classes pole,signsymbol
    # a run that is stopped or still training: its latest training state (checkpoint_last.pt)
    python studies/camvid/class_probe.py --root ../shared/data/camvid --run runs/study_proxy/runs/gt_r200_seed0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from carbseg.data.classes import IGNORE_INDEX
from carbseg.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_study import print_json_report  # noqa: E402 -- the study runner next to this file

DEFAULT_OFFSETS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)


class ClassProbeCounts:
    """Pixel counts for one class ``cls`` over many images, from (C, H, W) logits and an (H, W) mask."""

    def __init__(self, num_classes: int, cls: int, offsets=DEFAULT_OFFSETS):
        self.num_classes, self.cls, self.offsets = num_classes, cls, tuple(float(o) for o in offsets)
        self.pixels = 0                                  # ground-truth pixels of the class
        self.top1 = 0                                    # ... where it is the model's first choice
        self.top2 = 0                                    # ... where it is among the first two
        self.intersection = np.zeros(len(self.offsets), dtype=np.int64)  # per offset
        self.union = np.zeros(len(self.offsets), dtype=np.int64)
        self.taken_by = np.zeros(num_classes, dtype=np.int64)  # its pixels' predicted class (offset 0)

    def update(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        if logits.dim() != 3 or logits.shape[0] != self.num_classes or logits.shape[1:] != mask.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not match {self.num_classes} classes and a mask of "
                             f"{tuple(mask.shape)}")
        valid = mask != IGNORE_INDEX
        mine = valid & (mask == self.cls)
        self.pixels += int(mine.sum())
        ranked = logits.topk(min(2, self.num_classes), dim=0).indices
        self.top1 += int((mine & (ranked[0] == self.cls)).sum())
        self.top2 += int((mine & (ranked == self.cls).any(dim=0)).sum())
        self.taken_by += np.bincount(ranked[0][mine].numpy(), minlength=self.num_classes)
        # The class wins a pixel under offset o when its logit + o beats every other class's logit.
        others = logits.clone()
        others[self.cls] = -torch.inf
        margin = logits[self.cls] - others.amax(dim=0)
        for k, offset in enumerate(self.offsets):
            predicted = valid & (margin + offset > 0)
            self.intersection[k] += int((predicted & mine).sum())
            self.union[k] += int((predicted | mine).sum())

    def report(self, names: list[str]) -> dict:
        def pct(num, den):
            return float(100 * num / den) if den else None

        iou = {f"{o:g}": pct(i, u) for o, i, u in zip(self.offsets, self.intersection, self.union)}
        best = max(iou, key=lambda k: -1 if iou[k] is None else iou[k])
        order = np.argsort(-self.taken_by, kind="stable")
        return {
            "pixels": self.pixels,
            "first_choice": pct(self.top1, self.pixels),
            "in_first_two": pct(self.top2, self.pixels),
            "iou_by_offset": iou,
            "oracle_offset": float(best),
            "oracle_iou": iou[best],
            "taken_by": {names[k]: pct(self.taken_by[k], self.pixels) for k in order if self.taken_by[k] > 0},
        }


def load_run_model(run_dir: str | Path, classes):
    """The model of a run's latest training state: ``checkpoint_last.pt`` with the run's ``config.yaml``."""
    from carbseg.config import load_saved_config
    from carbseg.engine.checkpoint import LoadedModel, load_training_state
    from carbseg.engine.run_dir import CHECKPOINT_FILE, CONFIG_FILE
    from carbseg.models.segmenter import build_segmenter

    run_dir = Path(run_dir)
    config_path, state_path = run_dir / CONFIG_FILE, run_dir / CHECKPOINT_FILE
    if not config_path.is_file():
        raise UserError(f"{config_path}: not found; --run takes a folder written by carbseg train --out")
    cfg = load_saved_config(config_path)
    state = load_training_state(state_path)
    model = build_segmenter(cfg.model, classes.num_classes, load_pretrained=False)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as err:
        raise UserError(f"{state_path}: its weights do not match the model of {config_path} "
                        f"({str(err).splitlines()[0]}); the folder mixes two runs") from None
    return LoadedModel(model=model.eval(), config=cfg, classes=classes), int(state["iteration"])


def check_classes(dataset, class_names: list[str]) -> list[str]:
    """The dataset's class names, after checking that every probed class is one of them."""
    names = list(dataset.classes.names)
    unknown = [c for c in class_names if c not in names]
    if unknown:
        raise UserError(f"--classes {','.join(unknown)}: not classes of {dataset.classes.name} ({', '.join(names)})")
    return names


def probe(dataset, loaded, class_names: list[str], offsets=DEFAULT_OFFSETS, max_images: int | None = None,
          progress: bool = True) -> dict:
    from tqdm import tqdm

    from carbseg.engine.inference import images_to_tensor, predict

    names = check_classes(dataset, class_names)
    eval_cfg = loaded.config.eval
    counts = {c: ClassProbeCounts(len(names), names.index(c), offsets) for c in class_names}
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    with torch.inference_mode():
        for index in tqdm(range(count), desc="probe", unit="img", disable=not progress, leave=False):
            sample = dataset[index]
            logits = predict(loaded.model, images_to_tensor([sample.image]), mode=eval_cfg.mode,
                             crop_hw=eval_cfg.crop_size, stride_hw=eval_cfg.stride, num_classes=len(names),
                             scales=eval_cfg.scales, flip=eval_cfg.flip)[0]
            mask = torch.as_tensor(sample.mask.astype(np.int64))
            for c in counts.values():
                c.update(logits, mask)
    return {"images": count, "eval": {"mode": eval_cfg.mode, "scales": list(eval_cfg.scales), "flip": eval_cfg.flip},
            "classes": {c: counts[c].report(names) for c in class_names}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/camvid")
    parser.add_argument("--dataset", default="camvid", help="the dataset layout and class set (default: camvid)")
    parser.add_argument("--split", default="val")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a model.safetensors written by carbseg train")
    source.add_argument("--run", help="a run folder: its latest training state (checkpoint_last.pt)")
    parser.add_argument("--classes", default="pole,signsymbol,pedestrian,bicyclist")
    parser.add_argument("--offsets", default=",".join(f"{o:g}" for o in DEFAULT_OFFSETS))
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from carbseg.data.datasets import build_dataset
    from carbseg.engine.checkpoint import load_model

    try:
        dataset = build_dataset(args.dataset, args.root, args.split)
        check_classes(dataset, args.classes.split(","))
        if args.checkpoint:
            loaded, iteration = load_model(args.checkpoint), None
        else:
            loaded, iteration = load_run_model(args.run, dataset.classes)
        offsets = [float(o) for o in args.offsets.split(",")]
        result = probe(dataset, loaded, args.classes.split(","), offsets, args.max_images,
                       progress=not args.no_progress)
    except UserError as err:
        print(f"class_probe: {err}", file=sys.stderr)
        return 2
    from carbseg.engine.run_dir import CHECKPOINT_FILE

    where = Path(args.checkpoint) if args.checkpoint else Path(args.run) / CHECKPOINT_FILE
    result["model"] = {"source": f"{where.parent.name}/{where.name}", "iteration": iteration, "split": args.split}
    return print_json_report(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
