"""benchmarks/gpu_check.py: the plan's budgets, killing a timed-out phase whole, NOT TESTED rows, json = table;
and the generated Cityscapes-layout folder it trains on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import gpu_check_phases  # noqa: E402
from cityscapes_layout import write_cityscapes_layout  # noqa: E402

from carbseg.data.cityscapes import CityscapesDataset  # noqa: E402
from carbseg.data.synthetic import render_scene, scene_seed  # noqa: E402


def _gone(pid: int) -> bool:
    """No such process, or a zombie (killed, waiting to be reaped by whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_gone(pids, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return all(_gone(p) for p in pids)


def test_plan_fits_its_limits_and_dry_run_prints_it(capsys):
    assert sum(p.gpu_s for p in gpu_check.PHASES) <= 540
    assert sum(p.cpu_s for p in gpu_check.PHASES) <= 15 * 60
    assert all(p.gpu_s > 0 for p in gpu_check.PHASES)  # every phase runs on the GPU
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    total = out.strip().splitlines()[-1]
    assert total == (f"| total | | {sum(p.gpu_s for p in gpu_check.PHASES)} (limit 540) | "
                     f"{sum(p.cpu_s for p in gpu_check.PHASES)} (limit 900) |")
    for phase in gpu_check.PHASES:
        assert f"| {phase.name} | {phase.what} | {phase.gpu_s} |" in out


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the process tree is read from /proc (Linux)")
def test_timed_out_phase_is_killed_with_everything_it_started(tmp_path):
    """A phase whose child sleeps forever in its group, and whose other child left for a session of its
    own (as torchrun's workers do): on timeout all three are gone."""
    pids_file = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
        same_group = subprocess.Popen(sleeper)
        own_session = subprocess.Popen(sleeper, start_new_session=True)
        open({str(pids_file)!r}, "w").write(f"{{os.getpid()}} {{same_group.pid}} {{own_session.pid}}")
        time.sleep(600)
    """)
    started = time.monotonic()
    ran = gpu_check.run_phase([sys.executable, "-c", script], 3.0, tmp_path / "log")
    pids = [int(p) for p in pids_file.read_text().split()]
    try:
        assert ran.timed_out and ran.code is None
        assert 3.0 <= ran.seconds < 10.0 and time.monotonic() - started < 30.0
        assert _wait_gone(pids), [p for p in pids if not _gone(p)]
        assert ran.peak_rss_bytes > 3 * 5 * 2**20  # three Python processes were counted together
    finally:
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, 9)


def test_a_check_stopped_by_sigterm_takes_its_running_phase_with_it(tmp_path):
    """`timeout` or a scheduler ends the check itself with SIGTERM: the phase it was running (a child
    in a session of its own, as torchrun's workers) must not outlive it."""
    pids_file = tmp_path / "pids"
    phase = textwrap.dedent(f"""
        import os, subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        open({str(pids_file)!r}, "w").write(f"{{os.getpid()}} {{worker.pid}}")
        time.sleep(600)
    """)
    check = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(gpu_check.__file__).parent)!r})
        import gpu_check
        gpu_check.exit_on_sigterm()
        gpu_check.run_phase([sys.executable, "-c", {phase!r}], 600.0, __import__("pathlib").Path({str(tmp_path / "log")!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", check])
    deadline = time.monotonic() + 60
    while not (pids_file.exists() and len(pids_file.read_text().split()) == 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(p) for p in pids_file.read_text().split()]
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert _wait_gone(pids), [p for p in pids if not _gone(p)]
    finally:
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, 9)


def _fake_phase(status_rows: list[dict] | None, sleep: float = 0.0, code: int = 0) -> str:
    return textwrap.dedent(f"""
        import json, sys, time
        time.sleep({sleep})
        rows = {status_rows!r}
        if rows is not None:
            open(sys.argv[1], "w").write(json.dumps({{"rows": rows, "gpu_peak_bytes": None}}))
        sys.exit({code})
    """)


def test_report_rows_skips_timeouts_crashes_and_json_equals_table(tmp_path):
    row = gpu_check_phases.row
    scripts = {
        "ok": _fake_phase([row("fine", "met", "12 ms/step", "runs")]),
        "skipped": _fake_phase([row("skipped one", "NOT TESTED", "-", "runs", "no CUDA device")]),
        "slow": _fake_phase([row("never written", "met", "-", "-")], sleep=60),
        "crash": _fake_phase(None, code=3),
        "odd": _fake_phase([row("says passed", "passed", "-", "-")]),
        "left-out": _fake_phase([row("not run", "met", "-", "-")]),
    }
    phases = [gpu_check.Phase(name, f"phase {name}", 5, 2) for name in scripts]

    def command(phase, device, work, result):
        return [sys.executable, "-c", scripts[phase.name], str(result)]

    report = gpu_check.run_check(phases, "cpu", tmp_path, selected=set(scripts) - {"left-out"}, command=command)
    statuses = [(r["phase"], r["status"]) for r in report["rows"]]
    assert statuses == [("ok", "met"), ("skipped", "NOT TESTED"), ("slow", "failed"), ("crash", "failed"),
                        ("odd", "failed"), ("left-out", "NOT TESTED")]
    by_phase = {r["phase"]: r for r in report["rows"]}
    assert by_phase["slow"]["result"].startswith("timed out after 2 s")
    assert by_phase["crash"]["result"] == "exit status 3, no result"
    assert by_phase["left-out"]["why"] == "not selected: --only"
    assert report["verdict"] == "NO-GO (1 met, 3 failed, 2 NOT TESTED)"
    assert gpu_check.exit_status(report) == 1

    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved == report
    lines = [line for line in gpu_check.table(saved).splitlines() if line.startswith("| ")][1:]
    assert len(lines) == len(saved["rows"])
    for line, r in zip(lines, saved["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:5] == [r["phase"], r["check"], gpu_check.status_cell(r) + (
            f" ({r['why']})" if r["status"] == "failed" and r["why"] else ""), r["result"], r["target"]]
    assert "| skipped | skipped one | NOT TESTED (no CUDA device) |" in gpu_check.table(saved)


def test_not_tested_alone_is_no_go_on_a_gpu_and_a_pass_for_the_rehearsal():
    rows = [{"status": "met"}, {"status": "NOT TESTED"}]
    assert gpu_check.verdict(rows, "cuda").startswith("NO-GO")
    assert gpu_check.exit_status({"device": "cuda", "rows": rows}) == 2
    assert gpu_check.verdict(rows, "cpu").startswith("rehearsal passed")
    assert gpu_check.exit_status({"device": "cpu", "rows": rows}) == 0
    assert gpu_check.verdict([{"status": "met"}], "cuda") == "GO (1 met, 0 failed, 0 NOT TESTED)"


def test_skipped_pytest_is_not_tested_never_met(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text(textwrap.dedent("""
        import pytest

        def test_runs():
            assert 1 + 1 == 2

        @pytest.mark.skip(reason="needs two GPUs")
        def test_two_gpus():
            pass
    """))

    def rows_of(*args):
        junit = tmp_path / "junit.xml"
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args,
                                f"--junitxml={junit}", str(tests)], cwd=tmp_path, stdout=subprocess.DEVNULL)
        return gpu_check_phases.pytest_rows(junit, code, "gpu tests")

    rows = rows_of()
    assert [(r["check"], r["status"], r["result"]) for r in rows] == [
        ("gpu tests", "met", "1 passed, 0 failed, 1 skipped"),
        ("  test_sample::test_two_gpus", "NOT TESTED", "skipped")]
    assert rows[1]["why"] == "needs two GPUs"
    only_skipped = rows_of("-k", "two_gpus")  # nothing ran: not a pass
    assert only_skipped[0]["status"] == "NOT TESTED"
    assert all(r["status"] != "met" for r in only_skipped)


def test_generated_cityscapes_folder_reads_back_as_the_rendered_train_ids(tmp_path):
    root = write_cityscapes_layout(tmp_path, {"train": 2, "val": 1}, height=64, width=128, workers=2)
    dataset = CityscapesDataset(root, "train")
    assert dataset.ids == ["synthcity_000000_000000", "synthcity_000000_000001"]
    for index in range(2):
        image, train_ids = render_scene(scene_seed("train", 0, index), 64, 128)
        np.testing.assert_array_equal(dataset.load_image(index), image)
        np.testing.assert_array_equal(dataset.load_mask(index), train_ids)
    assert len(CityscapesDataset(root, "val")) == 1


@pytest.mark.slow
def test_cpu_rehearsal_passes_within_15_minutes_and_16_gb(tmp_path):
    """The whole rehearsal at Cityscapes size (about 15 minutes on 2 quiet cores): nothing fails, only the
    GPU-only phase is NOT TESTED, no phase's processes together peak at 16 GB or more."""
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent / "src")}
    started = time.monotonic()
    code = subprocess.call([sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--out", str(tmp_path)],
                           env=env)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 0, report["verdict"]
    assert {r["phase"] for r in report["rows"] if r["status"] != "met"} == {"gpu-tests"}
    assert max(r["peak_rss_gib"] or 0 for r in report["rows"]) < 16
    assert time.monotonic() - started < 15 * 60
