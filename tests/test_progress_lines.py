"""Progress without a terminal: plain INFO lines where stderr is a file or a pipe, bars only on a terminal."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from carbseg import console
from carbseg.cli import main
from carbseg.console import ProgressLog, format_duration, iteration_line, progress_lines, show_progress
from test_reliability_common import PROJECT_ROOT, make_checkpoint, make_scenes, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"), train=4, val=3)


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bars_on_a_terminal_lines_elsewhere(monkeypatch):
    monkeypatch.setattr(console, "_stderr_is_terminal", lambda: True)
    assert show_progress(True) and not progress_lines(True)
    monkeypatch.setattr(console, "_stderr_is_terminal", lambda: False)
    assert not show_progress(True) and progress_lines(True)
    assert not progress_lines(False)  # --no-progress: neither


def test_iteration_line_shows_terms_c_lr_rate_and_eta():
    values = {"total": 1.23456, "global_ce": 0.5, "patch_ce": 0.25, "consistent": 0.125, "inconsistent": 2.0,
              "patch_consistent": 0.0625, "patch_inconsistent": 1.5, "consistent_pixels": 900.0, "c": 0.875,
              "lr": 0.0094, "epoch": 1.0, "iters_per_s": 2.0}
    # (300 - 40) iterations at 2 it/s: 130 s left.
    assert iteration_line(40, 300, values) == (
        "iteration 40/300: total 1.235 global_ce 0.500 patch_ce 0.250 consistent 0.125 inconsistent 2.000 "
        "patch_consistent 0.062 patch_inconsistent 1.500 c 0.88 lr 9.40e-03 2.00 it/s ETA 2:10")
    assert format_duration(3725) == "1:02:05" and format_duration(59.6) == "1:00"


def test_progress_log_writes_a_line_per_tenth_or_30_s_and_one_at_the_end(monkeypatch, caplog):
    clock = _Clock()
    monkeypatch.setattr(console.time, "perf_counter", clock)
    logger = logging.getLogger("carbseg.test_progress")
    with caplog.at_level(logging.INFO, logger=logger.name):
        lines = ProgressLog(logger, "pseudo-masks", 40)
        for _ in range(3):  # 3 images in 3 s: not yet a tenth (4), not yet 30 s
            clock.now += 1.0
            lines.update()
        assert caplog.messages == []
        clock.now += 1.0
        lines.update()  # the 4th image: a tenth
        clock.now += 35.0
        lines.update()  # 30 s since the last line
        for _ in range(35):
            lines.update()
    assert caplog.messages[:2] == ["pseudo-masks: 4/40 images (10%), 1.00 img/s, ETA 0:36",
                                   "pseudo-masks: 5/40 images (12%), 0.13 img/s, ETA 4:33"]
    # then one line per tenth (8, 12, ..., 36), and the last one with the whole time
    assert [m.split(" ")[1] for m in caplog.messages[2:]] == [f"{n}/40" for n in range(8, 41, 4)]
    assert caplog.messages[-1] == "pseudo-masks: 40/40 images (100%) in 0:39, 1.03 img/s"
    assert ProgressLog(logger, "x", 0).enabled is False  # nothing to count, no line


def test_pseudo_masks_and_evaluate_log_lines_without_a_terminal(scenes, tmp_path, caplog):
    labels = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--out",
                 str(labels)]) == 0
    args = ["--dataset", "synthetic", "--root", str(scenes), "--split", "train"]
    with caplog.at_level(logging.INFO):
        assert main(["pseudo-masks", *args, "--labels", str(labels), "--out", str(tmp_path / "pm"),
                     "--teacher", "simulated", "--workers", "0", "--batch-size", "1"]) == 0
        assert main(["evaluate", *args, "--pred", str(tmp_path / "pm")]) == 0
        checkpoint = make_checkpoint(tmp_path / "model.safetensors")
        assert main(["evaluate", "--dataset", "synthetic", "--root", str(scenes), "--split", "val",
                     "--checkpoint", str(checkpoint), "--device", "cpu"]) == 0
    progress = [m for m in caplog.messages if re.match(r"(pseudo-masks|evaluate): \d+/\d+ images", m)]
    assert [m.split(" (")[0] for m in progress] == (
        [f"pseudo-masks: {n}/4 images" for n in (1, 2, 3, 4)] + [f"evaluate: {n}/4 images" for n in (1, 2, 3, 4)]
        + [f"evaluate: {n}/3 images" for n in (1, 2, 3)])
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["evaluate", *args, "--pred", str(tmp_path / "pm"), "--no-progress"]) == 0
    assert not [m for m in caplog.messages if "images (" in m]


def test_train_without_a_terminal_logs_one_plain_line_per_log_interval(scenes, tmp_path):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, train={"max_iters": 6, "log_interval": 2})
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "carbseg", "train", "--config", str(config), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr  # no bar redraws in a pipe
    lines = [line for line in proc.stderr.splitlines() if ": iteration " in line]
    pattern = (r"INFO carbseg\.engine\.train: iteration {}/6: total \d+\.\d{{3}} global_ce \d+\.\d{{3}} patch_ce "
               r"\d+\.\d{{3}} consistent \d+\.\d{{3}} inconsistent \d+\.\d{{3}} patch_consistent \d+\.\d{{3}} "
               r"patch_inconsistent \d+\.\d{{3}} c \d+\.\d\d lr \d\.\d\de-\d\d \d+\.\d\d it/s ETA \d+:\d\d")
    assert len(lines) == 3, proc.stderr
    for done, line in zip((2, 4, 6), lines):
        assert re.fullmatch(pattern.format(done), line), line
    assert lines[-1].endswith("ETA 0:00")
