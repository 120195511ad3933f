"""Reliability matrix, interruptions: kill -9 then rerun / --resume gives complete, identical outputs;
a full disk or a write-protected folder is one clear line (both simulated: the tests run as root,
so chmod would not stop them, and filling a real disk is not an option)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from carbseg.cli import main
from carbseg.engine.checkpoint import load_training_state
from test_reliability_common import (
    PROJECT_ROOT,
    all_files,
    error_line,
    make_scenes,
    png_bytes_equal,
    temporaries,
    tiny_train_config,
)

# Child processes slow their writes / iterations down so that the kill lands mid-run, at a known
# kind of moment; the slowing never changes what is computed.
_SLOW_WRITES = """
import contextlib, sys, time
import carbseg.io as cio
original = cio.atomic_path
@contextlib.contextmanager
def slow(path):
    with original(path) as tmp:
        yield tmp
        time.sleep(0.3)  # the temporary is complete but not renamed yet: a kill here leaves it behind
cio.atomic_path = slow
from carbseg.cli import main
raise SystemExit(main(sys.argv[1:]))
"""
_SLOW_ITERATIONS = """
import sys, time
from carbseg.engine import train
original = train.Trainer.train_iteration
def slow(self, batches, iteration, **kwargs):
    values = original(self, batches, iteration, **kwargs)
    time.sleep(0.25)
    return values
train.Trainer.train_iteration = slow
from carbseg.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"), train=8)


@pytest.fixture(scope="module")
def labels(scenes, tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--out", str(path)]) == 0
    return path


def _child_env():
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "OMP_NUM_THREADS": "1"}


def _kill9_when(proc: subprocess.Popen, ready, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the child finished before it could be killed"
    assert ready(), "the child never reached the point to kill it at"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _pseudo_mask_args(scenes, labels, out):
    return ["pseudo-masks", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--labels",
            str(labels), "--out", str(out), "--teacher", "simulated", "--workers", "0", "--batch-size", "1",
            "--no-progress"]


def _finished(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*.png") if not p.name.startswith("."))


@pytest.mark.slow  # two child processes' start-up (torch import) dominate: ~15-30 s on a shared CPU
def test_kill9_during_pseudo_masks_then_rerun_gives_identical_masks(scenes, labels, tmp_path):
    reference = tmp_path / "reference"
    assert main(_pseudo_mask_args(scenes, labels, reference)) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITES, *_pseudo_mask_args(scenes, labels, out)],
                            env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill9_when(proc, lambda: len(_finished(out)) >= 2 and temporaries(out))
    finished = _finished(out)
    assert 2 <= len(finished) < 8 and temporaries(out)  # killed mid-write: a temporary is left over
    for path in finished:  # whatever carries the final name is complete
        assert png_bytes_equal(path, reference / path.name)

    assert main(_pseudo_mask_args(scenes, labels, out)) == 0
    assert all_files(out) == all_files(reference)  # every mask, and no temporary left
    for path in reference.iterdir():
        assert png_bytes_equal(out / path.name, path)


def _train_args(config, out, *extra):
    return ["train", "--config", str(config), "--out", str(out), *extra]


@pytest.mark.slow
def test_kill9_during_training_then_resume_is_bit_identical(scenes, tmp_path):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, train={"checkpoint_interval": 2})
    straight = tmp_path / "straight"
    assert main(_train_args(config, straight, "--max-iters", "8")) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_ITERATIONS, *_train_args(config, killed, "--max-iters", "8")],
                            env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def logged_past_a_checkpoint():
        log = killed / "log.jsonl"
        return log.is_file() and len(log.read_text().splitlines()) >= 5  # checkpoint at 4, lines past it

    _kill9_when(proc, logged_past_a_checkpoint)
    assert not (killed / "model.safetensors").exists()
    at = load_training_state(killed / "checkpoint_last.pt")["iteration"]
    assert at in (4, 6) and len((killed / "log.jsonl").read_text().splitlines()) > at

    assert main(_train_args(config, killed, "--max-iters", "8", "--resume")) == 0
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 9))  # iterations redone once, not logged twice
    assert [r["total"] for r in records] == [r["total"] for r in expected]
    assert temporaries(killed) == []


def test_resume_clears_a_torn_log_line_and_stale_temporaries(scenes, tmp_path):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    run = tmp_path / "run"
    assert main(_train_args(config, run, "--max-iters", "2")) == 0
    with open(run / "log.jsonl", "a") as f:  # what a kill mid-write leaves: later lines, one torn
        f.write(json.dumps({"iteration": 3, "total": 1.0}) + "\n" + '{"iteration": 4, "tot')
    (run / ".checkpoint_last.pt.abcd1234.tmp.pt").write_bytes(b"half a checkpoint")
    assert main(_train_args(config, run, "--max-iters", "3", "--resume")) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3] and records[2]["total"] != 1.0
    assert temporaries(run) == []


# ---------------------------------------------------------------- disk full, permissions (simulated)
def _disk_full_after_some_bytes(original):
    """A writer that puts a few bytes into the file, then fails as a full disk does."""

    def write(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def test_disk_full_while_writing_masks_is_one_line_and_leaves_nothing_half(scenes, labels, tmp_path, capsys,
                                                                            monkeypatch):
    def save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "masks"
    assert main(_pseudo_mask_args(scenes, labels, out)) == 2
    error_line(capsys.readouterr().err, "pseudo-masks", str(out / "synth_train_000000.png"), "disk is full")
    assert all_files(out) == []


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(scenes, tmp_path, capsys, monkeypatch):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    run = tmp_path / "run"
    assert main(_train_args(config, run, "--max-iters", "1")) == 0
    before = (run / "checkpoint_last.pt").read_bytes()
    capsys.readouterr()
    import carbseg.engine.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint.torch, "save", _disk_full_after_some_bytes(torch.save))
    assert main(_train_args(config, run, "--max-iters", "2", "--resume")) == 2
    error_line(capsys.readouterr().err, "train", str(run / "checkpoint_last.pt"), "disk is full")
    assert (run / "checkpoint_last.pt").read_bytes() == before and temporaries(run) == []


def test_write_protected_output_is_one_line(scenes, tmp_path, capsys, monkeypatch):
    import carbseg.io

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(carbseg.io.tempfile, "mkstemp", refuse)
    out = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--out", str(out)]) == 2
    error_line(capsys.readouterr().err, "labels", str(out), "permission denied")
    assert not out.exists()


def test_outputs_get_ordinary_permissions(scenes, labels, tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the renamed output must not stay private."""
    out = tmp_path / "masks"
    assert main(_pseudo_mask_args(scenes, labels, out)) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert {(p.stat().st_mode & 0o777) for p in out.iterdir()} == {0o666 & ~umask}
