"""The CamVid study (studies/camvid): its configs load, the runner prints and skips the right commands."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carbseg.config import load_config
from carbseg.io import read_label_png

STUDY_DIR = Path(__file__).resolve().parents[1] / "studies" / "camvid"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"camvid_study_{name}", STUDY_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_study = _module("run_study")
summarize = _module("summarize")


def test_base_config_is_the_documented_setting():
    cfg = load_config(STUDY_DIR / "base.yaml")
    assert (cfg.data.dataset, cfg.teacher.kind) == ("camvid", "simulated")
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.model.classifier) == ("efficientnet_lite0", "imagenet", "learned")
    assert cfg.data.crop_size == [180, 240] and cfg.glv.patch_size == [128, 64]
    assert (cfg.glv.scale_offset, cfg.glv.scale_rate) == (0.5, 2.0)  # s ~ U[0.5, 2.5), the paper's CamVid range
    assert cfg.train.warmup_iters * 3 == pytest.approx(cfg.train.max_iters, rel=0.05)


@pytest.mark.parametrize(
    ("variant", "glv", "carb", "single_path"),
    [("global_ce", False, False, False), ("glv", True, False, False), ("glv_carb", True, True, False),
     ("gt_upper_bound", False, False, True), ("single_ce", False, False, True), ("single_carb", False, True, True)],
)
def test_every_variant_loads_with_its_overrides(tmp_path, variant, glv, carb, single_path):
    study = run_study.Study("data/camvid", str(tmp_path), seeds=[3], variants=[variant], dry_run=True)
    cfg = load_config(study.study["base"], study.overrides(variant, 3))
    assert (cfg.glv.enabled, cfg.carb.enabled, cfg.seed, cfg.data.root) == (glv, carb, 3, "data/camvid")
    assert (cfg.data.pseudo_masks is not None) == single_path
    if single_path:
        expected = "gt_train_ids" if variant == "gt_upper_bound" else "teacher_train_cell16"
        assert Path(cfg.data.pseudo_masks).name == expected


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, str(STUDY_DIR / "run_study.py"), "all", "--root", "data/camvid", "--work", str(work),
         "--dry-run"],
        capture_output=True, text=True, check=True,
    )
    lines = result.stdout.splitlines()
    trains = [line for line in lines if line.startswith("carbseg train")]
    evals = [line for line in lines if line.startswith("carbseg evaluate") and "--checkpoint" in line]
    assert len(trains) == len(evals) == 4 * 2  # 4 variants x seeds 0, 1
    assert trains[0].endswith(f"glv.enabled=false carb.enabled=false seed=0 --out {work}/runs/global_ce_seed0")
    assert "data.pseudo_masks=" in trains[3] and trains[3].endswith("gt_upper_bound_seed0")
    assert sum("carbseg pseudo-masks" in line and "--teacher simulated" in line for line in lines) == 2  # 16, 8 px
    assert not work.exists()


def test_finished_steps_are_skipped_and_interrupted_runs_resumed(tmp_path, capsys):
    study = run_study.Study("data/camvid", str(tmp_path), seeds=[0], variants=["glv", "glv_carb"], dry_run=True)
    done = study.run_dir("glv", 0)
    done.mkdir(parents=True)
    (done / "model.safetensors").write_bytes(b"")
    (done / "val.json").write_text("{}")
    stopped = study.run_dir("glv_carb", 0)
    stopped.mkdir(parents=True)
    (stopped / "checkpoint_last.pt").write_bytes(b"")
    study.train()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# done, skipped: carbseg train") and out[1].startswith("# done, skipped: carbseg eval")
    assert out[2].startswith("carbseg train") and out[2].endswith("--resume")
    assert out[3].startswith("carbseg evaluate")


def test_gt_train_ids_map_void_to_ignore(tmp_path):
    root = tmp_path / "camvid"
    for folder in ("train", "trainannot"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(root / "train" / "a.png")
    raw = np.array([[0, 1, 2, 3, 10, 11]] * 4, np.uint8)
    Image.fromarray(raw).save(root / "trainannot" / "a.png")
    assert run_study.write_gt_train_ids(str(root), tmp_path / "gt") == 1
    np.testing.assert_array_equal(read_label_png(tmp_path / "gt" / "a.png")[0], [0, 1, 2, 3, 10, 255])
    assert run_study.write_gt_train_ids(str(root), tmp_path / "gt") == 0  # resumable: nothing rewritten


def test_summary_tables_mean_spread_and_small_classes(tmp_path):
    names = summarize.CLASS_NAMES
    for seed, miou in ((0, 40.0), (1, 43.0)):
        run = tmp_path / "runs" / f"glv_seed{seed}"
        run.mkdir(parents=True)
        iou = {c: float(i + seed) for i, c in enumerate(names)}  # pole = 2 + seed, signsymbol = 6 + seed, ...
        (run / "val.json").write_text(json.dumps({"miou": miou, "iou": iou, "pixel_acc": 80.0, "num_images": 2}))
    results = summarize.collect(tmp_path, ["glv", "glv_carb"], [0, 1])
    assert list(results) == ["glv"] and sorted(results["glv"]) == [0, 1]
    assert summarize.mean_and_spread([40.0, 43.0]) == (41.5, 3.0)
    text = summarize.markdown_tables(tmp_path, results, [0, 1])
    # sample standard deviation of 40 and 43: sqrt(((1.5)^2 * 2) / 1) = 2.12
    assert "| + GLV | 40.0 | 43.0 | **41.5** | 2.1 | 3.0 |" in text
    # small classes pole (2.5), signsymbol (6.5), pedestrian (9.5), bicyclist (10.5): mean 7.25
    assert "| **2.5** |" in text and text.rstrip().endswith("| **7.2** |")
    # one seed: a mean, but no standard deviation and no spread
    one = summarize.markdown_tables(tmp_path, {"glv": {0: results["glv"][0]}}, [0, 1])
    assert "| + GLV | 40.0 | – | **40.0** | – | – |" in one


@pytest.mark.parametrize(
    ("variant", "glv", "carb", "single_path"),
    [("gt_upper_bound", False, False, "gt_train_ids"), ("proxy_ce", False, False, None),
     ("proxy_glv", True, False, None), ("proxy_glv_carb", True, True, None),
     ("proxy_single_ce", False, False, "proxy_train"), ("proxy_single_carb", False, True, "proxy_train"),
     ("proxy_glv_patch_large", True, False, None), ("proxy_carb", False, True, None)],
)
def test_proxy_study_variants_use_the_proxy_teacher_and_a_third_warmup(tmp_path, variant, glv, carb, single_path):
    study = run_study.Study("data/camvid", str(tmp_path), seeds=[2], variants=[variant], dry_run=True,
                            study=run_study.load_study(STUDY_DIR / "proxy_study.yaml"))
    cfg = load_config(study.study["base"], study.overrides(variant, 2))
    assert (cfg.teacher.kind, cfg.glv.enabled, cfg.carb.enabled, cfg.seed) == ("proxy", glv, carb, 2)
    assert cfg.teacher.proxy_weights.endswith("proxy_teacher.safetensors")
    assert (cfg.data.pseudo_masks or "").endswith(single_path or "") and bool(cfg.data.pseudo_masks) == bool(single_path)
    assert cfg.train.warmup_iters * 3 == cfg.train.max_iters and cfg.carb.coeff == 1.0
    if glv:
        assert (cfg.glv.scale_offset, cfg.glv.scale_rate) == (1.0, 2.0)
    assert list(cfg.glv.patch_size) == ([240, 160] if variant == "proxy_glv_patch_large" else [170, 85])


def test_proxy_study_prepare_fits_then_scores_without_the_fit_set(tmp_path, capsys):
    assert run_study.main(["prepare", "--study", str(STUDY_DIR / "proxy_study.yaml"), "--root", "data/camvid",
                           "--work", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("carbseg fit-proxy-teacher") and "--num-images 12" in lines[0]
    evaluations = [line for line in lines if line.startswith("carbseg evaluate")]
    assert len(evaluations) == 2 and all("--exclude-fit-set" in line for line in evaluations)


def test_carb_bookkeeping_reads_the_log_once_per_iteration(tmp_path):
    # Iteration 30 logged twice (a run killed after logging it, resumed from 20): the last record counts.
    rows = [{"iteration": 10, "c": 1.0, "consistent_share": 0.9, "total": 3.0},
            {"iteration": 20, "c": 0.5, "consistent_share": 0.8, "total": 2.0},
            {"iteration": 30, "c": 9.0, "consistent_share": 0.1, "total": 9.0},
            {"iteration": 30, "c": 0.3, "consistent_share": 0.6, "total": 1.0}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    got = summarize.carb_bookkeeping(tmp_path, warmup_iters=10)
    assert got == pytest.approx({"consistent_share": 0.7, "c": 0.4, "final_total": 1.0})
    assert summarize.carb_bookkeeping(tmp_path / "absent", warmup_iters=10) is None


@pytest.mark.parametrize("single_path", [False, True], ids=["online_glv", "single_path"])
def test_shared_warmup_branches_equal_runs_trained_from_scratch(tmp_path, capsys, single_path):
    # GLV alone and GLV + CARB (or, on the single path, CE and CARB on fixed pseudo-masks) take the same
    # steps until CARB's warm-up ends; the runner trains that warm-up once, copies it and resumes each
    # variant with its own overrides. Both branches must be bit-identical to the same variants trained
    # from scratch.
    import shutil

    import torch
    import yaml
    from safetensors.torch import load_file

    from carbseg.cli import main
    from carbseg.data.synthetic import generate_synthetic_dataset

    scenes = tmp_path / "scenes"
    generate_synthetic_dataset(scenes, "train", 6, 64, 128, seed=1, progress=False)
    generate_synthetic_dataset(scenes, "val", 2, 64, 128, seed=1, progress=False)
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump({
        "name": "tiny", "seed": 7, "device": "cpu",
        "data": {"dataset": "synthetic", "crop_size": [32, 64], "scale_size": [64, 128], "batch_size": 2,
                 "num_workers": 0},
        "teacher": {"kind": "simulated", "grid_cell": 8, "noise": 0.3},
        "model": {"backbone": "tiny", "pretrained": "none", "classifier": "learned", "head_channels": 16,
                  "aspp_dilations": [1, 2, 3, 4]},
        "glv": {"enabled": True, "patch_size": [16, 32], "scale_offset": 1.0, "scale_rate": 1.0},
        # Validation every 2 iterations: the warm-up run also validates where it stops (3), which the
        # straight runs do not; validation must not change what training does.
        "train": {"max_iters": 7, "warmup_iters": 3, "eval_interval": 2, "log_interval": 1,
                  "checkpoint_interval": 100},
    }))
    common = []
    if single_path:  # fixed offline pseudo-masks (here the GT masks copied), no online teacher, no GLV
        shutil.copytree(scenes / "masks" / "train", tmp_path / "pseudo")
        common = [f"data.pseudo_masks={tmp_path / 'pseudo'}", "glv.enabled=false"]
    variants = {"glv": [*common, "carb.enabled=false"], "glv_carb": [*common, "carb.enabled=true"]}
    study = {"base": str(base), "seeds": [0], "common": [], "variants": variants,
             "shared_warmup": {"glv_warmup": {"variant": "glv_carb", "branches": ["glv", "glv_carb"]}}}

    def run_in_process(self, cmd, done=None):
        if done is not None and done.exists():
            return
        if cmd[1] == "train":  # the runner's evaluate step needs CamVid: not part of this check
            assert main([*cmd[1:], "--no-progress"]) == 0

    branched = run_study.Study(str(scenes), str(tmp_path / "branched"), [0], None, False, study=study)
    branched.run = run_in_process.__get__(branched)
    branched.train()
    warmup = branched.run_dir("glv_warmup", 0)
    assert json.loads((warmup / "log.jsonl").read_text().splitlines()[-1])["iteration"] == 3
    for variant, overrides in variants.items():
        straight = tmp_path / f"straight_{variant}"
        assert main(["train", "--config", str(base), "--out", str(straight), "--no-progress",
                     f"data.root={scenes}", *overrides, "seed=0"]) == 0
        a = load_file(straight / "model.safetensors")
        b = load_file(branched.run_dir(variant, 0) / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), variant
        logged = [json.loads(line) for line in (branched.run_dir(variant, 0) / "log.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in logged] == list(range(1, 8))  # the warm-up's lines, then its own
    # CARB really acted after the warm-up (else the check above would be vacuous): c != 1 from iteration 4.
    carb_log = [json.loads(line) for line in (branched.run_dir("glv_carb", 0) / "log.jsonl").read_text().splitlines()]
    assert carb_log[2]["c"] == 1.0 and all(r["c"] != 1.0 for r in carb_log[3:])
    models = [(tmp_path / f"straight_{v}" / "model.safetensors").read_bytes() for v in variants]
    assert models[0] != models[1]


def test_validation_curves_read_per_class_iou_from_the_log(tmp_path):
    run = tmp_path / "runs" / "gt_seed0"
    run.mkdir(parents=True)
    small = {"pole": 9.9, "signsymbol": 10.0, "pedestrian": 30.0, "bicyclist": 12.5}
    records = [{"iteration": 1, "total": 2.0},  # not a validation point
               {"iteration": 2, "val_miou": 40.0, **{f"val_iou.{c}": v for c, v in small.items()}},
               {"iteration": 3, "val_miou": 41.0, **{f"val_iou.{c}": v + 0.1 for c, v in small.items()}}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = summarize.validation_curves(tmp_path, ["gt", "absent"], [0])
    assert list(curves) == ["gt_seed0"] and [r["iteration"] for r in curves["gt_seed0"]] == [2, 3]
    rows = summarize.curves_table(curves).splitlines()[2:]
    assert rows == ["| gt_seed0 | 2 | 40.0 | 9.9 | 10.0 | 30.0 | 12.5 | no |",  # pole 9.9 < 10
                    "| gt_seed0 | 3 | 41.0 | 10.0 | 10.1 | 30.1 | 12.6 | yes |"]


def test_carb_runs_are_found_by_their_own_config_and_plotted(tmp_path):
    # The warm-up differs between studies (and follow-ups): it is read from each run's config.yaml.
    from carbseg.config import dump_config, load_config

    base = STUDY_DIR / "base.yaml"
    for name, overrides in {"carb": ["carb.enabled=true", "train.warmup_iters=40"],
                            "plain": ["carb.enabled=false", "train.warmup_iters=40"]}.items():
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(dump_config(load_config(base, overrides)))
        rows = [{"iteration": i, "c": 1.0 if i <= 40 else 0.1, "consistent_share": 0.7} for i in (20, 40, 60)]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert summarize.carb_warmup(tmp_path / "carb") == 40
    assert summarize.carb_warmup(tmp_path / "plain") is None and summarize.carb_warmup(tmp_path / "none") is None
    assert summarize.carb_bookkeeping(tmp_path / "carb", 40) == pytest.approx(
        {"consistent_share": 0.7, "c": 0.1, "final_total": float("nan")}, nan_ok=True)
    path = summarize.plot_carb({"carb_seed0": (tmp_path / "carb", 40)}, tmp_path / "plots")
    assert path.name == "carb_over_training.png" and path.stat().st_size > 1000


def test_wall_time_sums_the_sessions_of_a_run_from_tensorboard_event_times(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "runs" / "proxy_glv_seed0"
    # Session 1: steps 10..50 every 2 s per step (the first log interval, 20 s, is counted at the
    # session's pace); session 2 resumed at 40: steps 50..70 at 3 s per step. File names start
    # with the creation time, so a later session sorts after an earlier one.
    for name, steps, pace, start in (("events.out.tfevents.1000.a", range(10, 60, 10), 2.0, 1000.0),
                                     ("events.out.tfevents.2000.a", range(50, 80, 10), 3.0, 2000.0)):
        writer = SummaryWriter(str(tmp_path / "tmp" / name))
        for step in steps:
            writer.add_scalar("total", 1.0, step, walltime=start + pace * step)
        writer.close()
        (run / "tb").mkdir(parents=True, exist_ok=True)
        (tmp_path / "tmp" / name).glob("events*").__next__().rename(run / "tb" / name)
    seconds, steps, sessions = summarize.training_wall_time(run)
    assert (steps, sessions) == (70, 2)
    assert seconds == pytest.approx((80 + 20) + (60 + 30))
    table = summarize.wall_time_table(tmp_path, ["proxy_glv"], [0, 1])
    assert "| proxy_glv_seed0 | 70 | 0 h 03 min | 2 | 0.368 |" in table and "seed1" not in table


def test_the_teacher_alone_is_the_proxy_in_a_proxy_study_and_the_simulated_one_otherwise(tmp_path):
    assert summarize.teacher_alone_on_val(tmp_path) == ("simulated teacher", None)
    (tmp_path / "teacher_val_cell16.json").write_text(json.dumps({"miou": 46.5}))
    assert summarize.teacher_alone_on_val(tmp_path) == ("simulated teacher", {"miou": 46.5})
    (tmp_path / "proxy_val.json").write_text(json.dumps({"miou": 46.0}))
    assert summarize.teacher_alone_on_val(tmp_path) == ("proxy teacher", {"miou": 46.0})


def test_seed_statistics_and_paired_differences_by_hand(tmp_path):
    """Two seeds of CE and GLV, one of GLV + CARB: means ± sample std and per-seed paired differences."""
    names = summarize.CLASS_NAMES

    def report(miou, pedestrian, bicyclist, pole=0.0, signsymbol=0.0):
        iou = {c: 50.0 for c in names}
        iou.update(pole=pole, signsymbol=signsymbol, pedestrian=pedestrian, bicyclist=bicyclist)
        return {"miou": miou, "iou": iou}

    results = {"proxy_ce": {0: report(48.0, 16.0, 34.0), 1: report(50.0, 20.0, 30.0)},
               "proxy_glv": {0: report(44.0, 12.0, 6.0), 1: report(45.0, 14.0, 10.0, pole=4.0)},
               "proxy_glv_carb": {1: report(40.0, 10.0, 0.0)}}
    table = summarize.seed_statistics_table(results)
    # CE mIoU 48, 50: mean 49, std sqrt(2) = 1.41; small-class means (0+0+16+34)/4 = 12.5 and 12.5;
    # pedestrian/bicyclist mean 25 and 25.
    assert "| proxy teacher, global CE only | 0, 1 | 49.0 ± 1.4 | 12.5 ± 0.0 | 25.0 ± 0.0 |" in table
    # GLV small-class means 18/4 = 4.5 and 28/4 = 7.0: mean 5.75, std 1.77; pedestrian/bicyclist mean
    # 18/2 = 9 and 24/2 = 12: mean 10.5, std 2.12
    assert "| proxy teacher, + GLV | 0, 1 | 44.5 ± 0.7 | 5.8 ± 1.8 | 10.5 ± 2.1 |" in table
    assert "| proxy teacher, + GLV + CARB | 1 | 40.0 (one seed) | 2.5 (one seed) | 5.0 (one seed) |" in table
    paired = summarize.paired_differences_table(results)
    rows = paired.splitlines()[2:]
    # GLV - CE per seed: mIoU -4, -5 (mean -4.5, std 0.71); small mean 4.5-12.5 = -8, 7-12.5 = -5.5;
    # pedestrian/bicyclist mean 9-25 = -16, 12-25 = -13.
    assert rows[0] == ("| proxy teacher, + GLV vs proxy teacher, global CE only | 0, 1 | -4.0, -5.0 | -4.5 ± 0.7 "
                       "| -8.0, -5.5 | -6.8 ± 1.8 | -16.0, -13.0 | -14.5 ± 2.1 |")
    # GLV + CARB has seed 1 only: paired with GLV (40 - 45) and with CE (40 - 50) on that seed.
    assert rows[1].startswith("| proxy teacher, + GLV + CARB vs proxy teacher, + GLV | 1 | -5.0 | -5.0 (one seed) |")
    assert rows[2].startswith("| proxy teacher, + GLV + CARB vs proxy teacher, global CE only | 1 | -10.0 |")
    assert len(rows) == 3
    assert summarize.paired_differences_table({"proxy_glv": results["proxy_glv"]}) == ""


def test_summarize_writes_the_tables_it_prints_to_tables_md(tmp_path, capsys):
    # The study document links docs/.../tables.md: it must hold exactly what summarize printed.
    names = summarize.CLASS_NAMES
    for variant, miou in (("gt_upper_bound", 55.0), ("proxy_ce", 48.0)):
        run = tmp_path / "runs" / f"{variant}_seed0"
        run.mkdir(parents=True)
        iou = {c: 10.0 for c in names}
        (run / "val.json").write_text(json.dumps({"miou": miou, "iou": iou, "pixel_acc": 80.0, "num_images": 2}))
    study = run_study.Study("unused", str(tmp_path), [0], ["gt_upper_bound", "proxy_ce"], dry_run=True,
                            study=run_study.load_study(STUDY_DIR / "proxy_study.yaml"))
    text = summarize.summarize(study, tmp_path / "docs")
    written = (tmp_path / "docs" / "tables.md").read_text()
    assert written.startswith("# CamVid study tables (generated")
    assert "seeds: 0" in written and "gt_upper_bound, proxy_ce" in written
    assert text.strip() in written
    assert "| 55.0 |" in written and "| 48.0 |" in written
    assert f"wrote {tmp_path / 'docs' / 'tables.md'}" in capsys.readouterr().out
