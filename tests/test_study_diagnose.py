"""studies/camvid/diagnose.py: CARB's region split counted against the ground truth, on a run's own batches."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

STUDY_DIR = Path(__file__).resolve().parents[1] / "studies" / "camvid"


def _diagnose_module():
    spec = importlib.util.spec_from_file_location("camvid_study_diagnose", STUDY_DIR / "diagnose.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


diagnose = _diagnose_module()


def test_split_counts_by_hand():
    # pixel:      0    1    2    3    4    5
    teacher = torch.tensor([[0, 1, 1, 255, 1, 0]])
    model = torch.tensor([[0, 1, 0, 0, 0, 0]])
    gt = torch.tensor([[0, 1, 0, 1, 1, 255]])
    # 0: consistent, teacher right (class 0)     1: consistent, right (class 1)
    # 2: inconsistent, teacher wrong (class 0)   3: teacher ignores it: in no region
    # 4: inconsistent, teacher right (class 1): a correct label CARB scales down
    # 5: no ground truth: not scored
    counts = diagnose.SplitCounts(2)
    counts.update(teacher, model, gt)
    report = counts.report(["a", "b"])
    assert report["pixels"] == 4
    assert report["consistent_share"] == 0.5
    assert report["teacher_precision_consistent"] == 1.0
    assert report["teacher_precision_inconsistent"] == 0.5
    assert report["teacher_errors_in_inconsistent"] == 1.0
    assert report["right_labels_in_inconsistent"] == pytest.approx(1 / 3)
    assert report["per_class"]["a"] == {"pixels": 2, "inconsistent_share": 0.5, "teacher_right": 0.5,
                                        "right_labels_in_inconsistent": 0.0, "errors_in_inconsistent": 1.0}
    assert report["per_class"]["b"] == {"pixels": 2, "inconsistent_share": 0.5, "teacher_right": 1.0,
                                        "right_labels_in_inconsistent": 0.5, "errors_in_inconsistent": None}


def test_view_dependence_by_hand():
    # pixel:        0  1  2  3  4    5
    online = torch.tensor([[0, 1, 1, 0, 1, 255]])
    fixed = torch.tensor([[0, 0, 1, 1, 1, 0]])
    model = torch.tensor([[0, 1, 0, 0, 0, 0]])
    gt = torch.tensor([[0, 1, 1, 1, 1, 0]])
    # 0: consistent, online right, fixed shares it      1: consistent, right, fixed does not (class 1)
    # 2: inconsistent, right, fixed shares it (class 1)  3: online wrong: not counted
    # 4: inconsistent, right, fixed shares it (class 1)  5: online ignores it: in no region
    counts = diagnose.ViewDependence(2)
    counts.update(online, fixed, model, gt)
    report = counts.report(["a", "b"])
    assert report["right_labels_shared_by_fixed_masks"] == {"consistent": 0.5, "inconsistent": 1.0}
    assert report["per_class"] == {"a": {"consistent": 1.0, "inconsistent": None},
                                   "b": {"consistent": 0.0, "inconsistent": 1.0}}


def test_split_of_a_run_equals_a_direct_count_on_its_batches(tmp_path, tiny_clip):
    # A study whose teacher sees only pixels: the diagnostics must take the ground truth from a
    # second stream over the same views, and count exactly what CARB's own split gives.
    from carbseg.cli import main
    from carbseg.data.classes import IGNORE_INDEX
    from carbseg.data.synthetic import generate_synthetic_dataset
    from carbseg.engine.checkpoint import load_model
    from carbseg.engine.seeds import derive_seed
    from carbseg.engine.step import batch_to_device, segmenter_logits, teacher_views
    from carbseg.engine.train import build_training_inputs
    from carbseg.engine.train_data import BatchKey, TrainingSamples, collate
    from carbseg.losses.carb import region_masks, restricted_argmax

    scenes = tmp_path / "scenes"
    generate_synthetic_dataset(scenes, "train", 6, 64, 128, seed=1, progress=False)
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump({
        "name": "tiny", "seed": 0, "device": "cpu",
        "data": {"dataset": "synthetic", "crop_size": [64, 96], "scale_size": [64, 128], "batch_size": 2,
                 "num_workers": 0, "cat_max_ratio": 1.0},
        "teacher": tiny_clip,
        "model": {"backbone": "tiny", "pretrained": "none", "classifier": "learned", "head_channels": 16,
                  "aspp_dilations": [1, 2, 3, 4]},
        "glv": {"enabled": True, "patch_size": [32, 48], "scale_offset": 1.0, "scale_rate": 1.0},
        "train": {"max_iters": 2, "warmup_iters": 1, "eval_interval": 0, "checkpoint_interval": 100},
    }))
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({"base": base.name, "seeds": [0], "common": [],
                                          "variants": {"glv_carb": ["carb.enabled=true"]}}))
    run = tmp_path / "run"
    assert main(["train", "--config", str(base), "--out", str(run), "--no-progress", f"data.root={scenes}",
                 "carb.enabled=true"]) == 0
    checkpoint = str(run / "model.safetensors")
    out = tmp_path / "diag.json"
    assert diagnose.main(["--study", str(study_file), "--root", str(scenes), "--work", str(tmp_path),
                          "--variant", "glv_carb", "--batches", "2", "--checkpoint", checkpoint,
                          "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())

    # The reference: the trainer's batches, the GT read directly, CARB's regions counted by hand.
    cfg = diagnose.study_config(study_file, str(scenes), str(tmp_path), "glv_carb", 0)
    inputs = build_training_inputs(cfg, torch.device("cpu"), teacher_precision="fp32")
    assert not inputs.samples.read_gt  # the CLIP teacher never reads the ground truth
    gt_stream = TrainingSamples(inputs.samples.dataset, inputs.samples.image_labels, inputs.samples.augmentation,
                                seed=0, batch_size=2, read_gt=True)
    model = load_model(checkpoint).model.eval()
    consistent = scored = right_consistent = 0
    for iteration in range(2):
        keys = [BatchKey(iteration, 0, slot) for slot in range(2)]
        batch = batch_to_device(collate([inputs.samples[k] for k in keys]), torch.device("cpu"))
        gt_batch = collate([gt_stream[k] for k in keys])
        gt = gt_batch["masks"].masked_fill(~gt_batch["valid"], IGNORE_INDEX)
        generator = torch.Generator().manual_seed(derive_seed(0, iteration, 0, 0, 1))
        with torch.inference_mode():
            labels, patch, _ = teacher_views(inputs.teacher, batch, cfg, generator, single_path=False)
            logits, _ = segmenter_logits(model, batch["images"], patch)
        cons, incons = region_masks(labels, restricted_argmax(logits, batch["image_labels"]))
        has_gt = gt != IGNORE_INDEX
        consistent += int((cons & has_gt).sum())
        scored += int(((cons | incons) & has_gt).sum())
        right_consistent += int((cons & has_gt & (labels == gt)).sum())
    split = result["carb_split"][checkpoint]["global"]
    assert scored > 0 and split["pixels"] == scored
    assert split["consistent_share"] == pytest.approx(consistent / scored)
    assert split["teacher_precision_consistent"] == pytest.approx(right_consistent / max(consistent, 1))
    assert sum(c["pixels"] for c in split["per_class"].values()) == scored
    assert "patch" in result["carb_split"][checkpoint] and "glv_patch" in result
    # zoom s ~ U[1, 2): the patch labels are also scored in the bins [1, 1.5) and [1.5, 2) only
    bins = {k.removeprefix("glv_patch_s_") for k in result if k.startswith("glv_patch_s_")}
    assert bins and bins <= {"1_1.5", "1.5_2"}
    assert {f"global_in_patch_s_{b}" for b in bins} <= set(result)
    assert result["setup"] == {"study": "study.yaml", "variant": "glv_carb", "seed": 0, "batches": 2}

    # --fixed-masks: here the "offline pseudo-masks" are the ground truth itself, so on the same views
    # they must score 100 on every class present, be right in both regions of every model's split, and
    # leave the global split (online teacher) exactly as before.
    from carbseg.io import write_png_atomic

    fixed = tmp_path / "fixed"
    fixed.mkdir()
    dataset = inputs.samples.dataset
    for index, image_id in enumerate(dataset.ids):
        write_png_atomic(fixed / f"{image_id}.png", dataset.load_mask(index, dataset.load_image(index).shape[:2]))
    out_fixed = tmp_path / "diag_fixed.json"
    assert diagnose.main(["--study", str(study_file), "--root", str(scenes), "--work", str(tmp_path),
                          "--variant", "glv_carb", "--batches", "2", "--checkpoint", checkpoint,
                          "--fixed-masks", str(fixed), "--json", str(out_fixed), "--no-progress"]) == 0
    with_fixed = json.loads(out_fixed.read_text())
    present = [v for v in with_fixed["fixed_masks"]["iou"].values() if v is not None and v == v]
    assert present and all(v == pytest.approx(100.0) for v in present)
    split_fixed = with_fixed["carb_split"][checkpoint]["global_fixed"]
    assert split_fixed["pixels"] > 0 and split_fixed["teacher_errors_in_inconsistent"] is None
    assert split_fixed["teacher_precision_consistent"] == 1.0
    assert split_fixed["teacher_precision_inconsistent"] in (1.0, None)
    assert with_fixed["carb_split"][checkpoint]["global"] == split
    # the online labels against masks that are the ground truth: exactly the online labels' score
    agreement = with_fixed["online_vs_fixed"].pop("pixel_agreement")
    assert with_fixed["online_vs_fixed"] == with_fixed["global_view"] == result["global_view"]
    assert 0 < agreement < 1
    assert with_fixed["setup"]["fixed_masks"] == "fixed"
    # masks equal to the ground truth share every correct online label, in both regions
    shared = with_fixed["view_dependence"][checkpoint]["right_labels_shared_by_fixed_masks"]
    assert set(shared.values()) == {1.0} or set(shared.values()) == {1.0, None}


def test_single_path_variant_has_no_teacher_to_diagnose(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"dataset": "synthetic", "pseudo_masks": str(tmp_path)}}))
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({"base": base.name, "seeds": [0], "variants": {"single": []}}))
    assert diagnose.main(["--study", str(study_file), "--root", str(tmp_path), "--variant", "single",
                          "--no-progress"]) == 2
    assert "single path" in capsys.readouterr().err


def test_summary_reads_the_diagnostics(tmp_path):
    import sys

    sys.path.insert(0, str(STUDY_DIR))
    from summarize import diagnostics_tables

    iou = {"sky": 90.0, "pole": 5.0, "signsymbol": 10.0, "pedestrian": 20.0, "bicyclist": None}
    split = {"pixels": 10, "consistent_share": 0.75, "teacher_precision_consistent": 0.9,
             "teacher_precision_inconsistent": 0.25, "teacher_errors_in_inconsistent": 0.6,
             "right_labels_in_inconsistent": 0.1,
             "per_class": {"pedestrian": {"right_labels_in_inconsistent": 0.5}}}
    (tmp_path / "diag_x.json").write_text(json.dumps({
        "setup": {"variant": "proxy_glv", "seed": 1, "batches": 3},
        "global_in_patch": {"miou": 40.0, "iou": iou}, "glv_patch_s_1.5_2": {"miou": 30.0, "iou": iou},
        "global_in_patch_s_1.5_2": {"miou": 35.0, "iou": iou},
        "glv_patch_s_1_1.5": {"miou": 31.0, "iou": iou}, "global_in_patch_s_1_1.5": {"miou": 36.0, "iou": iou},
        "fixed_masks": {"miou": 41.0, "iou": iou},
        "carb_split": {"runs/warmup_seed1/model.safetensors": {"global": split},
                       "work/online_warmup_it500.safetensors": {"global_fixed": split}},
        "view_dependence": {"work/online_warmup_it500.safetensors": {
            "right_labels_shared_by_fixed_masks": {"consistent": 0.917, "inconsistent": None}, "per_class": {}}}}))
    text = diagnostics_tables(tmp_path)
    assert "| global view, inside the GLV patch window | 40.0 | 5.0 | 10.0 | 20.0 | – | 11.7 |" in text
    assert "| zoom s in [1.5, 2): GLV patch | 30.0 |" in text
    assert "| zoom s in [1.5, 2): global view in the window | 35.0 |" in text
    assert text.index("zoom s in [1, 1.5)") < text.index("zoom s in [1.5, 2)")  # numeric order of the bins
    assert "| warmup_seed1 | global | 75.0 | 90.0 | 25.0 | 60.0 | 10.0 | – | – | 50.0 | – |" in text
    # a model file that is not a run's model.safetensors is named by itself; the fixed masks' rows
    assert "| online_warmup_it500 | global, fixed masks as the teacher | 75.0 |" in text
    assert "| fixed pseudo-masks (the single path's labels) of the same views | 41.0 |" in text
    assert "| online_warmup_it500 | 91.7 | – |" in text


def test_what_if_overrides_apply_on_top_of_the_variant(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"dataset": "synthetic"}, "glv": {"patch_size": [64, 32]}}))
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({"base": base.name, "seeds": [0], "common": ["glv.scale_rate=1.5"],
                                          "variants": {"glv": ["glv.patch_size=[32,16]"]}}))
    cfg = diagnose.study_config(study_file, "scenes", str(tmp_path), "glv", 4)
    assert (list(cfg.glv.patch_size), cfg.glv.scale_rate, cfg.seed, cfg.data.root) == ([32, 16], 1.5, 4, "scenes")
    cfg = diagnose.study_config(study_file, "scenes", str(tmp_path), "glv", 4, ["glv.patch_size=[48,24]"])
    assert list(cfg.glv.patch_size) == [48, 24]
    assert list(diagnose.study_config(study_file, "scenes", str(tmp_path), None, 0).glv.patch_size) == [64, 32]
