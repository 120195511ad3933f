"""carbseg.allocator: glibc keeps freed memory in the process (no page faults on every step)."""

from __future__ import annotations

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


_FAULTS = textwrap.dedent("""
    import resource, torch
    from carbseg.allocator import keep_freed_memory
    keep_freed_memory()
    def rounds(n):  # tensors of mixed sizes freed out of order, as in a training step
        for _ in range(n):
            tensors = [torch.ones(int(m * 2**20) // 4) for m in (0.3, 0.7, 1.5, 3, 6, 0.3, 12, 0.7, 24)]
            for i in (1, 3, 5, 7, 0, 2, 4, 6, 8):
                tensors[i] = None
    rounds(3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rounds(20)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
""")


@pytest.mark.skipif(allocator._glibc_mallopt() is None, reason="glibc only")
def test_kept_memory_stops_the_page_faults():
    """The real effect, each in a fresh process: the same allocation pattern faults pages in on every
    round with glibc's defaults and (almost) never with the thresholds set."""
    def faults(choice: str) -> float:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env[allocator.ENV] = choice
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    default = faults("default")
    if default < 100:
        pytest.skip(f"this C library already reuses the blocks ({default:.0f} faults a round with its defaults)")
    kept = faults("keep")
    assert kept < default / 10, (kept, default)
