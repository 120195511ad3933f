"""Tables and plots of the CamVid study from the runner's work folder (docs/study_camvid.md).

Reads ``WORK/runs/<variant>_seed<s>/val.json`` (carbseg evaluate --json), ``log.jsonl`` (CARB
bookkeeping), the simulated teacher's reports ``WORK/teacher_<split>_cell<n>.json`` and the
diagnostics ``WORK/diag_<name>.json`` (studies/camvid/diagnose.py) and the class probes
``WORK/probe_<name>.json`` (studies/camvid/class_probe.py); prints the markdown tables and writes
small PNG plots. Missing runs are shown as missing, never invented.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

CLASS_NAMES = ("sky", "building", "pole", "road", "sidewalk", "tree", "signsymbol", "fence", "car",
               "pedestrian", "bicyclist")
SMALL_CLASSES = ("pole", "signsymbol", "pedestrian", "bicyclist")
LABELS = {
    "global_ce": "global CE only",
    "glv": "+ GLV",
    "glv_carb": "+ GLV + CARB",
    "gt_upper_bound": "GT upper bound",
    "single_ce": "follow-up: fixed masks, CE",
    "single_carb": "follow-up: fixed masks, CARB",
    "glv_carb_warmup110": "follow-up: + GLV + CARB, warm-up 110",
    "proxy_ce": "proxy teacher, global CE only",
    "proxy_glv": "proxy teacher, + GLV",
    "proxy_glv_carb": "proxy teacher, + GLV + CARB",
    "proxy_glv_carb_warmup_half": "follow-up: proxy, + GLV + CARB, warm-up 1/2",
    "proxy_single_ce": "follow-up: proxy, fixed masks, CE",
    "proxy_single_carb": "follow-up: proxy, fixed masks, CARB",
    "proxy_glv_patch_large": "follow-up: proxy, + GLV with a 240x160 patch",
    "proxy_carb": "follow-up: proxy, + CARB without GLV",
}
SHORT = {  # bar-plot tick labels
    "global_ce": "global\nCE only", "glv": "+ GLV", "glv_carb": "+ GLV\n+ CARB", "gt_upper_bound": "GT upper\nbound",
    "single_ce": "fixed masks\nCE (f-up)", "single_carb": "fixed masks\nCARB (f-up)",
    "glv_carb_warmup110": "+GLV+CARB\nwarm-up 110\n(f-up)",
    "proxy_ce": "global\nCE only", "proxy_glv": "+ GLV", "proxy_glv_carb": "+ GLV\n+ CARB",
}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def collect(work: Path, variants: list[str], seeds: list[int]) -> dict[str, dict[int, dict]]:
    """variant -> seed -> val report (only the runs that finished)."""
    results: dict[str, dict[int, dict]] = {}
    for variant in variants:
        for seed in seeds:
            report = _read_json(work / "runs" / f"{variant}_seed{seed}" / "val.json")
            if report is not None:
                results.setdefault(variant, {})[seed] = report
    return results


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and spread (max - min) over seeds; spread 0 for a single value."""
    return statistics.fmean(values), (max(values) - min(values)) if len(values) > 1 else 0.0


def carb_bookkeeping(run_dir: Path, warmup_iters: int) -> dict[str, float] | None:
    """Mean consistent share and adaptive c after the warm-up, from log.jsonl."""
    from carbseg.engine.run_dir import RunDir

    rows = RunDir(run_dir).records()  # one record per iteration, also after a resume
    after = [r for r in rows if r.get("iteration", 0) > warmup_iters and "c" in r]
    if not after:
        return None
    return {
        "consistent_share": statistics.fmean(r["consistent_share"] for r in after if r.get("consistent_share") is not None),
        "c": statistics.fmean(r["c"] for r in after),
        "final_total": rows[-1].get("total", float("nan")),
    }


def carb_warmup(run_dir: Path) -> int | None:
    """``train.warmup_iters`` of a run that trained with CARB (from its own config.yaml), else None."""
    from carbseg.engine.run_dir import load_saved_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    cfg = load_saved_config(path)
    return int(cfg.train.warmup_iters) if cfg.carb.enabled else None


def plot_carb(runs: dict[str, tuple[Path, int]], out_dir: Path) -> Path:
    """CARB over training: the adaptive c and the consistent share of pixels, one line per run."""
    from carbseg.engine.report import pyplot, save_figure

    plt = pyplot()

    from carbseg.engine.run_dir import read_log

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax_c, ax_share) = plt.subplots(1, 2, figsize=(9, 3), dpi=100)
    for name, (run, warmup) in runs.items():
        rows = [r for r in read_log(run / "log.jsonl") if "c" in r]
        its = [r["iteration"] for r in rows]
        ax_c.plot(its, [r["c"] for r in rows], label=name)
        ax_share.plot(its, [r.get("consistent_share") for r in rows], label=name)
        for ax in (ax_c, ax_share):
            ax.axvline(warmup, color="grey", lw=0.8, ls="--")
    ax_c.set_yscale("log")
    ax_c.set_title("adaptive c (1 during the warm-up; dashed: its end)", fontsize=9)
    ax_share.set_title("consistent share of pixels (teacher = model)", fontsize=9)
    for ax in (ax_c, ax_share):
        ax.set_xlabel("iteration", fontsize=8)
    ax_c.legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / "carb_over_training.png"
    save_figure(fig, path)
    return path


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def markdown_tables(work: Path, results: dict[str, dict[int, dict]], seeds: list[int]) -> str:
    lines = ["| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean mIoU | std | spread (max-min) |",
             "|---|" + "---|" * len(seeds) + "---|---|---|"]
    teacher = {cell: _read_json(work / f"teacher_val_cell{cell}.json") for cell in (16, 8)}
    if teacher[16]:
        lines.append(f"| teacher masks alone (simulated, 16-px grid) | {teacher[16]['miou']:.1f} (deterministic) |"
                     + " |" * (len(seeds) - 1) + f" {teacher[16]['miou']:.1f} | – | – |")
    for variant, runs in results.items():
        values = [runs[s]["miou"] for s in seeds if s in runs]
        mean, spread = mean_and_spread(values)
        cells = " | ".join(_fmt(runs[s]["miou"]) if s in runs else "–" for s in seeds)
        # Sample std and spread over seeds; a single seed has neither (a dash, not a 0).
        std = f"{statistics.stdev(values):.1f}" if len(values) > 1 else "–"
        spread_text = f"{spread:.1f}" if len(values) > 1 else "–"
        lines.append(f"| {LABELS.get(variant, variant)} | {cells} | **{mean:.1f}** | {std} | {spread_text} |")
    lines += ["", "| variant | " + " | ".join(f"**{c}**" if c in SMALL_CLASSES else c for c in CLASS_NAMES)
              + " | small-class mean |",
              "|---|" + "---|" * (len(CLASS_NAMES) + 1)]
    rows: list[tuple[str, dict[str, float]]] = []
    for cell in (16, 8):
        if teacher[cell]:
            rows.append((f"teacher, {cell}-px grid (val)", teacher[cell]["iou"]))
    # The proxy teacher's pseudo-masks (run_study.py prepare), scored without its fit images.
    for split in ("train", "val"):
        proxy = _read_json(work / f"proxy_{split}.json")
        if proxy:
            rows.append((f"proxy teacher's masks ({split}, {proxy['num_images']} images)", proxy["iou"]))
    for variant, runs in results.items():
        per_class = {c: statistics.fmean(r["iou"][c] for r in runs.values() if r["iou"].get(c) is not None)
                     for c in CLASS_NAMES}
        rows.append((f"{LABELS.get(variant, variant)} (mean of {len(runs)})", per_class))
    for name, iou in rows:
        small = statistics.fmean(iou[c] for c in SMALL_CLASSES)
        lines.append(f"| {name} | " + " | ".join(
            f"**{iou[c]:.1f}**" if c in SMALL_CLASSES else f"{iou[c]:.1f}" for c in CLASS_NAMES)
            + f" | **{small:.1f}** |")
    return "\n".join(lines)


LEARNABLE_SMALL = ("pedestrian", "bicyclist")  # the small classes the study's GT bound learns (docs)
# (variant, against): the comparisons the study asks for, each paired by seed (same seed = same data
# order, crops and initial head): GLV against the global-CE model, CARB against GLV alone, and so on.
PAIRS = (("proxy_glv", "proxy_ce"), ("proxy_glv_carb", "proxy_glv"), ("proxy_glv_carb", "proxy_ce"),
         ("proxy_glv_patch_large", "proxy_glv"), ("proxy_carb", "proxy_ce"),
         ("proxy_single_carb", "proxy_single_ce"), ("proxy_glv_carb_warmup_half", "proxy_glv_carb"),
         ("glv", "global_ce"), ("glv_carb", "glv"))


def _scores(report: dict) -> dict[str, float]:
    """mIoU, the four small classes' mean and the learnable two's mean of one val report."""
    iou = report["iou"]
    return {"miou": report["miou"], "small": statistics.fmean(iou[c] for c in SMALL_CLASSES),
            "learnable": statistics.fmean(iou[c] for c in LEARNABLE_SMALL)}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 \
        else f"{values[0]:.1f} (one seed)"


def seed_statistics_table(results: dict[str, dict[int, dict]]) -> str:
    """Per variant, over its finished seeds: mean ± sample standard deviation of mIoU, of the four
    small classes' mean IoU and of the pedestrian/bicyclist mean."""
    lines = ["| variant | seeds | mIoU | small-class mean (4) | pedestrian/bicyclist mean |", "|---|---|---|---|---|"]
    for variant, runs in results.items():
        scores = [_scores(runs[s]) for s in sorted(runs)]
        lines.append(f"| {LABELS.get(variant, variant)} | {', '.join(str(s) for s in sorted(runs))} | "
                     + " | ".join(_mean_std([x[key] for x in scores]) for key in ("miou", "small", "learnable"))
                     + " |")
    return "\n".join(lines)


def paired_differences_table(results: dict[str, dict[int, dict]]) -> str:
    """For each comparison of PAIRS with both runs finished for some seed: the per-seed differences
    (variant - against) of mIoU, small-class mean and pedestrian/bicyclist mean, then their mean ± std.
    Empty when no pair has a common seed."""
    lines = ["| comparison | seeds | mIoU difference per seed | mean ± std | small-class mean difference | "
             "mean ± std | pedestrian/bicyclist mean difference | mean ± std |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, against in PAIRS:
        common = sorted(set(results.get(variant, {})) & set(results.get(against, {})))
        if not common:
            continue
        cells = []
        for key in ("miou", "small", "learnable"):
            diffs = [_scores(results[variant][s])[key] - _scores(results[against][s])[key] for s in common]
            cells += [", ".join(f"{d:+.1f}" for d in diffs), _mean_std(diffs)]
        lines.append(f"| {LABELS.get(variant, variant)} vs {LABELS.get(against, against)} | "
                     f"{', '.join(str(s) for s in common)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def training_wall_time(run_dir: Path) -> tuple[float, int, int] | None:
    """(seconds, iterations, sessions): the wall time a run spent training, validation included,
    summed over its sessions -- one TensorBoard event file per start or resume, read for the wall
    time of each logged step; a branch's copy of its shared warm-up's file counts that warm-up.
    The first log interval of a session is counted at that session's mean pace. Steps redone after
    a resume are counted again: this is what the run cost, not an ideal uninterrupted run."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    seconds, last_step, sessions = 0.0, 0, 0
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*")):  # names start with a timestamp
        times: dict[int, float] = {}
        for event in EventFileLoader(str(path)).Load():
            if event.summary.value:
                times.setdefault(event.step, event.wall_time)
        if len(times) < 2:
            continue
        steps = sorted(times)
        span = times[steps[-1]] - times[steps[0]]
        seconds += span + span / (steps[-1] - steps[0]) * (steps[1] - steps[0])
        last_step, sessions = steps[-1], sessions + 1
    return (seconds, last_step, sessions) if sessions else None


def wall_time_table(work: Path, variants: list[str], seeds: list[int]) -> str:
    lines = ["| run | iterations | wall time | sessions | iterations/s |", "|---|---|---|---|---|"]
    for variant in variants:
        for seed in seeds:
            run = work / "runs" / f"{variant}_seed{seed}"
            timing = training_wall_time(run) if (run / "tb").is_dir() else None
            if timing:
                seconds, steps, sessions = timing
                lines.append(f"| {variant}_seed{seed} | {steps} | {int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min "
                             f"| {sessions} | {steps / seconds:.3f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _model_name(checkpoint: str) -> str:
    """A run's model.safetensors is named by its run folder, any other model file by its own name."""
    path = Path(checkpoint)
    return path.parent.name if path.name == "model.safetensors" else path.stem


# CARB's split per view: the teacher it compares the model with (diagnose.py's carb_split keys)
SPLIT_VIEWS = {"global": "global", "patch": "patch", "global_fixed": "global, fixed masks as the teacher"}


def diagnostics_tables(work: Path) -> str:
    """The diagnostics (``WORK/diag_*.json``): teacher labels in the training geometry, and CARB's
    region split of each checkpoint on the same views, scored against the ground truth."""
    lines: list[str] = []
    for path in sorted(work.glob("diag_*.json")):
        diag = _read_json(path)
        if not diag or "setup" not in diag:
            continue
        setup = diag["setup"]
        what_if = f" with {' '.join(setup['overrides'])}" if setup.get("overrides") else ""
        lines += ["", f"{path.name}: variant {setup['variant']}{what_if}, seed {setup['seed']}, its first "
                  f"{setup['batches']} training batches, scored against the ground truth of the same views", "",
                  "| teacher labels | mIoU | " + " | ".join(SMALL_CLASSES) + " | small-class mean |",
                  "|---|" + "---|" * (len(SMALL_CLASSES) + 2)]
        views = {"global_view": "global view", "global_in_patch": "global view, inside the GLV patch window",
                 "glv_patch": "GLV patch (zoomed, resized back)",
                 "fixed_masks": "fixed pseudo-masks (the single path's labels) of the same views",
                 "online_vs_fixed": "global view scored against the fixed pseudo-masks, not the ground truth"}
        zoom_bins = [k for k in diag if k.startswith("glv_patch_s_")]
        for key in sorted(zoom_bins, key=lambda k: float(k.removeprefix("glv_patch_s_").split("_")[0])):
            low, high = key.removeprefix("glv_patch_s_").split("_")
            views[key.replace("glv_patch", "global_in_patch")] = f"zoom s in [{low}, {high}): global view in the window"
            views[key] = f"zoom s in [{low}, {high}): GLV patch"
        for key, name in views.items():
            if key in diag:
                iou = diag[key]["iou"]
                small = [iou[c] for c in SMALL_CLASSES if iou.get(c) is not None]
                lines.append(f"| {name} | {diag[key]['miou']:.1f} | "
                             + " | ".join(_fmt(iou.get(c)) for c in SMALL_CLASSES)
                             + f" | {_fmt(statistics.fmean(small) if small else None)} |")
        if diag.get("carb_split"):
            lines += ["", "| model | view | consistent share | teacher precision: consistent | inconsistent "
                      "| teacher errors in the inconsistent region | correct labels in the inconsistent region | "
                      + " | ".join(f"{c}: correct labels in inconsistent" for c in SMALL_CLASSES) + " |",
                      "|---|---|---|---|---|---|---|" + "---|" * len(SMALL_CLASSES)]
            for checkpoint, split in diag["carb_split"].items():
                model = _model_name(checkpoint)
                for view, r in split.items():
                    per_class = r["per_class"]
                    lines.append(
                        f"| {model} | {SPLIT_VIEWS.get(view, view)} | {_pct(r['consistent_share'])} | "
                        f"{_pct(r['teacher_precision_consistent'])} | {_pct(r['teacher_precision_inconsistent'])} | "
                        f"{_pct(r['teacher_errors_in_inconsistent'])} | {_pct(r['right_labels_in_inconsistent'])} | "
                        + " | ".join(_pct(per_class.get(c, {}).get("right_labels_in_inconsistent"))
                                     for c in SMALL_CLASSES) + " |")
        if diag.get("view_dependence"):
            lines += ["", "| model | online teacher's correct labels the fixed masks give too: consistent region "
                      "| inconsistent region |", "|---|---|---|"]
            for checkpoint, report in diag["view_dependence"].items():
                shared = report["right_labels_shared_by_fixed_masks"]
                lines.append(f"| {_model_name(checkpoint)} | {_pct(shared['consistent'])} | "
                             f"{_pct(shared['inconsistent'])} |")
    if lines:
        lines.insert(0, "Diagnostics (studies/camvid/diagnose.py; shares in %):")
    return "\n".join(lines)


def class_probe_table(work: Path) -> str:
    """The class probes (``WORK/probe_*.json``, studies/camvid/class_probe.py): for each model and probed
    class, is a missed class outvoted by a neighbour or not carried by the features at all?"""
    lines: list[str] = []
    for path in sorted(work.glob("probe_*.json")):
        probe = _read_json(path)
        if not probe or "classes" not in probe:
            continue
        model = probe["model"]
        name = model["source"].split("/")[0] + ("" if model.get("iteration") is None else f" @ {model['iteration']}")
        scales = ", ".join(f"{s:g}" for s in probe["eval"]["scales"])
        for cls, r in probe["classes"].items():
            taken = ", ".join(f"{k} {v:.0f}" for k, v in list(r["taken_by"].items())[:3])
            lines.append(f"| {name} | {scales} | {cls} | {_fmt(r['first_choice'])} | {_fmt(r['in_first_two'])} | "
                         f"{_fmt(r['iou_by_offset'].get('0'))} | {r['oracle_offset']:g} | {_fmt(r['oracle_iou'])} | "
                         f"{taken} |")
    if not lines:
        return ""
    return "\n".join([
        "Class probes on val (studies/camvid/class_probe.py; the best offset is an oracle chosen on the split it "
        "is scored on: an upper bound of re-calibrating one class, never a result):", "",
        "| model | eval scale | class | first choice on its pixels (%) | in the first two (%) | IoU | "
        "best logit offset | IoU at that offset | its pixels go to (%) |",
        "|---|---|---|---|---|---|---|---|---|", *lines])


def teacher_alone_on_val(work: Path) -> tuple[str, dict | None]:
    """(which teacher, its pseudo-masks' val report): the proxy teacher's when the work folder has
    one (proxy_study.yaml), else the simulated teacher's 16-px grid (study.yaml)."""
    proxy = _read_json(work / "proxy_val.json")
    if proxy:
        return "proxy teacher", proxy
    return "simulated teacher", _read_json(work / "teacher_val_cell16.json")


def plot(results: dict[str, dict[int, dict]], work: Path, out_dir: Path) -> list[Path]:
    from carbseg.engine.report import pyplot, save_figure

    plt = pyplot()

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    teacher_name, teacher = teacher_alone_on_val(work)
    names, means, lows, highs = [], [], [], []
    if teacher:
        names.append("teacher\nalone")
        means.append(teacher["miou"])
        lows.append(0.0)
        highs.append(0.0)
    for variant, runs in results.items():
        values = [r["miou"] for r in runs.values()]
        mean = statistics.fmean(values)
        names.append(f"{SHORT.get(variant, variant)}\n({len(values)} seed{'s' if len(values) > 1 else ''})")
        means.append(mean)
        lows.append(mean - min(values))
        highs.append(max(values) - mean)
    fig, ax = plt.subplots(figsize=(7.2, 3.6), dpi=100)
    ax.bar(range(len(names)), means, yerr=[lows, highs], capsize=4, color="#4c72b0")
    for i, m in enumerate(means):
        ax.text(i, m + 1, f"{m:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylabel("val mIoU (%)")
    ax.set_title(f"CamVid val, {teacher_name} (research instrument); bars = seed min..max", fontsize=8)
    fig.tight_layout()
    path = out_dir / "miou.png"
    save_figure(fig, path)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    width = 0.8 / max(len(results), 1)
    for k, (variant, runs) in enumerate(results.items()):
        vals = [statistics.fmean(r["iou"][c] for r in runs.values()) for c in SMALL_CLASSES]
        ax.bar([i + k * width for i in range(len(SMALL_CLASSES))], vals, width, label=LABELS.get(variant, variant))
    if teacher:
        ax.scatter([i + 0.4 - width / 2 for i in range(len(SMALL_CLASSES))], [teacher["iou"][c] for c in SMALL_CLASSES],
                   marker="_", s=400, color="black", label="teacher alone", zorder=3)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(SMALL_CLASSES))], SMALL_CLASSES)
    ax.set_ylabel("val IoU (%), mean over seeds")
    ax.set_title("Small classes", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "small_classes.png"
    save_figure(fig, path)
    written.append(path)
    return written


def validation_curves(work: Path, variants: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    """run name -> the in-training validation records (``val_miou`` and ``val_iou.<class>`` of log.jsonl)."""
    from carbseg.engine.run_dir import read_log

    curves = {}
    for variant in variants:
        for seed in seeds:
            rows = [r for r in read_log(work / "runs" / f"{variant}_seed{seed}" / "log.jsonl")
                    if r.get("val_miou") is not None and any(k.startswith("val_iou.") for k in r)]
            if rows:
                curves[f"{variant}_seed{seed}"] = rows
    return curves


def curves_table(curves: dict[str, list[dict]]) -> str:
    """Markdown: per run and validation point, mIoU and the small classes' IoU (the schedule search)."""
    lines = ["| run | iteration | val mIoU | " + " | ".join(f"**{c}**" for c in SMALL_CLASSES) + " | all four >= 10 |",
             "|---|---|---|" + "---|" * (len(SMALL_CLASSES) + 1)]
    for run, rows in curves.items():
        for r in rows:
            small = [r.get(f"val_iou.{c}") for c in SMALL_CLASSES]
            ok = all(v is not None and v >= 10.0 for v in small)
            lines.append(f"| {run} | {r['iteration']} | {r['val_miou']:.1f} | "
                         + " | ".join(_fmt(v) for v in small) + f" | {'yes' if ok else 'no'} |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[dict]], out_dir: Path) -> Path:
    """One panel per small class (and mIoU): validation IoU against iterations, one line per run."""
    from carbseg.engine.report import pyplot, save_figure

    plt = pyplot()

    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ["val_miou", *(f"val_iou.{c}" for c in SMALL_CLASSES)]
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 2.8), dpi=100, sharex=True)
    for ax, key in zip(axes, keys):
        for run, rows in curves.items():
            ax.plot([r["iteration"] for r in rows], [r.get(key) or 0.0 for r in rows], marker=".", label=run)
        if key != "val_miou":
            ax.axhline(10.0, color="grey", lw=0.8, ls="--")
        ax.set_title("mIoU" if key == "val_miou" else key[len("val_iou."):], fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
    axes[0].set_ylabel("CamVid val IoU (%)")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / "validation_curves.png"
    save_figure(fig, path)
    return path


def write_tables(text: str, docs_dir: Path, study) -> Path:
    """``docs_dir/tables.md``: the printed tables as a file the study document links to, so every
    figure the document cites can be checked against what ``summarize`` computed from the runs."""
    from carbseg.io import write_text_atomic

    path = docs_dir / "tables.md"
    header = (f"# CamVid study tables (generated by `run_study.py summarize`; do not edit)\n\n"
              f"Variants: {', '.join(study.variants)}; seeds: {', '.join(map(str, study.seeds))}. "
              "Split: CamVid val (it also chose the settings shared by every variant; docs/study_camvid.md). "
              "A missing run is shown as missing.\n\n")
    docs_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, header + text.strip() + "\n")
    return path


def summarize(study, docs_dir: Path) -> str:
    """Print the tables and CARB bookkeeping; write them to ``docs_dir/tables.md``, with the plots."""

    results = collect(study.work, study.variants, study.seeds)
    text = markdown_tables(study.work, results, study.seeds)
    if results:
        text += "\n\nOver seeds (mean ± sample standard deviation):\n\n" + seed_statistics_table(results)
    paired = paired_differences_table(results)
    if paired:
        text += "\n\nPaired by seed (variant minus the one it is compared with):\n\n" + paired
    extra = ["", "CARB bookkeeping after the warm-up (log.jsonl):"]
    carb_runs = {}
    for variant in study.variants:
        for seed in study.seeds:
            run = study.run_dir(variant, seed)
            warmup = carb_warmup(run)
            stats = None if warmup is None else carb_bookkeeping(run, warmup)
            if stats:
                carb_runs[f"{variant}_seed{seed}"] = (run, warmup)
                extra.append(f"- {variant} seed {seed}: consistent share {stats['consistent_share']:.3f}, "
                             f"mean c {stats['c']:.3f} (after the warm-up of {warmup} iterations)"
                             + ("" if (run / "model.safetensors").is_file() else "; unfinished run, so far"))
    text += "\n" + "\n".join(extra)
    timing = wall_time_table(study.work, study.variants, study.seeds)
    if timing:
        text += "\n\nWall time of each run (TensorBoard event times; a branch includes its shared warm-up):\n\n" + timing
    diagnostics = diagnostics_tables(study.work)
    if diagnostics:
        text += "\n\n" + diagnostics
    curves = validation_curves(study.work, study.variants, study.seeds)
    if curves:
        text += "\n\nValidation during training (log.jsonl):\n\n" + curves_table(curves)
    probes = class_probe_table(study.work)
    if probes:
        text += "\n\n" + probes
    print(text)
    print(f"wrote {write_tables(text, docs_dir, study)}")
    if curves:
        print(f"wrote {plot_curves(curves, docs_dir)}")
    if carb_runs:
        print(f"wrote {plot_carb(carb_runs, docs_dir)}")
    if results:
        for path in plot(results, study.work, docs_dir):
            print(f"wrote {path}")
    return text
