"""carbseg.allocator: glibc keeps freed memory in the process (no page faults on every step)."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from carbseg import allocator
from carbseg.errors import UserError


@pytest.fixture
def fresh(monkeypatch):
    """A process in which keep_freed_memory has not run yet, with a recording mallopt."""
    calls: list[tuple[int, int]] = []
    answer = {"value": 1}

    def mallopt(param, value):
        calls.append((param, value))
        return answer["value"]

    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setattr(allocator, "_glibc_mallopt", lambda: mallopt)
    monkeypatch.delenv(allocator.ENV, raising=False)
    return calls, answer


def test_sets_both_thresholds_once(fresh):
    calls, _ = fresh
    assert allocator.allocator_state() == "default (not set in this process)"
    assert allocator.keep_freed_memory() == "kept (glibc)"
    # M_MMAP_THRESHOLD = -3 at glibc's 64-bit maximum (32 MiB), M_TRIM_THRESHOLD = -1 at the largest int.
    assert calls == [(-3, 32 * 2**20), (-1, 2**31 - 1)]
    assert allocator.keep_freed_memory() == "kept (glibc)"
    assert len(calls) == 2, "idempotent: the second call must not call mallopt again"
    assert allocator.allocator_state() == "kept (glibc)"


def test_env_default_leaves_glibc_alone(fresh, monkeypatch):
    calls, _ = fresh
    monkeypatch.setenv(allocator.ENV, "default")
    assert allocator.keep_freed_memory() == "default (CARBSEG_ALLOCATOR=default)"
    assert calls == []


def test_bad_env_value_is_a_clear_error(fresh, monkeypatch):
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(UserError, match="CARBSEG_ALLOCATOR='jemalloc'.*'keep'.*'default'"):
        allocator.keep_freed_memory()


def test_refused_and_missing_mallopt(fresh, monkeypatch):
    calls, answer = fresh
    answer["value"] = 0
    assert allocator.keep_freed_memory() == "default (mallopt refused)"
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setattr(allocator, "_glibc_mallopt", lambda: None)
    assert allocator.keep_freed_memory() == "default (not glibc)"


def test_not_glibc_means_no_mallopt(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("", ""))
    assert allocator._glibc_mallopt() is None


def test_cli_sets_it_before_running_a_command(monkeypatch, tmp_path):
    from carbseg import cli

    seen = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: seen.append("called") or "kept (glibc)")
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert seen == []  # argparse's own exits come before any work
    code = cli.main(["labels", "--dataset", "camvid", "--root", str(tmp_path / "missing"), "--split", "train",
                     "--out", str(tmp_path / "labels.json")])
    assert code == 2 and seen == ["called"]


_HEAP = textwrap.dedent("""
    import ctypes, torch
    from carbseg.allocator import keep_freed_memory
    keep_freed_memory()

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2()
    tensor = torch.ones(20 * 2**20 // 4)  # 20 MiB: above glibc's initial mmap threshold (128 KiB)
    during = libc.mallinfo2()
    del tensor
    after = libc.mallinfo2()
    # bytes of the block in mmapped regions while alive; heap bytes given back to the system when it was freed
    print(during.hblkhd - before.hblkhd, during.arena - after.arena)
""")


def _has_mallinfo2() -> bool:
    return allocator._glibc_mallopt() is not None and hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc >= 2.33 only (mallinfo2)")
def test_kept_memory_serves_blocks_from_the_heap_and_keeps_them():
    """The real effect, each in a fresh process, read from glibc's own counters (page-fault counts were too
    noisy on a virtual machine to test): with glibc's defaults a 20 MiB tensor is mmapped (and unmapped when
    freed, so the next one faults its pages in again); with the thresholds set it comes from the heap, and
    freeing it gives nothing back to the system."""
    def counters(choice: str) -> tuple[int, int]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env[allocator.ENV] = choice
        out = subprocess.run([sys.executable, "-c", _HEAP], env=env, capture_output=True, text=True, check=True)
        mapped, returned = (int(v) for v in out.stdout.split())
        return mapped, returned

    mapped, _ = counters("default")
    if mapped < 20 * 2**20:
        pytest.skip(f"this C library does not map a 20 MiB block by default ({mapped} bytes mapped)")
    mapped, returned = counters("keep")
    assert mapped < 2**20, f"the 20 MiB block was mmapped ({mapped} bytes) with the thresholds set"
    assert returned <= 0, f"freeing it gave {returned} heap bytes back to the system"
