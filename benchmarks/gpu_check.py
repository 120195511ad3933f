"""Go / no-go for a lent GPU in one unattended run, and its CPU rehearsal at the same image sizes.

    python benchmarks/gpu_check.py --dry-run                   # the phases and their time budgets
    python benchmarks/gpu_check.py --out DIR                   # on the GPU: at most 540 s of phases
    python benchmarks/gpu_check.py --device cpu --out DIR      # the CPU rehearsal (about 15 min on 2 cores)
    python benchmarks/gpu_check.py --out DIR --only train,ddp  # some phases (the others: NOT TESTED)

Each phase (``benchmarks/gpu_check_phases.py``) runs at the release's size -- ResNet-50-V1c at output
stride 8 on 512x1024 crops, batch 4, a ViT-B/16 CLIP teacher with random weights (no download), GLV,
adaptive CARB, bf16, channels-last, over a generated Cityscapes-layout folder of 2048x1024 frames --
in its own process group under its own time budget. On timeout the whole group is killed, and so is
every process it started in a session of its own (torchrun puts its workers in new sessions), so
nothing keeps the GPU busy after the check. The budgets add up to at most 540 s by construction.

Every row is ``met``, ``failed`` or ``NOT TESTED (why)``: a skipped test, a phase that could not run
or one left out with --only is never "met". The table (absolute figures: ms/step, images/s, GiB) and
DIR/gpu_check.json say the same; each phase's output is in DIR/logs/PHASE.log. Peak memory per phase:
the GPU's ``torch.cuda.max_memory_allocated`` and the host RSS of the phase's processes together.
On a CPU the batch is 1 and each phase takes 1-3 steps: shape, dtype and memory bugs at Cityscapes
size show on any machine. Exit status: 0 when every row is met (on a CPU: when none failed),
1 when a row failed, 2 when rows are NOT TESTED but none failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES_SCRIPT = Path(__file__).resolve().parent / "gpu_check_phases.py"
GPU_TOTAL_S = 540  # what one lent-GPU command may take, with margin for start-up, under the 600 s a command gets
CPU_TOTAL_S = 900  # the rehearsal: 15 minutes on a 2-core CPU
KILL_GRACE_S = 5.0  # after SIGTERM (torchrun stops its workers on it), before SIGKILL
POLL_S = 0.2
MET, FAILED, NOT_TESTED = "met", "failed", "NOT TESTED"


@dataclass(frozen=True)
class Phase:
    name: str
    what: str
    gpu_s: int  # time budget on the GPU
    cpu_s: int  # time budget in the CPU rehearsal; 0: not run on a CPU (its rows are NOT TESTED)

    def budget(self, device: str) -> int:
        return self.gpu_s if device == "cuda" else self.cpu_s


PHASES = (
    Phase("data", "generated Cityscapes layout (2048x1024), labels, untrained checkpoint, text embeddings", 25, 25),
    Phase("train", "trainer, ~20 steps from the real DataLoader; loader images/s beside step images/s", 90, 80),
    Phase("ddp", "torchrun --nproc_per_node 1 with train.ddp=always (NCCL + SyncBN; gloo on a CPU)", 60, 80),
    Phase("layout", "NCHW vs channels-last, same weights, forward + backward", 30, 100),
    Phase("pseudo-masks", "carbseg pseudo-masks, 2048x1024, key smoothing, prompt denoising, 3 scales", 45, 150),
    Phase("evaluate", "carbseg evaluate --checkpoint, whole 2048x1024 frames through its loader", 30, 80),
    Phase("predict", "inference throughput at 2048x1024 and carbseg predict end to end", 30, 120),
    Phase("onnx", "export-onnx (free sizes) and onnxruntime parity on a 2048x1024 frame", 45, 125),
    Phase("resume", "exact resume: 2 iterations vs 1 + --resume 1", 60, 140),
    Phase("gpu-tests", "pytest -m gpu: each skipped test a NOT TESTED row", 125, 0),
)
# By construction, not by hope: a plan that outgrows its limit does not import.
assert sum(p.gpu_s for p in PHASES) <= GPU_TOTAL_S, "GPU plan exceeds its 540 s"
assert sum(p.cpu_s for p in PHASES) <= CPU_TOTAL_S, "CPU rehearsal plan exceeds its 15 minutes"


# ---------------------------------------------------------------- processes
def _process_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, start time in clock ticks, RSS bytes), from /proc (Linux); {} elsewhere."""
    table = {}
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
        if fields[0] == "Z":
            continue
        table[int(entry)] = (int(fields[1]), int(fields[19]), int(fields[21]) * page)
    return table


@dataclass
class PhaseRun:
    code: int | None  # exit status of the phase's process; None when it was killed on timeout
    seconds: float
    timed_out: bool
    peak_rss_bytes: int  # host RSS of all the phase's processes together, at its highest


class ProcessTree:
    """A command in its own session (process group), with every descendant it ever had remembered
    (by pid and start time, so a reused pid is not mistaken for one), including those that left the
    group for a session of their own, so that all of them can be killed."""

    def __init__(self, cmd: list[str], log, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.known: dict[int, int] = {}  # pid -> start time
        self.peak_rss = 0

    def sample(self) -> None:
        """Remember the current descendants and add up their RSS."""
        table = _process_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        alive = {pid for pid, start in self.known.items() if table.get(pid, (0, None))[1] == start}
        stack = [self.proc.pid, *alive]
        while stack:
            pid = stack.pop()
            if pid in table and pid not in self.known:
                self.known[pid] = table[pid][1]
                alive.add(pid)
            stack.extend(c for c in children.get(pid, ()) if c not in self.known)
        self.peak_rss = max(self.peak_rss, sum(table[pid][2] for pid in alive if pid in table))

    def _living(self) -> list[int]:
        table = _process_table()
        return [pid for pid, start in self.known.items() if pid in table and table[pid][1] == start]

    def kill(self) -> None:
        """SIGTERM to the group and to every remembered descendant's group (torchrun then stops its
        workers), then SIGKILL to whatever is left."""
        self.sample()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            targets = self._living()
            groups = {self.proc.pid}
            for pid in targets:
                with contextlib.suppress(OSError):
                    groups.add(os.getpgid(pid))
            for group in groups:
                if group in (0, 1, os.getpgrp()):
                    continue  # never the check's own group
                with contextlib.suppress(OSError):
                    os.killpg(group, sig)
            for pid in targets:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            if sig == signal.SIGTERM:
                deadline = time.monotonic() + KILL_GRACE_S
                while time.monotonic() < deadline and self._living():
                    time.sleep(POLL_S)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def exit_on_sigterm() -> None:
    """A SIGTERM to the check (a scheduler's time limit, ``timeout``) unwinds like Ctrl-C, so that
    ``run_phase`` kills the phase that is running instead of leaving it on the GPU."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_phase(cmd: list[str], timeout_s: float, log_path: Path, env: dict[str, str] | None = None) -> PhaseRun:
    """Run ``cmd`` in its own process group for at most ``timeout_s``; whatever it started is gone when
    this returns (on a timeout, and also leftovers of a phase that ended)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        tree = ProcessTree(cmd, log, env)
        timed_out = False
        try:
            while tree.proc.poll() is None:
                tree.sample()
                if time.monotonic() - started > timeout_s:
                    timed_out = True
                    break
                time.sleep(POLL_S)
        except BaseException:  # Ctrl-C, or SIGTERM (main turns it into SystemExit): no phase outlives the check
            tree.kill()
            raise
        seconds = time.monotonic() - started
        code = None if timed_out else tree.proc.returncode
        tree.kill()  # on a timeout the whole tree; otherwise stray grandchildren (an orphaned worker)
    return PhaseRun(code, seconds, timed_out, tree.peak_rss)


# ---------------------------------------------------------------- the check
def machine_line(device: str) -> str:
    """The GPU's name and compute capability, or the CPU line: model, bf16/AMX flags, threads."""
    import torch

    if device == "cuda":
        major, minor = torch.cuda.get_device_capability(0)
        return (f"GPU {torch.cuda.get_device_name(0)} (compute capability {major}.{minor}, "
                f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB) x{torch.cuda.device_count()}; "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    from carbseg.precision import machine_summary

    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    marks = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in ("avx512_bf16", "amx_bf16"))
    return f"{machine_summary('cpu')}; CPU flags: {marks}"


def phase_command(phase: Phase, device: str, work: Path, result: Path) -> list[str]:
    return [sys.executable, str(PHASES_SCRIPT), phase.name, "--device", device, "--work", str(work),
            "--result", str(result)]


def _gib(nbytes) -> str:
    return "-" if not nbytes else f"{nbytes / 2**30:.2f}"


def run_check(phases, device: str, out: Path, selected: set[str] | None = None, command=phase_command,
              env: dict[str, str] | None = None) -> dict:
    """Run ``phases`` in order; returns the report (also written to ``out/gpu_check.json``)."""
    work, logs = out / "work", out / "logs"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for phase in phases:
        base = {"phase": phase.name, "budget_s": phase.budget(device), "seconds": None, "peak_rss_gib": None,
                "gpu_peak_gib": None}
        if selected is not None and phase.name not in selected:
            rows.append({**base, "check": phase.what, "status": NOT_TESTED, "result": "-", "target": "-",
                         "why": "not selected: --only"})
            continue
        if phase.budget(device) <= 0:
            rows.append({**base, "check": phase.what, "status": NOT_TESTED, "result": "-", "target": "-",
                         "why": f"needs a CUDA device; not part of the {device} plan"})
            continue
        result = work / f"{phase.name}.result.json"
        result.unlink(missing_ok=True)
        print(f"gpu_check: {phase.name} (budget {phase.budget(device)} s) ...", flush=True)
        ran = run_phase(command(phase, device, work, result), phase.budget(device), logs / f"{phase.name}.log", env)
        base.update(seconds=round(ran.seconds, 1), peak_rss_gib=round(ran.peak_rss_bytes / 2**30, 2))
        if ran.timed_out:
            phase_rows = [{"check": phase.what, "status": FAILED, "result": f"timed out after {ran.seconds:.0f} s",
                           "target": f"within {phase.budget(device)} s",
                           "why": "killed with its process group and every process it started"}]
        elif not result.is_file():
            phase_rows = [{"check": phase.what, "status": FAILED, "result": f"exit status {ran.code}, no result",
                           "target": "runs", "why": f"see logs/{phase.name}.log"}]
        else:
            reported = json.loads(result.read_text(encoding="utf-8"))
            phase_rows = reported["rows"]
            if reported.get("gpu_peak_bytes"):
                base["gpu_peak_gib"] = round(reported["gpu_peak_bytes"] / 2**30, 2)
        for r in phase_rows:
            status = r.get("status")
            if status not in (MET, FAILED, NOT_TESTED):  # a phase that says anything else is not met
                r = {**r, "status": FAILED, "why": f"unknown status {status!r}"}
            rows.append({**base, **r})
        print(f"gpu_check: {phase.name}: " + ", ".join(r["status"] for r in phase_rows), flush=True)
    report = {"device": device, "machine": machine_line(device), "budget_total_s": sum(p.budget(device) for p in phases),
              "rows": rows, "verdict": verdict(rows, device)}
    path = out / "gpu_check.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return report


def verdict(rows: list[dict], device: str) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in (MET, FAILED, NOT_TESTED)}
    tally = f"{counts[MET]} met, {counts[FAILED]} failed, {counts[NOT_TESTED]} NOT TESTED"
    if counts[FAILED]:
        return f"NO-GO ({tally})"
    if counts[NOT_TESTED]:
        return f"{'rehearsal passed' if device == 'cpu' else 'NO-GO'} ({tally})"
    return f"GO ({tally})"


def status_cell(r: dict) -> str:
    return f"NOT TESTED ({r['why']})" if r["status"] == NOT_TESTED else r["status"]


def table(report: dict) -> str:
    lines = [f"gpu_check on {report['machine']}", "",
             "| phase | check | status | result | target | s / budget | peak RSS GiB | GPU peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.0f} / {r['budget_s']}"
        why = f" ({r['why']})" if r["status"] == FAILED and r.get("why") else ""
        lines.append(f"| {r['phase']} | {r['check']} | {status_cell(r)}{why} | {r['result']} | {r['target']} | "
                     f"{secs} | {_gib((r['peak_rss_gib'] or 0) * 2**30)} | {_gib((r['gpu_peak_gib'] or 0) * 2**30)} |")
    lines += ["", f"verdict: {report['verdict']}"]
    return "\n".join(lines)


def plan_text(phases=PHASES) -> str:
    lines = ["| phase | what | GPU budget s | CPU rehearsal budget s |", "|---|---|---|---|"]
    lines += [f"| {p.name} | {p.what} | {p.gpu_s} | {p.cpu_s or '- (GPU only)'} |" for p in phases]
    lines.append(f"| total | | {sum(p.gpu_s for p in phases)} (limit {GPU_TOTAL_S}) | "
                 f"{sum(p.cpu_s for p in phases)} (limit {CPU_TOTAL_S}) |")
    return "\n".join(lines)


def exit_status(report: dict) -> int:
    statuses = {r["status"] for r in report["rows"]}
    if FAILED in statuses:
        return 1
    if NOT_TESTED in statuses and report["device"] != "cpu":
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default) or cpu (the rehearsal)")
    p.add_argument("--out", type=Path, help="writes OUT/gpu_check.json, OUT/logs/ and OUT/work/")
    p.add_argument("--only", help="comma-separated phases to run; the others are NOT TESTED")
    p.add_argument("--dry-run", action="store_true", help="print the phases and their budgets, run nothing")
    args = p.parse_args(argv)
    if args.dry_run:
        print(plan_text())
        return 0
    if args.out is None:
        p.error("--out DIR is required (unless --dry-run)")
    exit_on_sigterm()
    names = {ph.name for ph in PHASES}
    selected = None
    if args.only:
        selected = {name.strip() for name in args.only.split(",")}
        unknown = selected - names
        if unknown:
            p.error(f"--only: unknown phase(s) {', '.join(sorted(unknown))}; valid: {', '.join(ph.name for ph in PHASES)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU visible; for the CPU rehearsal run with --device cpu", file=sys.stderr)
            return 2
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    report = run_check(PHASES, args.device, args.out, selected, env=env)
    print(table(report))
    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
