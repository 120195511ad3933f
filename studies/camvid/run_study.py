"""Runner of the CamVid study (docs/study_camvid.md): prepare, train, evaluate, summarize.

Every step is a ``carbseg`` command (printed before it runs, and by ``--dry-run`` instead of running)
and is skipped when its output exists, so the runner can be restarted at any time; an interrupted
training run continues with ``--resume``. Runs, pseudo-masks and reports go to ``--work`` (never into
the repository); ``summarize`` writes the tables and plots of the document.

The teacher is the SIMULATED one: it reads the ground truth (a research instrument, not weak
supervision). Typical use (from the project root, one queue per seed on a 2-core machine):

    python studies/camvid/run_study.py all --root ../shared/data/camvid --work runs/study_camvid --seeds 0
    python studies/camvid/run_study.py summarize --work runs/study_camvid --docs docs/study_camvid
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

STUDY_DIR = Path(__file__).resolve().parent
STUDY_FILE = STUDY_DIR / "study.yaml"


def load_study(path: Path = STUDY_FILE) -> dict:
    """The study file: base config, seeds and the overrides of every variant."""
    study = yaml.safe_load(path.read_text(encoding="utf-8"))
    study["base"] = str(path.parent / study["base"])
    return study


def print_json_report(result: dict, path: str | None) -> int:
    """A study tool's result: printed as JSON and, with ``path``, written there atomically; exit code 0."""
    import json

    from carbseg.io import write_text_atomic

    text = json.dumps(result, indent=1)
    if path:
        write_text_atomic(path, text)
    print(text)
    return 0


def _rel(path: Path | str) -> str:
    """A path as written in the printed commands: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Study:
    def __init__(self, root: str, work: str, seeds: list[int] | None, variants: list[str] | None,
                 dry_run: bool, study: dict | None = None):
        self.study = study or load_study()
        self.root = root
        self.work = Path(work)
        self.seeds = seeds if seeds else list(self.study["seeds"])
        # The main ablation by default; the follow-up variants on request (--variants).
        self.all_variants = {**self.study["variants"], **self.study.get("followup", {})}
        self.variants = variants if variants else list(self.study["variants"])
        unknown = [v for v in self.variants if v not in self.all_variants]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(self.all_variants)}")
        self.dry_run = dry_run
        self.gt_masks = self.work / "gt_train_ids"
        self.labels = {split: self.work / f"labels_{split}.json" for split in ("train", "val")}
        # The proxy-teacher study (proxy_study.yaml): its fitted weights and offline masks.
        self.proxy = self.study.get("proxy")
        self.proxy_weights = self.work / "proxy_teacher.safetensors"
        self.proxy_masks = self.work / "proxy_train"

    # ------------------------------------------------------------------ helpers
    def run(self, cmd: list[str], done: Path | None = None) -> None:
        """Print ``cmd``; run it unless dry-run or ``done`` exists (resumability)."""
        line = " ".join(shlex.quote(c) for c in cmd)
        if done is not None and done.exists():
            print(f"# done, skipped: {line}", flush=True)
            return
        print(line, flush=True)
        if not self.dry_run:
            subprocess.run(cmd, check=True)

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.work / "runs" / f"{variant}_seed{seed}"

    def overrides(self, variant: str | None, seed: int) -> list[str]:
        """``carbseg train``'s overrides of the base config for ``variant`` (None: the common ones only)."""
        places = {"gt_masks": _rel(self.gt_masks), "teacher_masks": _rel(self.work / "teacher_train_cell16"),
                  "proxy_weights": _rel(self.proxy_weights), "proxy_masks": _rel(self.proxy_masks)}
        own = self.all_variants[variant] if variant is not None else []
        values = [o.format(**places) for o in [*self.study.get("common", []), *own]]
        return [f"data.root={self.root}", *values, f"seed={seed}"]

    # ------------------------------------------------------------------ steps
    def prepare(self) -> None:
        """Image-level labels, the teacher's pseudo-masks on val (and, for the proxy teacher, on train)
        and the GT train ids."""
        if self.proxy:
            self.prepare_proxy()
        else:
            self.teacher_quality("val")
        # GT upper bound: the ground truth as train ids (void = 255) for the single path.
        print(f"# write ground-truth train ids of the train split to {_rel(self.gt_masks)}", flush=True)
        if not self.dry_run:
            write_gt_train_ids(self.root, self.gt_masks)

    def prepare_proxy(self) -> None:
        """Fit the proxy teacher on a few train images, then its pseudo-masks on train (the single path
        reads them; fit images get none) and val, each scored against the GT without the fit set."""
        self.run(["carbseg", "fit-proxy-teacher", "--dataset", "camvid", "--root", self.root, "--split", "train",
                  "--num-images", str(self.proxy["num_images"]), "--seed", str(self.proxy["seed"]),
                  "--out", _rel(self.proxy_weights), "--no-progress"], done=self.proxy_weights)
        for split in ("train", "val"):
            path = self.labels[split]
            self.run(["carbseg", "labels", "--dataset", "camvid", "--root", self.root, "--split", split,
                      "--out", _rel(path), "--no-progress"], done=path)
            out = self.proxy_masks if split == "train" else self.work / f"proxy_{split}"
            report = self.work / f"proxy_{split}.json"
            self.run(["carbseg", "pseudo-masks", "--dataset", "camvid", "--root", self.root, "--split", split,
                      "--labels", _rel(path), "--teacher", "proxy", "--proxy-weights", _rel(self.proxy_weights),
                      "--out", _rel(out), "--no-progress"], done=report)
            self.run(["carbseg", "evaluate", "--dataset", "camvid", "--root", self.root, "--split", split,
                      "--pred", _rel(out), "--exclude-fit-set", _rel(self.proxy_weights), "--json", _rel(report),
                      "--no-progress"], done=report)

    def teacher_quality(self, split: str) -> None:
        """Pseudo-masks of the simulated teacher on ``split``, scored against its ground truth."""
        path = self.labels[split]
        self.run(["carbseg", "labels", "--dataset", "camvid", "--root", self.root, "--split", split,
                  "--out", _rel(path)], done=path)
        # The global view's 16-px grid, and a 2x zoomed view (= an 8-px grid: what the GLV local
        # patch sees at s = 2).
        for cell in (16, 8):
            out = self.work / f"teacher_{split}_cell{cell}"
            report = self.work / f"teacher_{split}_cell{cell}.json"
            self.run(["carbseg", "pseudo-masks", "--dataset", "camvid", "--root", self.root, "--split", split,
                      "--labels", _rel(self.labels[split]), "--teacher", "simulated",
                      "--patch-size", str(cell), "--noise", "0.3", "--out", _rel(out), "--no-progress"],
                     done=report)
            self.run(["carbseg", "evaluate", "--dataset", "camvid", "--root", self.root, "--split", split,
                      "--pred", _rel(out), "--json", _rel(report)], done=report)

    def shared_warmup_of(self, variant: str) -> tuple[str, dict] | None:
        """The shared warm-up group ``variant`` branches from, if any (``shared_warmup`` in the study file)."""
        for name, group in (self.study.get("shared_warmup") or {}).items():
            if variant in group["branches"]:
                return name, group
        return None

    def train_warmup_branch(self, variant: str, seed: int, out: Path) -> None:
        """Start ``out`` from the group's shared warm-up instead of from scratch.

        Variants that differ only in what happens after ``train.warmup_iters`` (GLV alone and GLV +
        CARB: CARB is plain CE during its warm-up and pushes nothing into its queue) take identical
        steps until then, so one run to the end of the warm-up, copied and resumed with each variant's
        own overrides, gives bit-for-bit the runs trained from scratch (tests/test_study_configs.py)
        and saves a third of each run but one.
        """
        name, group = self.shared_warmup_of(variant)
        warmup = self.run_dir(name, seed)
        cfg_overrides = self.overrides(group["variant"], seed)
        stop = _warmup_iters(self.study["base"], cfg_overrides)
        cmd = ["carbseg", "train", "--config", _rel(self.study["base"]), *cfg_overrides,
               "--out", _rel(warmup), "--max-iters", str(stop)]
        if not (warmup / "model.safetensors").is_file():
            if (warmup / "checkpoint_last.pt").is_file():
                cmd.append("--resume")
            elif warmup.is_dir() and not self.dry_run:
                shutil.rmtree(warmup)
        self.run(cmd, done=warmup / "model.safetensors")
        print(f"# branch {_rel(out)} from the shared warm-up {_rel(warmup)} (iteration {stop})", flush=True)
        if not self.dry_run:
            if out.is_dir():
                shutil.rmtree(out)
            staging = out.with_name(out.name + ".copying")
            shutil.rmtree(staging, ignore_errors=True)
            # The warm-up's model file is not this run's result: leave it behind, so the branch
            # counts as unfinished until it has trained to its own end.
            shutil.copytree(warmup, staging, ignore=shutil.ignore_patterns("model.safetensors", "val.json"))
            staging.rename(out)

    def train(self) -> None:
        for seed in self.seeds:
            for variant in self.variants:
                out = self.run_dir(variant, seed)
                cmd = ["carbseg", "train", "--config", _rel(self.study["base"]), *self.overrides(variant, seed),
                       "--out", _rel(out)]
                if not (out / "model.safetensors").is_file():
                    if not (out / "checkpoint_last.pt").is_file() and self.shared_warmup_of(variant):
                        self.train_warmup_branch(variant, seed, out)
                    if (out / "checkpoint_last.pt").is_file() or (self.dry_run and self.shared_warmup_of(variant)):
                        cmd.append("--resume")  # an interrupted run (or a branch) continues where it stopped
                    elif out.is_dir() and not self.dry_run:
                        shutil.rmtree(out)  # stopped before its first checkpoint: nothing to keep
                self.run(cmd, done=out / "model.safetensors")
                self.run(["carbseg", "evaluate", "--dataset", "camvid", "--root", self.root, "--split", "val",
                          "--checkpoint", _rel(out / "model.safetensors"), "--device", "cpu",
                          "--json", _rel(out / "val.json")], done=out / "val.json")


def _warmup_iters(base: str, overrides: list[str]) -> int:
    """``train.warmup_iters`` of the base config under ``overrides`` (read the way carbseg train reads it)."""
    from carbseg.config import load_config

    return int(load_config(base, overrides).train.warmup_iters)


def write_gt_train_ids(root: str, out: Path) -> int:
    """DIR/IMAGE_ID.png with the train split's ground truth in train ids (the single path reads them)."""
    from carbseg.data.datasets import build_dataset
    from carbseg.io import write_png_atomic

    dataset = build_dataset("camvid", root, "train")
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for index, image_id in enumerate(dataset.ids):
        path = out / f"{image_id}.png"
        if path.is_file():
            continue
        image = dataset.load_image(index)
        write_png_atomic(path, dataset.load_mask(index, image.shape[:2]))
        written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("prepare", "train", "all", "teacher-train", "summarize"),
                        help="prepare (labels, teacher on val, GT ids), train (+ evaluate), all (both), "
                             "teacher-train (teacher quality on the train split), summarize (tables, plots)")
    parser.add_argument("--root", default="../shared/data/camvid", help="CamVid root (SegNet layout)")
    parser.add_argument("--work", default="runs/study_camvid", help="runs, pseudo-masks, reports (not committed)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated seeds (default: the study file's)")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=None,
                        help="comma-separated variants (default: all of the study file's)")
    parser.add_argument("--docs", default="docs/study_camvid", help="summarize: folder of the plots")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--study", default=str(STUDY_FILE),
                        help="study file (default: study.yaml, the simulated teacher; proxy_study.yaml: the proxy)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per queue: 2 queues on a 2-core machine
    study = Study(args.root, args.work, args.seeds, args.variants, args.dry_run, study=load_study(Path(args.study)))
    if args.step in ("prepare", "all"):
        study.prepare()
    if args.step in ("train", "all"):
        study.train()
    if args.step == "teacher-train":
        study.teacher_quality("train")
    if args.step == "summarize":
        sys.path.insert(0, str(STUDY_DIR))
        from summarize import summarize  # studies/camvid/summarize.py

        summarize(study, Path(args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
