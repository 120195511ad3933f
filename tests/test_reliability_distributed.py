"""Reliability matrix, distributed: one failing rank ends all ranks quickly, with its clear error line.

Two CPU processes under torchrun (gloo). Rank 1 alone reads a truncated image (the pseudo-mask
shards are strided: rank 1 owns images 1, 3, ...); it exits with status 2 and its one-line error,
and torchrun's agent then stops rank 0, which would otherwise wait at the final barrier for the
process-group timeout. Marked slow: starting two torch processes takes 10-30 s on a shared CPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from carbseg.cli import main
from carbseg.io import read_label_png
from test_reliability_common import PROJECT_ROOT, make_scenes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_one_failing_rank_ends_all_ranks_with_a_clear_error(tmp_path):
    scenes = make_scenes(tmp_path / "scenes", train=4)
    labels = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--out", str(labels)]) == 0
    bad = scenes / "images" / "train" / "synth_train_000001.png"
    bad.write_bytes(bad.read_bytes()[:200])
    out = tmp_path / "masks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "carbseg", "pseudo-masks", "--dataset", "synthetic",
           "--root", str(scenes), "--split", "train", "--labels", str(labels), "--out", str(out),
           "--teacher", "simulated", "--workers", "0", "--batch-size", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("carbseg pseudo-masks: error: ")]
    assert len(errors) == 1 and str(bad) in errors[0] and "truncated" in errors[0], proc.stderr
    assert "exitcode  : 2" in proc.stderr and "rank      : 1" in proc.stderr  # torchrun names the failing rank
    assert elapsed < 120, elapsed  # far below the 600 s process-group timeout: rank 0 did not wait it out
    # Only rank 0's own images (0 and 2; it may be stopped before both), each complete: a rerun redoes the rest.
    written = sorted(p.name for p in out.glob("synth_*.png"))
    assert set(written) <= {"synth_train_000000.png", "synth_train_000002.png"}
    for name in written:
        assert read_label_png(out / name).shape == (32, 64)
