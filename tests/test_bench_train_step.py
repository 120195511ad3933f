"""benchmarks/bench_train_step.py: each variant's peak memory is its own, not the largest variant's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeCudaAllocator:
    """torch.cuda's peak counter: ``allocate`` raises the peak above what stays resident, ``reset``
    brings the peak down to what is resident now (as ``reset_peak_memory_stats`` does)."""

    def __init__(self, resident_mib: float):
        self.resident = resident_mib * 2**20
        self.peak = self.resident

    def allocate(self, mib: float) -> None:
        self.peak = max(self.peak, self.resident + mib * 2**20)

    def reset(self, device=None) -> None:
        self.peak = self.resident


def test_each_interleaved_variant_reports_its_own_peak(bench, monkeypatch):
    allocator = FakeCudaAllocator(resident_mib=10)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", allocator.reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator.peak)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    def variant(transient_mib):
        def step(timer, generator):
            with timer.part("forward"):
                allocator.allocate(transient_mib)
        return step

    # fp32 first, as the benchmark orders them: its larger peak must not become the optimised row's.
    built = {"fp32": (variant(300), {}), "optimised": (variant(120), {}), "optimised-nchw": (variant(200), {})}
    results = bench.time_interleaved(built, steps=2, warmup=1, device=torch.device("cuda"))
    assert {name: r["peak_mib"] for name, r in results.items()} == {
        "fp32": 310.0, "optimised": 130.0, "optimised-nchw": 210.0}
    assert all(len(r["steps"]) == 2 and set(r["parts"]) == {"forward"} for r in results.values())


def test_peak_off_cuda_is_none_and_the_step_still_runs(bench):
    ran = []
    assert bench.peak_mib_of(torch.device("cpu"), lambda: ran.append(1)) is None and ran == [1]
