"""Diagnostics of the CamVid studies: how good are the labels GLV and CARB actually work with?

It replays a run's own training batches (the trainer's data stream, augmentation, GLV patch draws
and teacher, rebuilt from the study file for one variant and seed) and scores them against the
ground truth, which the trainer never shows a teacher that sees only pixels:

1. Teacher labels *in the training geometry* (no model): the global-view labels and the GLV
   local-patch labels (zoomed by s, resized back), both scored against the ground truth of the
   patch window, overall and by zoom (bins of 0.5): GLV can only help where the teacher labels the
   zoomed patch better than it labels the same window in the global view.
2. With ``--checkpoint`` (one or more trained models, e.g. the end of CARB's warm-up and the end of
   training): CARB's split on the same views, for the global view and for the GLV patch -- the share
   of consistent pixels (teacher == the model's label-restricted argmax), the teacher's precision
   inside the consistent and the inconsistent region, how many of the teacher's errors the
   inconsistent region holds, and per ground-truth class how many *correct* teacher labels fall in
   the inconsistent region (the supervision CARB scales down by c). CARB can only help when the
   inconsistent region holds the teacher's errors rather than its correct labels of what the model
   has not learned yet.
3. With ``--fixed-masks`` (the teacher's offline pseudo-masks of the training frames, the single
   path's labels): the same views labelled by those masks, augmented with the image as the single
   path does, scored as a third label source and split by each checkpoint as a second teacher
   ("global_fixed"): what differs between CARB on the online teacher and CARB on fixed masks; and
   the online labels scored against the fixed ones ("online_vs_fixed": how much the teacher's label
   of a pixel depends on the view rather than on the frame); per checkpoint, of the online teacher's
   correct labels in each region of its split, the share the fixed masks give too ("view_dependence").

Both teachers of the studies are research instruments (the simulated one reads the ground truth;
the proxy one is fitted on a few images' ground truth), not weak supervision.

    # the simulated-teacher study (study.yaml, base config)
    python studies/camvid/diagnose.py --root ../shared/data/camvid --batches 40 --json runs/diag.json
    # the proxy-teacher study: one variant's own batches, two checkpoints
    python studies/camvid/diagnose.py --study studies/camvid/proxy_study.yaml --work runs/study_proxy \\
        --root ../shared/data/camvid --variant proxy_glv_carb --seed 0 --batches 30 \\
        --checkpoint runs/study_proxy/runs/glv_warmup_seed0/model.safetensors \\
        --checkpoint runs/study_proxy/runs/proxy_glv_carb_seed0/model.safetensors --json runs/diag_carb.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from carbseg.config import load_config
from carbseg.data.classes import IGNORE_INDEX
from carbseg.errors import UserError
from carbseg.metrics import ConfusionMatrix, iou_from_counts

STUDY_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(STUDY_DIR))

from run_study import STUDY_FILE, Study, load_study, print_json_report  # noqa: E402 -- the study runner next to this file


def _iou_report(confusion: ConfusionMatrix, names: list[str]) -> dict:
    iou = iou_from_counts(confusion.matrix, confusion.missed) * 100
    return {"miou": float(np.nanmean(iou)), "iou": {n: float(v) for n, v in zip(names, iou)}}


def _count_by_class(cls: torch.Tensor, first: torch.Tensor, second: torch.Tensor, num_classes: int) -> np.ndarray:
    """Pixel counts [class, first (0/1), second (0/1)] of three aligned 1-d tensors."""
    flat = (cls.long() * 2 + first.long()) * 2 + second.long()
    return np.bincount(flat.numpy(), minlength=num_classes * 4).reshape(num_classes, 2, 2)


class SplitCounts:
    """CARB's region split of one view, counted against the ground truth, overall and per GT class."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        # [class, region (0 consistent, 1 inconsistent), teacher right (0/1)] pixel counts
        self.counts = np.zeros((num_classes, 2, 2), dtype=np.int64)

    def update(self, teacher: torch.Tensor, prediction: torch.Tensor, gt: torch.Tensor) -> None:
        from carbseg.losses.carb import region_masks

        consistent, inconsistent = region_masks(teacher, prediction)
        scored = (gt != IGNORE_INDEX) & (consistent | inconsistent)
        self.counts += _count_by_class(gt[scored], inconsistent[scored], teacher[scored] == gt[scored],
                                       self.num_classes)

    def report(self, names: list[str]) -> dict:
        c = self.counts
        total = c.sum()
        consistent, inconsistent = c[:, 0].sum(), c[:, 1].sum()
        right_cons, right_incons = c[:, 0, 1].sum(), c[:, 1, 1].sum()
        wrong = total - right_cons - right_incons

        def share(num, den):
            return float(num / den) if den else None

        per_class = {}
        for k, name in enumerate(names):
            pixels = c[k].sum()
            if pixels == 0:
                continue
            per_class[name] = {
                "pixels": int(pixels),
                "inconsistent_share": share(c[k, 1].sum(), pixels),
                "teacher_right": share(c[k, :, 1].sum(), pixels),
                # of the teacher's correct labels of this class, the share CARB scales down by c
                "right_labels_in_inconsistent": share(c[k, 1, 1], c[k, :, 1].sum()),
                # of the teacher's errors on this class, the share CARB scales down by c
                "errors_in_inconsistent": share(c[k, 1, 0], c[k, :, 0].sum()),
            }
        return {
            "pixels": int(total),
            "consistent_share": share(consistent, total),
            "teacher_precision_consistent": share(right_cons, consistent),
            "teacher_precision_inconsistent": share(right_incons, inconsistent),
            "teacher_errors_in_inconsistent": share(c[:, 1, 0].sum(), wrong),
            "right_labels_in_inconsistent": share(right_incons, right_cons + right_incons),
            "per_class": per_class,
        }


class ViewDependence:
    """Of the online teacher's *correct* labels in each region of CARB's split, how many the fixed
    masks (the same teacher's labels of the whole frame, augmented with the view) share: a correct label
    the fixed masks do not share is one the teacher gives in this view only."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        # [GT class, region (0 consistent, 1 inconsistent), fixed mask == online label (0/1)]
        self.counts = np.zeros((num_classes, 2, 2), dtype=np.int64)

    def update(self, online: torch.Tensor, fixed: torch.Tensor, prediction: torch.Tensor, gt: torch.Tensor) -> None:
        from carbseg.losses.carb import region_masks

        consistent, inconsistent = region_masks(online, prediction)
        right = (gt != IGNORE_INDEX) & (consistent | inconsistent) & (online == gt)
        self.counts += _count_by_class(gt[right], inconsistent[right], fixed[right] == online[right],
                                       self.num_classes)

    def report(self, names: list[str]) -> dict:
        def shared(c: np.ndarray) -> dict:
            # c: [region, fixed agrees]; None where the region holds no correct label
            return {region: (float(c[k, 1] / c[k].sum()) if c[k].sum() else None)
                    for k, region in enumerate(("consistent", "inconsistent"))}

        return {"right_labels_shared_by_fixed_masks": shared(self.counts.sum(0)),
                "per_class": {name: shared(self.counts[k]) for k, name in enumerate(names) if self.counts[k].sum()}}


def study_config(study_file: Path, root: str, work: str, variant: str | None, seed: int,
                 extra: list[str] | None = None):
    """The training config of ``variant`` at ``seed`` exactly as the study runner passes it to
    ``carbseg train`` (no variant: the base config with the study's common overrides), then ``extra``
    KEY=VALUE overrides (a what-if: e.g. another GLV patch size)."""
    study = load_study(study_file)
    runner = Study(root, work, [seed], [variant] if variant else None, dry_run=True, study=study)
    overrides = runner.overrides(variant, seed)
    return load_config(study["base"], [*overrides, *(extra or [])])


def diagnose(cfg, batches: int, checkpoints: list[str], progress: bool = False,
             fixed_masks: str | None = None) -> dict:
    from tqdm import tqdm

    from carbseg.data.views import cut_out
    from carbseg.engine.checkpoint import load_model
    from carbseg.engine.seeds import derive_seed
    from carbseg.engine.step import batch_to_device, segmenter_logits, teacher_views
    from carbseg.engine.train import build_training_inputs
    from carbseg.engine.train_data import BatchKey, TrainingSamples, collate
    from carbseg.losses.carb import restricted_argmax

    if cfg.data.pseudo_masks:
        raise UserError("this variant trains on fixed pseudo-masks (the single path): there is no online "
                        "teacher to diagnose; choose a dual-path variant (--variant) and "
                        "pass these masks with --fixed-masks to compare them on its views")
    device = torch.device("cpu")
    # fp32 teacher: what every study run used (the probe chose fp32 on its CPU); a bf16 teacher would
    # label a few pixels differently from the run being replayed.
    inputs = build_training_inputs(cfg, device, teacher_precision="fp32")
    samples, teacher = inputs.samples, inputs.teacher
    # A teacher that sees only pixels trains on all-ignore masks; the ground truth comes from a
    # second stream over the same keys (same seed, so the same views -- checked image by image).
    def same_keys(**source) -> TrainingSamples:
        return TrainingSamples(samples.dataset, samples.image_labels, samples.augmentation, seed=samples.seed,
                               batch_size=samples.batch_size, grad_accum=samples.grad_accum, **source)

    gt_samples = samples if samples.read_gt else same_keys(read_gt=True)
    # The single path's labels of the same keys: the offline masks, augmented jointly with the image.
    fixed_samples = same_keys(pseudo_masks=fixed_masks) if fixed_masks else None
    names = list(inputs.train_set.classes.names)
    num_classes = len(names)
    models = {path: load_model(path, device="cpu").model.eval() for path in checkpoints}

    conf = {k: ConfusionMatrix(num_classes) for k in ("global_view", "global_in_patch", "glv_patch")}
    if fixed_samples is not None:
        conf["fixed_masks"] = ConfusionMatrix(num_classes)
        # The online labels scored against the fixed ones: how much the teacher's label of a pixel
        # depends on the view (scale, flip, photometric distortion) rather than on the frame.
        conf["online_vs_fixed"] = ConfusionMatrix(num_classes)
    splits = {path: {view: SplitCounts(num_classes) for view in ("global", "patch", "global_fixed")}
              for path in models}
    view_dependence = {path: ViewDependence(num_classes) for path in models}
    for iteration in tqdm(range(batches), desc="batches", disable=not progress):
        # The trainer's own batch, generator and teacher views (iteration, micro-step 0, rank 0).
        keys = [BatchKey(iteration, 0, slot) for slot in range(samples.batch_size)]
        batch = batch_to_device(collate([samples[k] for k in keys]), device)
        gt_batch = batch if gt_samples is samples else batch_to_device(collate([gt_samples[k] for k in keys]), device)
        if not torch.equal(gt_batch["images"], batch["images"]):
            # data.cat_max_ratio < 1 redraws a crop by its mask, which is all-ignore for such a teacher.
            raise UserError("the ground-truth stream drew other views than the training stream: with "
                            f"data.cat_max_ratio = {cfg.data.cat_max_ratio} the crop depends on the mask; "
                            "these diagnostics need data.cat_max_ratio = 1 for a teacher that sees only pixels")
        # As the trainer: the global generators reseeded per iteration (a stochastic teacher draws
        # from them), the patch drawn from its own generator.
        torch.manual_seed(derive_seed(cfg.seed, iteration, 0, 0))
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, iteration, 0, 0, 1))
        with torch.inference_mode():
            global_labels, patch, patch_labels = teacher_views(teacher, batch, cfg, generator, single_path=False)
        gt = gt_batch["masks"].masked_fill(~gt_batch["valid"], IGNORE_INDEX)
        conf["global_view"].update(global_labels.numpy(), gt.numpy())
        fixed_labels = None
        if fixed_samples is not None:
            fixed_batch = collate([fixed_samples[k] for k in keys])
            if not torch.equal(fixed_batch["images"], batch["images"]):
                raise UserError("the fixed-mask stream drew other views than the training stream "
                                f"(data.cat_max_ratio = {cfg.data.cat_max_ratio}); these diagnostics need 1")
            fixed_labels = fixed_batch["masks"].masked_fill(~fixed_batch["valid"], IGNORE_INDEX)
            conf["fixed_masks"].update(fixed_labels.numpy(), gt.numpy())
            conf["online_vs_fixed"].update(global_labels.numpy(), fixed_labels.numpy())
        gt_patch = None
        if patch is not None:
            gt_patch, window_labels = cut_out(gt, patch), cut_out(global_labels, patch)
            conf["global_in_patch"].update(window_labels.numpy(), gt_patch.numpy())
            conf["glv_patch"].update(patch_labels.numpy(), gt_patch.numpy())
            # By zoom, in bins of 0.5: does a larger s give the teacher better or worse labels?
            low = np.floor(patch.scale * 2) / 2
            zoom_bin = f"s_{low:g}_{low + 0.5:g}"
            for key, labels in ((f"glv_patch_{zoom_bin}", patch_labels),
                                (f"global_in_patch_{zoom_bin}", window_labels)):
                conf.setdefault(key, ConfusionMatrix(num_classes)).update(labels.numpy(), gt_patch.numpy())
        for path, model in models.items():
            with torch.inference_mode():
                logits, patch_logits = segmenter_logits(model, batch["images"], patch)
            # CARB's own split (teacher vs restricted self-prediction), scored where GT exists.
            prediction = restricted_argmax(logits, batch["image_labels"])
            splits[path]["global"].update(global_labels, prediction, gt)
            if fixed_labels is not None:
                splits[path]["global_fixed"].update(fixed_labels, prediction, gt)
                view_dependence[path].update(global_labels, fixed_labels, prediction, gt)
            if patch is not None:
                splits[path]["patch"].update(patch_labels, restricted_argmax(patch_logits, batch["image_labels"]),
                                             gt_patch)
    result = {name: _iou_report(c, names) for name, c in conf.items() if c.matrix.sum() > 0}
    if "online_vs_fixed" in result:
        agreement = conf["online_vs_fixed"].matrix
        result["online_vs_fixed"]["pixel_agreement"] = float(np.trace(agreement) / agreement.sum())
    result["carb_split"] = {
        path: {view: s.report(names) for view, s in views.items() if s.counts.sum() > 0}
        for path, views in splits.items()
    }
    if fixed_samples is not None and models:
        result["view_dependence"] = {path: v.report(names) for path, v in view_dependence.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(STUDY_FILE), help="the study file (default: the simulated-teacher study)")
    parser.add_argument("--root", default="../shared/data/camvid")
    parser.add_argument("--work", default="runs/study_camvid", help="the study's work folder (proxy weights)")
    parser.add_argument("--variant", default=None, help="replay this variant's batches (default: the base config)")
    parser.add_argument("--batches", type=int, default=40, help="training batches to look at (iterations 0..N-1)")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a trained model.safetensors: CARB split statistics (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixed-masks", default=None, metavar="DIR",
                        help="the teacher's offline pseudo-masks of the training split (the single path's labels): "
                             "scored on the same views and split by each checkpoint as a second teacher")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override on top of the variant's (a what-if, e.g. glv.patch_size=[240,160])")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        cfg = study_config(Path(args.study), args.root, args.work, args.variant, args.seed, args.set)
        result = diagnose(cfg, args.batches, args.checkpoint, progress=not args.no_progress,
                          fixed_masks=args.fixed_masks)
    except UserError as err:
        print(f"diagnose: {err}", file=sys.stderr)
        return 2
    result["setup"] = {"study": Path(args.study).name, "variant": args.variant, "seed": args.seed,
                       "batches": args.batches, **({"overrides": args.set} if args.set else {}),
                       **({"fixed_masks": Path(args.fixed_masks).name} if args.fixed_masks else {})}
    return print_json_report(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
