"""``carbseg demo``: the whole method, offline, on generated driving scenes, in minutes on a CPU.

The stages follow the design's data flow, each one resumable (a rerun reuses what is finished):

1. ``data``: procedural driving scenes (``carbseg.data.synthetic``) into ``OUT/data``: a training
   split, a validation split (the demo's settings were chosen on it) and a test split that was
   never used for any choice -- the reported mIoU is the test split's;
2. ``labels``: image-level labels from the training masks -- the only supervision of the method;
3. ``pseudo_masks``: offline pseudo-masks of the SIMULATED teacher, scored against the ground truth
   (how good the supervision is that the segmenter learns from);
4. ``train``: the segmenter with Global-Local View training (GLV) and Consistency-Aware Region
   Balancing (CARB), the teacher in the loop (``configs/demo.yaml``, shipped inside the package);
5. ``evaluate``: mIoU of the trained segmenter on the test scenes (and, named as such, the
   validation scenes), and ``OUT/html/index.html``, the browsable page of every test scene;
6. ``report``: ``OUT/report.json``, ``OUT/report.md`` with a picture grid (image | pseudo-mask |
   prediction | ground truth), the learning curve of the run's ``log.jsonl`` and a link to the page.

The teacher is the simulated one: it READS THE GROUND TRUTH and corrupts it the way CLIP does
(coarse patch grid, confusions between similar classes). It is a research instrument that needs no
CLIP weights -- never a substitute for the CLIP teacher on real data. Every output says so.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from carbseg.config import Config, config_from_yaml_text, config_to_dict
from carbseg.engine.run_dir import LOCK_FILE, RunDir, folder_lock
from carbseg.errors import UserError
from carbseg.io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

TEACHER_NOTE = ("SIMULATED teacher: pseudo-masks are made from the ground truth (coarse patch grid plus "
                "CLIP-like noise); a research instrument, not weak supervision")
STAGES = ("data", "labels", "pseudo_masks", "train", "evaluate", "report")
STATE_FILE = "demo_state.json"
REPORT_KEYS = ("split", "miou", "pixel_acc", "iou", "num_images", "val_miou", "pseudo_mask_miou", "pseudo_mask_iou", "teacher",
               "timings_s", "reused_stages", "settings")


@dataclass(frozen=True)
class DemoSettings:
    """Size of the demo: the number and size of the scenes, and config overrides (``key=value``)."""

    num_train: int = 300
    num_val: int = 40  # validation scenes: settings are chosen here (in-training validation too)
    num_test: int = 40  # test scenes: the reported mIoU; never used for any choice
    width: int = 256
    height: int = 128
    seed: int = 0
    grid_scenes: int = 4  # test scenes shown in the picture grid
    overrides: tuple[str, ...] = ()


#: The smoke-test size (``carbseg demo --quick``): seconds, and a meaningless mIoU.
QUICK = DemoSettings(
    num_train=6, num_val=3, num_test=3, width=128, height=64, grid_scenes=2,
    overrides=("data.scale_size=[64,128]", "data.crop_size=[64,128]", "glv.patch_size=[32,64]",
               "eval.crop_size=[64,128]", "eval.stride=[32,64]", "train.max_iters=4", "train.warmup_iters=2",
               "train.eval_interval=2", "train.checkpoint_interval=2", "train.log_interval=1",
               "train.val_max_images=2"),
)


# ---------------------------------------------------------------- the demo config
def demo_config_text() -> str:
    """The YAML of the demo config, read from the installed package (works without a source tree)."""
    return resources.files("carbseg").joinpath("configs", "demo.yaml").read_text(encoding="utf-8")


def load_demo_config(overrides: Sequence[str] = ()) -> Config:
    """The packaged demo config with ``key=value`` overrides applied (merged and checked as by
    ``carbseg train``)."""
    return config_from_yaml_text(demo_config_text(), overrides, "carbseg/configs/demo.yaml")


# ---------------------------------------------------------------- stage bookkeeping
@dataclass
class _State:
    """``OUT/demo_state.json``: settings of the demo in OUT and what each finished stage measured."""

    path: Path
    settings: dict
    done: dict = field(default_factory=dict)  # stage -> {"seconds": float, ...results}

    @classmethod
    def open(cls, out: Path, settings: DemoSettings) -> _State:
        path = out / STATE_FILE
        wanted = asdict(settings)
        wanted["overrides"] = list(settings.overrides)
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("settings") != wanted:
                raise UserError(f"{path}: this folder holds a demo of other settings ({saved.get('settings')}); "
                                "choose another --out or delete the folder")
            return cls(path, wanted, saved.get("done", {}))
        if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
            raise UserError(f"{out}: folder is not empty and holds no carbseg demo; choose another --out")
        state = cls(path, wanted)
        state.save()  # first, so that a run killed in its first stage is still recognised as a demo
        return state

    def save(self) -> None:
        write_json_atomic(self.path, {"settings": self.settings, "done": self.done})

    def finish(self, stage: str, seconds: float, **results) -> None:
        self.done[stage] = {"seconds": round(seconds, 2), **results}
        self.save()

    def forget(self, *stages: str) -> None:
        for stage in stages:
            self.done.pop(stage, None)


# ---------------------------------------------------------------- the pipeline
def run_demo(out_dir: str | Path, settings: DemoSettings = DemoSettings(), progress: bool = True,
             announce: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) the demo in ``out_dir`` and return the content of ``OUT/report.json``.

    ``announce`` receives one line per stage (start, reused, done); by default it logs them.
    """
    out = Path(out_dir)
    with folder_lock(out, "demo"):  # one demo at a time in a folder (rank 0's under torchrun)
        return _run_demo(out, settings, progress, announce or log.info)


def _run_demo(out: Path, settings: DemoSettings, progress: bool, say: Callable[[str], None]) -> dict:
    data_root, run = out / "data", RunDir(out / "run")
    state = _State.open(out, settings)  # refuses a foreign folder before the (slow) imports below

    import torch

    from carbseg.data.datasets import build_dataset
    from carbseg.data.labels import compute_image_labels, read_labels_json, write_labels_json
    from carbseg.data.synthetic import generate_synthetic_dataset
    from carbseg.devices import process_device
    from carbseg.engine.evaluate import evaluate_predictions
    from carbseg.engine.train import train
    from carbseg.teacher.build import build_teacher
    from carbseg.teacher.generate import generate_pseudo_masks

    out.mkdir(parents=True, exist_ok=True)
    cfg = load_demo_config([f"data.root={data_root.as_posix()}", f"data.labels={(out / 'labels_train.json').as_posix()}",
                            f"seed={settings.seed}", *settings.overrides])
    device = process_device(cfg.device, option="device =")
    timings: dict[str, float] = {}
    reused: list[str] = []
    started_all, cpu_started = time.perf_counter(), time.process_time()

    def stage(number: int, name: str, what: str) -> bool:
        """Announce a stage; True when it must run, False when a previous run finished it."""
        if name in state.done:
            say(f"[{number}/{len(STAGES)}] {what}: reused (finished in {state.done[name]['seconds']:.0f} s before)")
            reused.append(name)
            timings[name] = 0.0
            return False
        say(f"[{number}/{len(STAGES)}] {what} ...")
        return True

    def finished(name: str, began: float, **results) -> None:
        seconds = time.perf_counter() - began
        timings[name] = round(seconds, 2)
        state.finish(name, seconds, **results)
        say(f"      done in {seconds:.1f} s")

    # 1. Scenes: files are written atomically and existing ones skipped, so this resumes by itself.
    if stage(1, "data", f"generating {settings.num_train} training, {settings.num_val} validation and "
                        f"{settings.num_test} test scenes of {settings.width}x{settings.height} in {data_root}"):
        began = time.perf_counter()
        for split, count in (("train", settings.num_train), ("val", settings.num_val), ("test", settings.num_test)):
            generate_synthetic_dataset(data_root, split, count, settings.height, settings.width,
                                       seed=settings.seed, progress=progress)
        finished("data", began)
    train_set = build_dataset("synthetic", data_root, "train")
    val_set = build_dataset("synthetic", data_root, "val")
    test_set = build_dataset("synthetic", data_root, "test")
    classes = train_set.classes

    # 2. Image-level labels: which classes each image contains -- all the segmenter is told.
    labels_files = {split: out / f"labels_{split}.json" for split in ("train", "test")}
    if stage(2, "labels", "image-level labels (the only supervision) from the masks"):
        began = time.perf_counter()
        for split, dataset in (("train", train_set), ("test", test_set)):
            write_labels_json(labels_files[split], "synthetic", classes, compute_image_labels(dataset))
        finished("labels", began)

    # 3. Offline pseudo-masks of the simulated teacher, and how good they are against the GT.
    #    The test split's masks are made only for the picture grid; training never sees them.
    mask_dirs = {split: out / "pseudo_masks" / split for split in ("train", "test")}
    if stage(3, "pseudo_masks", f"offline pseudo-masks of the {TEACHER_NOTE}"):
        began = time.perf_counter()
        teacher = build_teacher(cfg.teacher, classes, device, seed=cfg.seed)
        for split, dataset in (("train", train_set), ("test", test_set)):
            labels = read_labels_json(labels_files[split], classes)
            generate_pseudo_masks(dataset, labels, teacher, mask_dirs[split], device=device, progress=progress)
        confusion, _ = evaluate_predictions(train_set, mask_dirs["train"], progress=progress)
        pseudo = confusion.report(classes.names)
        finished("pseudo_masks", began, miou=pseudo["miou"], iou=pseudo["iou"])
        say(f"      pseudo-mask mIoU against the ground truth (training scenes): {pseudo['miou']:.1f}")

    # 4. Training with GLV + CARB, teacher in the loop. A run killed midway resumes from its last
    #    checkpoint; one killed before its first checkpoint starts again.
    model_path = run.model
    if stage(4, "train", f"training the segmenter with GLV + CARB for {cfg.train.max_iters} iterations "
                         f"(warm-up {cfg.train.warmup_iters}) on {device}"):
        began = time.perf_counter()
        resume = run.checkpoint.is_file() and not model_path.is_file()
        if not resume and run.path.exists():
            shutil.rmtree(run.path)  # the demo's own run folder: a start without a checkpoint, or a stale model
        train(cfg, run.path, resume=resume, progress=progress)
        # What the run computed in (auto's per-machine choice, kept in its checkpoint): the report says it.
        from carbseg.engine.checkpoint import load_training_state

        finished("train", began, precision=load_training_state(run.checkpoint).get("precision"))
        state.forget("evaluate", "report")

    # 5. Evaluation on the test scenes (never seen in training nor used for any choice), and on the
    #    validation scenes the settings were chosen on (reported as such, never as the result).
    if stage(5, "evaluate", f"evaluating on {len(test_set)} test and {len(val_set)} validation scenes"):
        from carbseg.engine.evaluate import qualitative_from_predictions
        from carbseg.engine.inference import evaluate_checkpoint
        from carbseg.engine.report import write_report
        from carbseg.html_report.builder import HtmlReport, image_hook, machine_description

        began = time.perf_counter()
        # The browsable page of the test scenes, from the same pass: the model beside the teacher's
        # pseudo-masks of these scenes, with CARB's consistent / inconsistent regions.
        source = {"evaluated": f"the demo's segmenter {model_path.name}", "dataset": "synthetic (generated scenes)",
                  "split": "test", "teacher": f"pseudo-masks of the {TEACHER_NOTE}",
                  "machine": machine_description(device)}
        with HtmlReport(out / "html", classes, source, teacher_dir=mask_dirs["test"]) as html:
            confusion, stats, kept = evaluate_checkpoint(test_set, model_path, device=device, progress=progress,
                                                         keep_samples=len(test_set),
                                                         on_image=image_hook(html, test_set))
            evaluation = confusion.report(classes.names)
            html.finish(evaluation, confusion)
        write_report(out / "evaluation", evaluation, confusion, classes, qualitative_from_predictions(stats, kept))
        shown = kept[: settings.grid_scenes]
        _save_scene_grid(out / "scenes.png", shown, mask_dirs["test"], classes)
        val_confusion, _, _ = evaluate_checkpoint(val_set, model_path, device=device, progress=progress)
        finished("evaluate", began, report=evaluation, val_miou=val_confusion.report(classes.names)["miou"])
        state.forget("report")

    # 6. The report: JSON for scripts, Markdown with pictures for people.
    if stage(6, "report", f"writing {out / 'report.md'} and {out / 'report.json'}"):
        from carbseg.engine.report import plot_learning_curve

        began = time.perf_counter()
        plot_learning_curve(out / "learning_curve.png", run.records(), cfg.train.warmup_iters,
                            state.done["pseudo_masks"]["miou"], "simulated teacher's pseudo-masks (train)")
        finished("report", began)
    timings["total"] = round(time.perf_counter() - started_all, 2)
    # CPU seconds of this process (all its threads): on a shared machine the wall clock above is
    # inflated by other jobs, this is what the demo itself consumed.
    timings["cpu_total"] = round(time.process_time() - cpu_started, 2)
    from carbseg.precision import machine_summary

    report = _report_dict(state, cfg, settings, timings, reused, torch.get_num_threads(), machine_summary(device))
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", _report_markdown(report, classes))
    return report


# ---------------------------------------------------------------- report content
def _report_dict(state: _State, cfg: Config, settings: DemoSettings, timings: dict, reused: list[str],
                 threads: int, machine: str) -> dict:
    evaluation = state.done["evaluate"]["report"]
    pseudo = state.done["pseudo_masks"]
    return {
        # The evaluation contract (ConfusionMatrix.report) on the TEST scenes, never used for any choice.
        "split": "test",
        "miou": evaluation["miou"],
        "pixel_acc": evaluation["pixel_acc"],
        "iou": evaluation["iou"],
        "num_images": evaluation["num_images"],
        # The validation scenes the demo's settings were chosen on: not a result.
        "val_miou": state.done["evaluate"].get("val_miou"),
        # How good the supervision was: the teacher's offline pseudo-masks against the GT.
        "pseudo_mask_miou": pseudo["miou"],
        "pseudo_mask_iou": pseudo["iou"],
        "teacher": {"kind": cfg.teacher.kind, "grid_cell": cfg.teacher.grid_cell, "noise": cfg.teacher.noise,
                    "note": TEACHER_NOTE},
        "timings_s": timings,
        "first_run_timings_s": {name: done["seconds"] for name, done in state.done.items()},
        "reused_stages": reused,
        "settings": {**state.settings, "threads": threads, "device": cfg.device},
        # Where the times were measured (CPU model, its bf16 flag, threads, load) and what training computed in.
        "machine": machine,
        "training_precision": state.done["train"].get("precision"),
        "config": config_to_dict(cfg),
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.1f}"


def _precision_text(recorded: dict | None) -> str:
    """'segmenter fp32' (and the CLIP teacher's, when there is one) from a checkpoint's precision entry."""
    if not recorded:
        return "not recorded"
    text = f"segmenter {recorded.get('model')}"
    return text + (f", teacher {recorded['teacher']}" if recorded.get("teacher") else "")


def _inference_text(eval_cfg: dict) -> str:
    """How the held-out scenes were predicted, e.g. 'whole image, scales 1 and 1.5, with horizontal flips (...)'."""
    scales = [float(s) for s in eval_cfg["scales"]]
    text = f"{eval_cfg['mode']} image" if eval_cfg["mode"] == "whole" else "sliding window"
    if scales != [1.0]:
        text += ", scales " + " and ".join(f"{s:g}" for s in scales)
    if eval_cfg["flip"]:
        text += ", with horizontal flips"
    if scales != [1.0] or eval_cfg["flip"]:
        text += " (test-time augmentation: class probabilities averaged)"
    return text


def _report_markdown(report: dict, classes) -> str:
    s = report["settings"]
    first = report["first_run_timings_s"]
    lines = [
        "# carbseg demo report",
        "",
        f"> **{TEACHER_NOTE}.** The numbers below show that the pipeline (image-level labels -> pseudo-masks ->",
        "> GLV + CARB training -> evaluation) works end to end; they say nothing about CLIP on real data.",
        "",
        f"- test mIoU of the trained segmenter: **{_percent(report['miou'])}** "
        f"({report['num_images']} test scenes, never used for any choice), pixel accuracy "
        f"{_percent(report['pixel_acc'])}; on the validation scenes the settings were chosen on: "
        f"{_percent(report['val_miou'])}",
        f"- pseudo-mask mIoU of the simulated teacher against the ground truth (training scenes): "
        f"{_percent(report['pseudo_mask_miou'])}",
        f"- scenes: {s['num_train']} training, {s['num_val']} validation, {s['num_test']} test, "
        f"{s['width']}x{s['height']} pixels; "
        f"{report['config']['train']['max_iters']} iterations (warm-up {report['config']['train']['warmup_iters']}); "
        f"{s['threads']} CPU thread(s)",
        f"- inference on the test scenes: {_inference_text(report['config']['eval'])}",
        f"- measured on: {report['machine']}; training precision: {_precision_text(report['training_precision'])}",
        "- time per stage (s, first run): " + ", ".join(f"{k} {v:.0f}" for k, v in first.items())
        + f"; this invocation: {report['timings_s']['total']:.0f} s wall, {report['timings_s']['cpu_total']:.0f} s CPU"
        + (f" (reused: {', '.join(report['reused_stages'])})" if report["reused_stages"] else ""),
        "",
        "## Test scenes",
        "",
        "![image | pseudo-mask | prediction | ground truth](scenes.png)",
        "",
        "Columns: the image, the simulated teacher's pseudo-mask, the segmenter's prediction, the ground truth.",
        "",
        "## Learning curve",
        "",
        "![loss terms and validation mIoU](learning_curve.png)",
        "",
        "Top: the CARB loss terms (during the warm-up, plain cross-entropy on the global view and the GLV",
        "patch; afterwards the consistent and c-scaled inconsistent regions). Bottom: validation mIoU.",
        "",
        "## Per-class IoU (test scenes)",
        "",
        "| class | IoU (%), test scenes | pseudo-mask IoU (%), training scenes |",
        "|---|---:|---:|",
    ]
    for name in classes.names:
        lines.append(f"| {name} | {_percent(report['iou'].get(name))} | {_percent(report['pseudo_mask_iou'].get(name))} |")
    lines += ["", "n/a: the class is absent from both ground truth and prediction.", "",
              "More pictures (IoU bars, confusion matrix, best and worst scenes): [evaluation/report.md]"
              "(evaluation/report.md). Every test scene, to sort by what went wrong and look at layer by layer "
              "(prediction, ground truth, error map, teacher, CARB's regions): [html/index.html](html/index.html), "
              "opened in a browser. The training run (config, checkpoints, `log.jsonl`, TensorBoard) is in `run/`.",
              ""]
    return "\n".join(lines)


def _save_scene_grid(path: Path, samples: list, mask_dir: Path, classes) -> None:
    """Rows of image | pseudo-mask | prediction | ground truth for a few test scenes."""
    from carbseg.engine.report import KEY_HEIGHT
    from carbseg.io import read_label_png
    from carbseg.visualize import below, colorize, legend, make_grid, present_classes, save_png

    rows, masks = [], []
    for sample in samples:
        pseudo = read_label_png(mask_dir / f"{sample.id}.png").astype(np.uint8)
        rows.append([sample.image, colorize(pseudo, classes), colorize(sample.pred, classes),
                     colorize(sample.mask, classes)])
        masks += [pseudo, sample.pred, sample.mask]
    grid = make_grid(rows, ["image", "pseudo-mask (simulated teacher)", "prediction", "ground truth"])
    present = present_classes(*masks, classes=classes)
    save_png(path, below(grid, [legend(classes, present, max_height=KEY_HEIGHT)]))
