"""One process per output folder: ``FolderLock`` (``.carbseg.lock``) for train, pseudo-masks and demo."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from carbseg.cli import main
from carbseg.engine.run_dir import LOCK_FILE, FolderLock, folder_lock
from carbseg.errors import UserError
from test_reliability_common import PROJECT_ROOT, error_line, make_scenes, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")

# The child holds the lock 3 s longer after taking it, so that two children started together overlap
# whatever their start-up times (the holding never changes what is computed).
_HOLD_LOCK = """
import sys, time
from carbseg.engine import run_dir
original = run_dir.FolderLock.acquire
def acquire(self):
    taken = original(self)
    time.sleep(3.0)
    return taken
run_dir.FolderLock.acquire = acquire
from carbseg.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _child_env():
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "OMP_NUM_THREADS": "1"}


def _dead_pid() -> int:
    """The pid of a process that ran on this host and is gone (killed with SIGKILL)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return proc.pid


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"), train=4)


# ---------------------------------------------------------------- the lock itself
def test_a_held_folder_refuses_a_second_holder_naming_the_first(tmp_path):
    out = tmp_path / "out"
    with FolderLock(out, "train") as lock:
        record = json.loads((out / LOCK_FILE).read_text())
        assert record == lock.record
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["command"] == "train" and record["started"]
        with pytest.raises(UserError) as err:
            FolderLock(out, "pseudo-masks").acquire()
        message = str(err.value)
        assert message.startswith(f"{out}: in use by carbseg train (pid {os.getpid()} on {socket.gethostname()}, "
                                  f"since {record['started']}); wait for it to end or choose another --out")
        assert (out / LOCK_FILE).is_file()  # the refused one left the holder's lock alone
    assert not out.exists()  # released: the folder it made stayed empty, so it is gone too


def test_release_keeps_a_folder_with_outputs_and_a_folder_that_existed(tmp_path):
    out = tmp_path / "out"
    with FolderLock(out, "pseudo-masks"):
        (out / "a.png").write_bytes(b"x")
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]
    existing = tmp_path / "existing"
    existing.mkdir()
    with FolderLock(existing, "demo"):
        pass
    assert existing.is_dir() and list(existing.iterdir()) == []


def test_a_lock_whose_holder_is_gone_is_taken_over_with_one_warning(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    dead = {"pid": _dead_pid(), "host": socket.gethostname(), "started": "2026-01-01 00:00:00 UTC",
            "command": "train"}
    (out / LOCK_FILE).write_text(json.dumps(dead) + "\n")
    (out / f"{LOCK_FILE}.{dead['pid']}.123").write_text("a publish cut short by the kill")
    with caplog.at_level(logging.WARNING), FolderLock(out, "train") as lock:
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid() == lock.record["pid"]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the dead one's leftover is removed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{out}: taking over the lock of carbseg train (pid {dead['pid']} on "
                        f"{socket.gethostname()}, since 2026-01-01 00:00:00 UTC), which no longer runs"]


def test_a_holder_on_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere", "started": "t",
                                             "command": "train"}))
    with pytest.raises(UserError, match=rf"on elsewhere, since t\); .* \(if that process is gone, delete "
                                        rf".*{LOCK_FILE}\)"):
        FolderLock(out, "train").acquire()


def test_only_rank_0_takes_the_lock_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with folder_lock(tmp_path / "out", "train") as lock:
        assert lock is None and not (tmp_path / "out").exists()
    monkeypatch.setenv("RANK", "0")
    with folder_lock(tmp_path / "out", "train") as lock:
        assert lock is not None and (tmp_path / "out" / LOCK_FILE).is_file()


# ---------------------------------------------------------------- the commands
def test_pseudo_masks_and_demo_refuse_a_locked_folder(scenes, tmp_path, capsys):
    labels = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--out",
                 str(labels)]) == 0
    out = tmp_path / "out"
    with FolderLock(out, "train"):
        capsys.readouterr()
        assert main(["pseudo-masks", "--dataset", "synthetic", "--root", str(scenes), "--split", "train",
                     "--labels", str(labels), "--out", str(out), "--teacher", "simulated", "--workers", "0",
                     "--no-progress"]) == 2
        error_line(capsys.readouterr().err, "pseudo-masks", f"{out}: in use by carbseg train (pid {os.getpid()}")
        assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 2
        error_line(capsys.readouterr().err, "demo", f"{out}: in use by carbseg train (pid {os.getpid()}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # neither wrote anything


def _train_args(config, out, *extra):
    return ["train", "--config", str(config), "--out", str(out), "--no-progress", *extra]


@pytest.mark.slow  # two child processes' start-up (torch import): ~10-20 s on a shared CPU
def test_two_trains_started_together_one_runs_the_other_exits_2_naming_it(scenes, tmp_path):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, train={"max_iters": 4})
    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, *_train_args(config, out)], env=_child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(proc, *proc.communicate(timeout=300)) for proc in procs]
    assert sorted(proc.returncode for proc, _, _ in results) == [0, 2], results
    (winner, out_text, _), = [r for r in results if r[0].returncode == 0]
    (_, _, loser_err), = [r for r in results if r[0].returncode == 2]
    assert "model written to" in out_text
    error_line(loser_err, "train", f"{out}: in use by carbseg train (pid {winner.pid} on {socket.gethostname()}, "
                                   "since ", "wait for it to end or choose another --out")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]  # one run's lines, each iteration once
    assert len(list((out / "tb").iterdir())) == 1  # one TensorBoard event file
    assert not (out / LOCK_FILE).exists()  # released on exit


@pytest.mark.slow
def test_a_train_killed_with_sigkill_leaves_a_lock_the_next_train_takes_over(scenes, tmp_path, caplog):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, train={"max_iters": 4})
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, *_train_args(config, out)], env=_child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / LOCK_FILE).is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None and (out / LOCK_FILE).is_file()
    proc.send_signal(signal.SIGKILL)  # kill -9: no chance to release the lock
    proc.wait(timeout=30)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid

    with caplog.at_level(logging.WARNING):
        assert main(_train_args(config, out)) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "lock" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"{out}: taking over the lock of carbseg train (pid {proc.pid} on {socket.gethostname()}, since ")
    assert (out / "model.safetensors").is_file() and not (out / LOCK_FILE).exists()
