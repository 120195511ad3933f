"""benchmarks/bench_fastpaths.py: its memory column measures what a call allocates, and the table runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fastpaths.py"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_peak_bytes_measures_one_calls_allocation():
    # In a child process: the benchmark changes glibc's thresholds for the whole process.
    code = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('bench', {str(SCRIPT)!r})\n"
        "bench = sys.modules['bench'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)\n"
        "bench._return_freed_memory()\n"
        "held = torch.ones(4 * 2**20)  # 16 MiB already there: not counted\n"
        "peaks = [bench.peak_bytes(lambda: torch.ones(16 * 2**20)) for _ in range(3)]\n"
        "big = torch.ones(4 * 2**20 + 1); del big  # glibc's own rule would now keep blocks up to this size in its heap\n"
        "warm = [torch.ones(2 * 2**20) for _ in range(3)]; del warm  # ... and these 24 MiB, freed, for reuse\n"
        "peaks += [bench.peak_bytes(lambda: torch.ones(2 * 2**20) + 1)]  # 8 MiB input + 8 MiB result\n"
        "print(' '.join(str(p) for p in peaks))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    *sixty_four, sixteen = (int(v) / 2**20 for v in out.split())
    for peak in sixty_four:  # each call's 64 MiB again, not once for the process
        assert 63 <= peak <= 68, sixty_four
    assert 15 <= sixteen <= 20, sixteen


@pytest.mark.slow
def test_the_table_runs_and_names_the_rule():  # about a minute of CPU
    out = subprocess.run([sys.executable, str(SCRIPT), "--only", "upsample", "--repeats", "1"], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    rows = [line for line in out.splitlines() if line.startswith("| upsample |")]
    assert out.startswith("machine: CPU ") and len(rows) == 9
    taken = {row.split(" | ")[1]: row.rstrip(" |").split(" | ")[-1] for row in rows}
    assert taken["demo 4x19 16x32->128x256"] == "yes" and taken["demo, bf16 logits"] == "no"
    assert taken["Cityscapes 1x19 128x256->1024x2048"] == "no"
