"""Command line: one thin sub-command per stage (parse, call the library, report).

Exit status: 0 on success; 2 on bad usage or bad input (one line on stderr, no traceback);
1 on an internal failure (with a traceback, since that is a bug to report).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import traceback

from carbseg import __version__
from carbseg.allocator import keep_freed_memory
from carbseg.console import close_progress_bars
from carbseg.data.datasets import DATASET_NAMES
from carbseg.errors import UserError, one_line

# Where stderr is not a terminal (a log file, nohup) these commands log plain progress lines instead of a bar.
_NO_PROGRESS_LINES = ("no progress bar on a terminal, and no progress lines (INFO, every log interval or 30 s) "
                      "where stderr is not a terminal")


def _add_dataset_args(p: argparse.ArgumentParser, split_default: str | None = None) -> None:
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES, help="dataset layout and class set")
    p.add_argument("--root", required=True, help="dataset root folder")
    p.add_argument("--split", required=split_default is None, default=split_default, help="train, val or test")
    p.add_argument("--classes", default=None,
                   help="classes file (JSON or YAML: names, optional text_names and palette); only for --dataset folder")


def _dataset_from_args(args):
    from carbseg.data.datasets import build_dataset

    return build_dataset(args.dataset, args.root, args.split, classes_file=args.classes)


# ---------------------------------------------------------------- labels
def _add_labels(sub) -> None:
    p = sub.add_parser(
        "labels", help="derive image-level labels (the only supervision) from GT masks",
        description="Writes OUT.json: {dataset, classes, labels: {IMAGE_ID: [class indices]}}, the classes present "
                    "in each image's ground-truth mask -- the only supervision the method uses. Pass it to "
                    "pseudo-masks --labels or as data.labels to train.")
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES, help="dataset layout and class set")
    p.add_argument("--root", help="dataset root folder (not needed with --from-npy)")
    p.add_argument("--split", default="train", help="train (default), val or test")
    p.add_argument("--classes", default=None, help="classes file, only for --dataset folder")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--min-pixels", type=int, default=1,
                   help="a class is present when it covers at least this many pixels (default 1)")
    p.add_argument("--from-npy", default=None, metavar="FILE",
                   help="convert the authors' labels.npy (pickled dict id -> multi-hot vector) instead. "
                        "Loading a pickle can run code: use only files from a trusted source (carbseg "
                        "refuses pickles that ask for anything but numpy arrays and plain containers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none either when stderr is not "
                   "a terminal)")
    p.set_defaults(func=_run_labels)


def _run_labels(args) -> int:
    from carbseg.data.datasets import build_dataset, class_set_for
    from carbseg.data.labels import compute_image_labels, labels_from_npy, write_labels_json

    if args.min_pixels < 1:
        raise UserError(f"--min-pixels {args.min_pixels}: must be at least 1")
    if args.from_npy is not None:
        classes = class_set_for(args.dataset, args.classes)
        labels = labels_from_npy(args.from_npy, classes)
        source = args.from_npy
    else:
        if args.root is None:
            raise UserError("--root is required (the dataset folder), unless --from-npy converts labels.npy")
        dataset = build_dataset(args.dataset, args.root, args.split, classes_file=args.classes)
        classes = dataset.classes
        labels = compute_image_labels(dataset, min_pixels=args.min_pixels, progress=not args.no_progress)
        source = f"{args.root} ({args.split})"
    write_labels_json(args.out, args.dataset, classes, labels)
    empty = sum(1 for v in labels.values() if not v)
    print(f"wrote image-level labels of {len(labels)} images from {source} to {args.out}"
          + (f" ({empty} with no class)" if empty else ""))
    return 0


# ---------------------------------------------------------------- convert-wilddash2
def _add_convert_wilddash2(sub) -> None:
    p = sub.add_parser(
        "convert-wilddash2", help="convert the public WildDash2 panoptic release to train-id masks (25 classes)",
        description="Reads the extracted WildDash2 release (images/, panoptic/, panoptic.json) and writes "
                    "OUT/images/SPLIT and OUT/labels/SPLIT (train ids, 255 = ignore) for --dataset wilddash2, "
                    "with a seeded train/val split. Existing outputs are skipped (resumable).")
    p.add_argument("--src", required=True, help="extracted release: images/, panoptic/, panoptic.json")
    p.add_argument("--out", required=True, help="output root for --dataset wilddash2 (resumable)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of images for val (default 0.1): sorted ids, seeded permutation, first "
                        "round(F*N) are val")
    p.add_argument("--seed", type=int, default=0, help="seed of that permutation (default 0)")
    p.add_argument("--split-file", default=None,
                   help='JSON {"train": [IMAGE_ID, ...], "val": [...]} to use instead of the seeded split')
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none either when stderr is not "
                   "a terminal)")
    p.set_defaults(func=_run_convert_wilddash2)


def _run_convert_wilddash2(args) -> int:
    from carbseg.data.wilddash2 import convert_wilddash2

    counts = convert_wilddash2(args.src, args.out, split_file=args.split_file,
                               val_fraction=args.val_fraction, seed=args.seed, progress=not args.no_progress)
    print(f"converted WildDash2 into {args.out}: "
          + ", ".join(f"{name} {n} images" for name, n in counts.items()))
    return 0


# ---------------------------------------------------------------- pseudo-masks
# The teacher is configured as in `carbseg train`: KEY=VALUE of the config's teacher section. These
# flags are the same keys by their older names (flag destination -> teacher key); they have no
# defaults of their own (TeacherConfig's apply) and, given, win over KEY=VALUE.
TEACHER_FLAGS = {"teacher": "kind", "proxy_weights": "proxy_weights", "clip_model": "clip_model",
                 "clip_pretrained": "clip_pretrained", "dense": "dense", "naclip_sigma": "naclip_sigma",
                 "templates": "text_templates", "scales": "scales", "key_smoothing": "key_smoothing",
                 "prompt_denoising": "prompt_denoising", "confidence_threshold": "confidence_threshold",
                 "grid_cell": "grid_cell", "noise": "noise", "cache_dir": "cache_dir"}


def _add_pseudo_masks(sub) -> None:
    from carbseg.config import CHOICES, TeacherConfig

    default = TeacherConfig()
    p = sub.add_parser(
        "pseudo-masks", help="teacher pseudo-masks for every image, from image-level labels",
        description="Writes OUT/IMAGE_ID.png (train ids, 255 = ignore) per image; resumable (existing files are "
                    "skipped), shardable with torchrun. The teacher is set as in carbseg train: KEY=VALUE of the "
                    "config's teacher section (docs/configuration.md), e.g. kind=simulated grid_cell=8; the "
                    "flags below are the same keys by other names and win over KEY=VALUE. Score the masks with "
                    "`carbseg evaluate --pred OUT`.")
    _add_dataset_args(p)
    p.add_argument("--labels", required=True, help="image-level labels JSON (carbseg labels)")
    p.add_argument("--out", required=True, help="output folder; writes OUT/IMAGE_ID.png in train ids")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="teacher settings, e.g. kind=proxy proxy_weights=FILE or teacher.noise=0.2 (the "
                        "teacher. prefix is optional)")
    p.add_argument("--teacher", choices=CHOICES["teacher.kind"], default=None,
                   help=f"= kind (default {default.kind}); simulated: a research instrument that READS GROUND "
                        "TRUTH (patch-grid majority of the GT plus persistent CLIP-like noise); proxy: a research "
                        "instrument that sees the pixels (frozen ImageNet features + a classifier fitted on a few "
                        "labelled images, --proxy-weights)")
    p.add_argument("--proxy-weights", default=None, metavar="FILE",
                   help="= proxy_weights: the safetensors file of carbseg fit-proxy-teacher (its fit images get "
                        "no mask)")
    p.add_argument("--clip-model", default=None, help=f"= clip_model (default {default.clip_model}): open_clip "
                   "ViT name (ViT-B-16, ViT-B-32, ViT-L-14) or a JSON model config file")
    p.add_argument("--clip-pretrained", default=None, help=f"= clip_pretrained (default {default.clip_pretrained}): "
                   "open_clip tag, local weights file (.pt, .bin, .safetensors), or none (random weights: "
                   "meaningless masks)")
    p.add_argument("--dense", choices=CHOICES["teacher.dense"], default=None,
                   help=f"= dense (default {default.dense}, the paper's value path): last-block dense form of the "
                        "CLIP teacher; sclip, clearclip and naclip are training-free attention changes (see "
                        "docs/teacher.md)")
    p.add_argument("--naclip-sigma", type=float, default=None, help="= naclip_sigma: naclip's neighbourhood "
                   "width in patches")
    p.add_argument("--templates", default=None,
                   help=f"= text_templates (default {default.text_templates}): ensemble85, single, or a text file "
                        "(one per line with {{}})")
    p.add_argument("--scales", default=None, help="= scales, comma-separated: multi-scale factors, e.g. "
                   "0.75,1.0,1.25")
    p.add_argument("--key-smoothing", action="store_const", const=True, default=None,
                   help="= key_smoothing=true: key smoothing of the scores (carbseg's rule after MaskCLIP; differences in docs/teacher.md)")
    p.add_argument("--prompt-denoising", action="store_const", const=True, default=None,
                   help="= prompt_denoising=true: MaskCLIP prompt denoising")
    p.add_argument("--confidence-threshold", type=float, default=None,
                   help="= confidence_threshold: pixels whose class probability is below this become 255 (ignore)")
    p.add_argument("--grid-cell", "--patch-size", dest="grid_cell", type=int, default=None,
                   help=f"= grid_cell (default {default.grid_cell}): simulated teacher's grid cell side in pixels "
                        "(--patch-size is its former name)")
    p.add_argument("--noise", type=float, default=None, help=f"= noise (default {default.noise}): simulated "
                   "teacher's noise strength in [0, 1]")
    p.add_argument("--cache-dir", default=None, help="= cache_dir: cache of downloaded weights and text embeddings")
    p.add_argument("--crf", action="store_true", help="dense-CRF refinement with the authors' parameters "
                   "(needs the crf extra: pip install -e \".[crf]\" in the carbseg checkout)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="CLIP blocks under bf16 autocast or fp32; auto (default): bf16 on GPUs with native "
                        "bf16 and on CPUs where a short timed probe measured it faster, else fp32")
    p.add_argument("--seed", type=int, default=0, help="simulated teacher: noise seed")
    p.add_argument("--batch-size", type=int, default=4, help="images per teacher forward pass (default 4)")
    p.add_argument("--workers", type=int, default=2, help="image-loading worker processes (default 2; 0 loads "
                   "in the main process)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--html", default=None, metavar="DIR",
                   help="also write DIR/index.html, a page to browse every pseudo-mask over its image (scored "
                        "against the ground truth where the split has it); docs/html_report.md")
    p.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS_LINES)
    p.set_defaults(func=_run_pseudo_masks)


def teacher_config_from_args(args):
    """The ``TeacherConfig`` of ``carbseg pseudo-masks``: its KEY=VALUE overrides, then its flags."""
    from carbseg.config import section_from_overrides

    flags = {key: getattr(args, dest) for dest, key in TEACHER_FLAGS.items() if getattr(args, dest) is not None}
    if "scales" in flags:
        flags["scales"] = _parse_scales(flags["scales"], "--scales")
    return section_from_overrides("teacher", args.overrides, flags, source="pseudo-masks teacher settings")


def _run_pseudo_masks(args) -> int:
    import logging

    from carbseg import distributed
    from carbseg.data.labels import read_labels_json
    from carbseg.devices import process_device
    from carbseg.engine.run_dir import folder_lock
    from carbseg.io import check_output_dir
    from carbseg.teacher.build import build_teacher
    from carbseg.teacher.generate import generate_pseudo_masks

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = teacher_config_from_args(args)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = process_device(args.device)  # under torchrun: one GPU per rank
    check_output_dir(args.out)
    if args.html:
        from carbseg.html_report import check_report_dir

        check_report_dir(args.html)
    dataset = _dataset_from_args(args)
    labels = read_labels_json(args.labels, dataset.classes)
    refine = None
    if args.crf:
        from carbseg.teacher.refine import dense_crf, import_densecrf

        import_densecrf()  # fail before any work if the [crf] extra is missing
        num_classes = dataset.classes.num_classes

        def refine(image, mask):
            return dense_crf(image, mask, num_classes)

    # One process (rank 0 for all of torchrun's) writes into --out at a time; the folder the lock
    # makes is removed again if nothing was written, so missing weights still leave no output folder.
    with folder_lock(args.out, "pseudo-masks"):
        # The process group first: it binds this rank to its GPU before the teacher touches CUDA.
        distributed.init_from_env(device.type)
        try:
            # Weights are resolved here, before any mask is written: missing weights write nothing.
            teacher = build_teacher(cfg, dataset.classes, device, precision=args.precision, seed=args.seed)
            report = generate_pseudo_masks(dataset, labels, teacher, args.out, device=device,
                                           batch_size=args.batch_size, num_workers=args.workers, refine=refine,
                                           progress=not args.no_progress and distributed.is_main_process())
        finally:
            distributed.barrier(device)
            distributed.shutdown()
    print(f"pseudo-masks: wrote {report.written}, skipped {report.skipped} existing, "
          f"{report.total} images in the split -> {args.out}")
    if args.html and distributed.is_main_process():
        from carbseg.data.base import WithoutIds
        from carbseg.html_report.builder import machine_description, write_mask_page

        fit_ids = set(getattr(teacher, "fit_ids", ()))
        shown = WithoutIds(dataset, fit_ids) if fit_ids & set(dataset.ids) else dataset  # as generate_pseudo_masks
        source = {"evaluated": f"pseudo-masks of the {cfg.kind} teacher", "masks": args.out,
                  "dataset": f"{args.dataset} {args.root}", "split": args.split,
                  "teacher": ", ".join(f"{k}={v}" for k, v in cfg.__dict__.items() if v not in (None, "", ())),
                  "machine": machine_description(device)}
        page, scores = write_mask_page(args.html, shown, args.out, source, progress=not args.no_progress)
        print(f"pseudo-masks: HTML report {page}"
              + (f" (pseudo-mask mIoU {scores['miou']:.2f})" if scores and scores["miou"] is not None else ""))
    return 0


# ---------------------------------------------------------------- fit-proxy-teacher
def _add_fit_proxy_teacher(sub) -> None:
    p = sub.add_parser(
        "fit-proxy-teacher",
        help="fit the proxy teacher (a research instrument) on a few images' ground truth",
        description="The proxy teacher stands in for CLIP's dense path where no CLIP weights exist: frozen "
                    "ImageNet EfficientNet-Lite0 features on a 16-px grid and a linear classifier fitted on the "
                    "ground truth of N images of the split (a RESEARCH INSTRUMENT, not weak supervision). Their "
                    "ids are stored in the file; they are left out of training and of evaluations that report "
                    "the teacher. Use with teacher.kind=proxy teacher.proxy_weights=FILE, or "
                    "carbseg pseudo-masks --teacher proxy --proxy-weights FILE.")
    _add_dataset_args(p)
    p.add_argument("--num-images", type=int, required=True,
                   help="size of the fit set, drawn by a seeded permutation (a few percent of the split, e.g. 12)")
    p.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit-set draw (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_fit_proxy_teacher)


def _run_fit_proxy_teacher(args) -> int:
    from pathlib import Path

    from carbseg.console import show_progress
    from carbseg.teacher.proxy import fit_proxy_teacher

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the proxy teacher is saved as safetensors; name the file *.safetensors")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give a file name such as {out / 'proxy_teacher.safetensors'}")
    dataset = _dataset_from_args(args)
    weights = fit_proxy_teacher(dataset, args.dataset, args.split, args.num_images, seed=args.seed,
                                progress=show_progress(not args.no_progress))
    weights.save(out)
    print(f"proxy teacher (research instrument) fitted on {len(weights.fit_ids)} {args.dataset}/{args.split} images "
          f"(cell accuracy on them {100 * weights.fit_pixel_accuracy:.1f}%) -> {out}")
    return 0


# ---------------------------------------------------------------- evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="per-class IoU of predictions or of a checkpoint against ground truth",
        description="Per-class IoU, mIoU and pixel accuracy against the split's ground truth. Pseudo-masks "
                    "(carbseg pseudo-masks --out DIR) are evaluated the same way: pass their folder as --pred. "
                    "A prediction value 255 (ignore) on a labelled pixel counts as wrong.")
    _add_dataset_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pred", help="folder of predictions or pseudo-masks DIR/IMAGE_ID.png in train ids")
    src.add_argument("--checkpoint", help="model.safetensors written by carbseg train")
    p.add_argument("--json", default=None, help="write the report as JSON here (miou, pixel_acc, iou, num_images)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write report.md, report.json, IoU bars, confusion heat map and best/worst image grids here")
    p.add_argument("--html", default=None, metavar="DIR",
                   help="write DIR/index.html: a page to browse every image (sortable by per-image and per-class "
                        "IoU, layers over the photo, the same numbers as --json); docs/html_report.md")
    p.add_argument("--teacher-masks", default=None, metavar="DIR",
                   help="with --html: the teacher's pseudo-masks (carbseg pseudo-masks --out DIR), shown beside "
                        "the model with CARB's consistent and inconsistent regions")
    p.add_argument("--device", default="auto", help="with --checkpoint: auto (GPU if any), cpu, cuda, cuda:N")
    p.add_argument("--scales", default=None, metavar="S[,S...]",
                   help="with --checkpoint: test scales instead of the checkpoint's eval.scales, e.g. 2.0 for "
                        "CamVid's release protocol (the whole frame at 960x720) or 1.0 for native size")
    p.add_argument("--exclude-fit-set", default=None, metavar="PROXY_WEIGHTS",
                   help="leave out the images a proxy teacher was fitted on (its weight file lists them): "
                        "needed to score its pseudo-masks honestly, which skip those images")
    p.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS_LINES)
    p.set_defaults(func=_run_evaluate)


def _parse_scales(text: str | None, option: str) -> list[float] | None:
    """'0.75,1.0' -> [0.75, 1.0]; None stays None (the default of whoever reads it)."""
    if text is None:
        return None
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated numbers, e.g. 0.75,1.0,1.25") from None
    if not scales or any(s <= 0 for s in scales):
        raise UserError(f"{option} {text!r}: scales must be positive numbers, e.g. 1.0 or 0.75,1.0,1.25")
    return scales


def _run_evaluate(args) -> int:
    import logging

    from carbseg.engine.evaluate import (
        evaluate_predictions,
        load_qualitative_samples,
        qualitative_from_predictions,
    )
    from carbseg.engine.report import print_table, write_report
    from carbseg.io import check_output_dir, write_json_atomic

    # INFO: the progress lines that replace the bar when stderr is not a terminal.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.report:
        check_output_dir(args.report, "--report")
    if args.scales is not None and args.checkpoint is None:
        raise UserError("--scales applies to --checkpoint (predictions in --pred are already made)")
    if args.teacher_masks and not args.html:
        raise UserError("--teacher-masks is shown in the --html page; add --html DIR")
    if args.html:
        from pathlib import Path

        from carbseg.html_report import check_report_dir

        check_report_dir(args.html)
        if args.report and Path(args.report).resolve() == Path(args.html).resolve():
            raise UserError(f"--html {args.html}: the same folder as --report; give each its own folder")
    dataset = _dataset_from_args(args)
    if args.exclude_fit_set:
        from carbseg.data.base import WithoutIds
        from carbseg.teacher.proxy import read_fit_ids

        dataset = WithoutIds(dataset, read_fit_ids(args.exclude_fit_set))
        print(f"left out {len(dataset.excluded)} images of the proxy teacher's fit set; scoring {len(dataset)}")
    with contextlib.ExitStack() as stack:
        html = stack.enter_context(_evaluation_page(args, dataset)) if args.html else None
        on_image = None
        if html is not None:
            from carbseg.html_report import image_hook

            on_image = image_hook(html, dataset)
        if args.pred is not None:
            confusion, stats = evaluate_predictions(dataset, args.pred, progress=not args.no_progress,
                                                    on_image=on_image)
            samples = load_qualitative_samples(dataset, args.pred, stats) if args.report else None
        else:
            from carbseg.engine.inference import evaluate_checkpoint

            confusion, stats, kept = evaluate_checkpoint(dataset, args.checkpoint, device=args.device,
                                                         scales=_parse_scales(args.scales, "--scales"),
                                                         progress=not args.no_progress, on_image=on_image)
            samples = qualitative_from_predictions(stats, kept)
        report = confusion.report(dataset.classes.names)
        print_table(report, dataset.classes)
        if args.json:
            write_json_atomic(args.json, report)
        if args.report:
            write_report(args.report, report, confusion, dataset.classes, samples)
        if html is not None:
            print(f"HTML report: {html.finish(report, confusion)}")
    return 0


def _evaluation_page(args, dataset):
    """The ``HtmlReport`` of ``carbseg evaluate --html``, with what is evaluated, where and how."""
    from carbseg.html_report.builder import HtmlReport, machine_description

    if args.pred is not None:
        evaluated, device = f"predictions {args.pred}", "cpu"
    else:
        from carbseg.devices import parse_device

        evaluated, device = f"checkpoint {args.checkpoint}", parse_device(args.device)
    source = {"evaluated": evaluated, "dataset": f"{args.dataset} {args.root}", "split": args.split,
              "scales": args.scales or ("the checkpoint's eval.scales" if args.checkpoint else "as predicted"),
              "images": len(dataset)}
    if args.exclude_fit_set:
        source["left out"] = f"{len(dataset.excluded)} images of the proxy teacher's fit set"
    if args.teacher_masks:
        source["teacher"] = f"pseudo-masks {args.teacher_masks}"
    source["machine"] = machine_description(device)
    return HtmlReport(args.html, dataset.classes, source, teacher_dir=args.teacher_masks)


# ---------------------------------------------------------------- train
def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train the segmenter (GLV + CARB) from a YAML config",
        description="Trains the DeepLab segmenter with Global-Local View training and CARB on the teacher's "
                    "pseudo-masks (online, or offline with data.pseudo_masks). Writes OUT/config.yaml, log.jsonl, "
                    "tb/ (TensorBoard), checkpoint_last.pt and, at the end, model.safetensors for evaluate, "
                    "predict and export-onnx. Every config key can be overridden as key=value "
                    "(docs/configuration.md). Stop with Ctrl-C and continue with --resume.")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/cityscapes_carb.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_iters=1000")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations in total")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--device", default=None,
                   help="auto (GPU if any), cpu, cuda, cuda:N; the same as the override device=DEVICE")
    p.add_argument("--workers", type=int, default=None,
                   help="image-loading worker processes; the same as the override data.num_workers=N")
    p.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS_LINES)
    p.set_defaults(func=_run_train)


# Teacher settings are flags of pseudo-masks and config keys of train: an error met while training
# (e.g. CLIP weights not found) names the key the train user can set.
_FLAG_TO_KEY = {"--clip-pretrained": "teacher.clip_pretrained", "--clip-model": "teacher.clip_model",
                "--templates": "teacher.text_templates", "--cache-dir": "teacher.cache_dir"}


def _in_config_terms(message: str) -> str:
    for flag, key in _FLAG_TO_KEY.items():
        message = re.sub(re.escape(flag) + r"(?: ([A-Z]+)\b)?",
                         lambda m, key=key: key + (f"={m.group(1)}" if m.group(1) else ""), message)
    return message


def _run_train(args) -> int:
    import logging
    import os
    from pathlib import Path

    from carbseg.config import load_config
    from carbseg.engine.train import TrainingInterrupted, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)  # the flags are overrides by another name; they win over key=value
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    try:
        model_path = train(cfg, out, max_iters=args.max_iters, resume=args.resume, progress=not args.no_progress)
    except UserError as err:
        raise UserError(_in_config_terms(one_line(err))) from None
    except TrainingInterrupted as stop:
        print(f"carbseg train: {stop}", file=sys.stderr)
        return 128 + stop.signum  # the shell's convention for "ended by a signal"
    if os.environ.get("RANK", "0") == "0":  # under torchrun, only rank 0 reports
        print(f"carbseg train: model written to {model_path}")
    return 0


# ---------------------------------------------------------------- predict
def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="segment an image, a folder of images or a video",
        description="Writes OUT/IMAGE_ID.png (train ids) and OUT/overlay/IMAGE_ID.png; for a video, "
                    "OUT/overlay/NAME.mp4 (.gif for a GIF). Existing outputs are skipped (resumable). Every "
                    "image is read upright (EXIF orientation), predicted rescaled to fit the model's "
                    "data.scale_size (aspect kept), and its labels brought back to its own size.")
    p.add_argument("--checkpoint", required=True, help="model.safetensors written by carbseg train")
    p.add_argument("--input", required=True,
                   help="image file, folder of images (searched recursively), or video file (mp4 etc. need PyAV)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=("png", "cityscapes"), default="png",
                   help="png: IMAGE_ID.png in train ids (default); cityscapes: test-server files "
                        "<city>_<seq>_<frame>_leftImg8bit.png in Cityscapes label ids, no overlays")
    p.add_argument("--mode", choices=("whole", "slide"), default=None,
                   help="whole image or sliding window (default: the checkpoint's eval.mode)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: horizontal flip and several scales (the checkpoint's "
                        "eval.scales, or 0.5..1.75 when it names one)")
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help=_NO_PROGRESS_LINES)
    p.set_defaults(func=_run_predict)


def _run_predict(args) -> int:
    import logging

    from carbseg.engine.predict import predict_path
    from carbseg.io import check_output_dir

    # INFO: the progress lines that replace the bar when stderr is not a terminal.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_output_dir(args.out)
    summary = predict_path(args.checkpoint, args.input, args.out, fmt=args.format, mode=args.mode, tta=args.tta,
                           device=args.device, progress=not args.no_progress)
    print(f"carbseg predict: {summary.written} written, {summary.skipped} already present, in {args.out}")
    return 0


# ---------------------------------------------------------------- export-onnx
def _add_export_onnx(sub) -> None:
    p = sub.add_parser(
        "export-onnx", help="export a checkpoint to ONNX (input images 0..255, output logits)",
        description="Exports the whole segmenter (normalisation and upsampling included): input 'images' "
                    "float32 (B, 3, H, W) RGB in 0..255, output 'logits' (B, C, H, W). The batch size, height "
                    "and width are free unless --fixed-size is given.")
    p.add_argument("--checkpoint", required=True, help="model.safetensors written by carbseg train")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--fixed-size", default=None, metavar="HxW",
                   help="fix the input to 1 x 3 x H x W, e.g. 512x1024 (height first, as the tensor); the "
                        "runtime then refuses any other size (default: batch, height and width free)")
    # Hidden, for scripts that use them: --height/--width ask for a fixed size as --fixed-size does
    # (with --dynamic they are only the size the graph is traced at); --dynamic is the default.
    p.add_argument("--dynamic", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--height", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default 17)")
    p.set_defaults(func=_run_export_onnx)


def _parse_height_width(text: str, flag: str) -> tuple[int, int]:
    """'512x1024' -> (512, 1024): height first, as in the (B, 3, H, W) input."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or min(int(p) for p in parts) < 1:
        raise UserError(f"{flag} {text!r}: expected HEIGHTxWIDTH in pixels such as 512x1024")
    height, width = (int(p) for p in parts)
    return height, width


def _run_export_onnx(args) -> int:
    from carbseg.engine.export import export_onnx

    size_flags = args.height is not None or args.width is not None
    if args.fixed_size is not None and (args.dynamic or size_flags):
        raise UserError("--fixed-size HxW is the whole size request: give it without --dynamic, --height or --width")
    if args.fixed_size is not None:
        (height, width), dynamic = _parse_height_width(args.fixed_size, "--fixed-size"), False
    elif size_flags:
        height, width, dynamic = args.height or 512, args.width or 1024, args.dynamic
    else:
        height, width, dynamic = 512, 1024, True  # free sizes; traced at the release's crop
    path = export_onnx(args.checkpoint, args.out, height=height, width=width, dynamic=dynamic, opset=args.opset)
    shape = "(B, 3, H, W), batch, height and width free" if dynamic else f"fixed (1, 3, {height}, {width})"
    print(f"carbseg export-onnx: wrote {path} (input {shape})")
    return 0


# ---------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="the whole method offline on generated driving scenes (minutes on a CPU)",
        description="Generated driving scenes -> image-level labels -> pseudo-masks of the SIMULATED teacher (it "
                    "reads the ground truth: a research instrument) -> GLV + CARB training -> evaluation on "
                    "the test scenes (never used for any choice; validation scenes reported as such) -> "
                    "OUT/report.md and OUT/report.json. Rerunning the same command reuses "
                    "the finished stages.")
    p.add_argument("--out", required=True, help="output folder (created; a rerun resumes in it)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: PyTorch's choice; 1 is faster on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none either when stderr is not "
                   "a terminal)")
    # Hidden: a seconds-long run at a minuscule size for smoke tests (its mIoU means nothing).
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    import logging

    import torch

    from carbseg.demo import QUICK, DemoSettings, run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    import signal

    from carbseg.engine.signals import TrainingInterrupted

    try:
        report = run_demo(args.out, QUICK if args.quick else DemoSettings(), progress=not args.no_progress,
                          announce=lambda line: print(line, flush=True))
    except TrainingInterrupted as stop:
        print(f"carbseg demo: stopped by signal {signal.Signals(stop.signum).name} after training iteration "
              f"{stop.iteration} (checkpoint written); rerun the same command to resume", file=sys.stderr)
        return 128 + stop.signum  # the shell's convention for "ended by a signal"
    print(f"carbseg demo: test mIoU {report['miou']:.1f} (validation {report['val_miou']:.1f}; pseudo-masks of "
          f"the simulated teacher: "
          f"{report['pseudo_mask_miou']:.1f}) in {report['timings_s']['total']:.0f} s; report: {args.out}/report.md")
    return 0


# ---------------------------------------------------------------- synthesize
def _add_synthesize(sub) -> None:
    p = sub.add_parser(
        "synthesize", help="write procedurally generated driving scenes (images + masks), resumable",
        description="Writes OUT/images/SPLIT/*.png, OUT/masks/SPLIT/*.png (train ids) and OUT/classes.json: a "
                    "dataset for --dataset synthetic --root OUT, to try every command without downloading data.")
    p.add_argument("--out", required=True, help="dataset root; writes OUT/images/SPLIT, OUT/masks/SPLIT, OUT/classes.json")
    p.add_argument("--split", default="train", choices=("train", "val", "test"), help="split to write (default train)")
    p.add_argument("--num", type=int, default=100, help="number of scenes (default 100)")
    p.add_argument("--size", default="512x256", help="WIDTHxHEIGHT in pixels (default 512x256)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; splits never share scenes (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none either when stderr is not "
                   "a terminal)")
    p.set_defaults(func=_run_synthesize)


def _parse_size(text: str) -> tuple[int, int]:
    """'512x256' -> (width, height)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"--size {text!r}: expected WIDTHxHEIGHT such as 512x256")
    width, height = (int(p) for p in parts)
    if width < 8 or height < 8:
        raise UserError(f"--size {text!r}: width and height must be at least 8 pixels")
    return width, height


def _run_synthesize(args) -> int:
    from carbseg.data.synthetic import generate_synthetic_dataset

    width, height = _parse_size(args.size)
    if args.num < 1:
        raise UserError(f"--num {args.num}: the number of scenes must be at least 1")
    written = generate_synthetic_dataset(args.out, args.split, args.num, height, width, seed=args.seed,
                                         progress=not args.no_progress)
    print(f"{args.out}: {args.num} {args.split} scenes of {width}x{height} ({written} written, "
          f"{args.num - written} already present)")
    return 0


# ---------------------------------------------------------------- doctor
def _add_doctor(sub) -> None:
    p = sub.add_parser(
        "doctor", help="what this environment can do: versions, devices, bf16, weights, extras, data",
        description="One screen about this machine: package versions, CPU threads and native bf16, the CPU "
                    "precision probe's cached answers with their timings, CUDA GPUs and NCCL, CLIP and ResNet "
                    "weights already cached, optional extras (crf, onnx, video) and shared datasets (the "
                    "folder $CARBSEG_DATA names). Reads only (except --reprobe); always exits 0.")
    p.add_argument("--reprobe", action="store_true",
                   help="first clear the CPU precision probe's cached answers, so that the next CPU run "
                        "measures fp32 against bf16 again (e.g. after they were measured on a busy machine)")
    p.set_defaults(func=_run_doctor)


def _run_doctor(args) -> int:
    from carbseg.doctor import report_lines, reprobe

    if args.reprobe:
        print(reprobe())
    print("\n".join(report_lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carbseg",
        description="Weakly supervised semantic segmentation for driving scenes (CLIP teacher, GLV, CARB).",
    )
    parser.add_argument("--version", action="version", version=f"carbseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_labels, _add_convert_wilddash2, _add_fit_proxy_teacher, _add_pseudo_masks, _add_evaluate,
                _add_train, _add_predict, _add_export_onnx, _add_demo, _add_synthesize, _add_doctor):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        keep_freed_memory()  # before any tensor: glibc then reuses freed blocks instead of faulting pages in
        return int(args.func(args) or 0)
    except UserError as err:
        close_progress_bars()  # the error starts a line of its own
        print(f"carbseg {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"carbseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        from carbseg.io import environment_error_message

        close_progress_bars()
        message = environment_error_message(err)
        if message is None:
            return _internal_error(args.command)
        print(f"carbseg {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception:
        return _internal_error(args.command)


def _internal_error(command: str) -> int:
    """A bug: the traceback, then a line that says so (exit 1)."""
    close_progress_bars()
    traceback.print_exc()
    print(f"carbseg {command}: internal error (a bug: please report it with the traceback above)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
