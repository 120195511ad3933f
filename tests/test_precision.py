"""Precision ``auto`` on a CPU: a timed probe's answer, cached per machine, kept by a resumed run.

The choice logic is tested with fake probes giving both answers (no CPU here need have fast bf16);
the bf16 code paths of the teacher, the trainer and inference are run for real (slowly where bf16 is
emulated, as on AVX2-only CPUs).
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from carbseg import precision
from carbseg.cli import main
from carbseg.engine.checkpoint import load_training_state
from carbseg.errors import UserError
from test_reliability_common import make_scenes, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def probe_env(monkeypatch, tmp_path):
    """No forced choice (conftest pins fp32 for the rest of the suite), a private cache, no memo, and an
    idle machine (this shared one may be busy; the tests under load say so themselves)."""
    monkeypatch.delenv(precision.ENV_CHOICE, raising=False)
    cache = tmp_path / "cache" / "cpu_precision.json"
    monkeypatch.setenv(precision.ENV_CACHE, str(cache))
    monkeypatch.setattr(precision, "_memo", {})
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    return cache


class FakeProbe:
    """Stands for ``precision.measure``: fixed timings, and a record of the workloads it was asked for
    (with ``under_load`` where it was set)."""

    def __init__(self, fp32: float, bf16: float, seconds: float = 0.0):
        self.timings, self.calls, self.loaded, self.seconds = {"fp32": fp32, "bf16": bf16}, [], [], seconds

    def __call__(self, workload: str, under_load: bool = False) -> dict[str, float]:
        self.calls.append(workload)
        self.loaded.append(under_load)
        time.sleep(self.seconds)  # a probe that takes time, for the concurrent starts
        return dict(self.timings)


def test_bf16_only_where_measured_faster_by_the_margin():
    assert precision.MARGIN == 1.2
    assert precision.decide({"fp32": 1.0, "bf16": 0.8}) == "bf16"  # 1.25x faster
    assert precision.decide({"fp32": 1.2, "bf16": 1.0}) == "bf16"  # exactly the margin
    assert precision.decide({"fp32": 1.0, "bf16": 0.85}) == "fp32"  # 1.18x: within noise, not taken
    assert precision.decide({"fp32": 1.0, "bf16": 1.0}) == "fp32"
    assert precision.decide({"fp32": 0.12, "bf16": 0.83}) == "fp32"  # nn.Linear on the AVX2 CPU of RESULTS.md


def test_fake_probe_both_answers_and_the_cache_round_trip(probe_env):
    fast = FakeProbe(fp32=2.0, bf16=0.5)
    choice = precision.cpu_choice("teacher", measure_fn=fast)
    assert (choice.name, choice.autocast_dtype) == ("bf16", torch.bfloat16) and fast.calls == ["teacher"]
    assert choice.reason == "probe: bf16 autocast 4.00x fp32's speed on the teacher probe (bf16 needs >= 1.2x)"
    slow = FakeProbe(fp32=0.1, bf16=0.7)
    choice = precision.cpu_choice("segmenter", measure_fn=slow)
    assert (choice.name, choice.autocast_dtype) == ("fp32", None) and slow.calls == ["segmenter"]
    assert choice.reason.startswith("probe: bf16 autocast 0.14x fp32's speed on the segmenter probe")

    # Written once per machine key; read back without probing again, whatever a probe would say now.
    key = precision.machine_key()
    assert json.loads(probe_env.read_text()) == {key: {"teacher": {"fp32": 2.0, "bf16": 0.5},
                                                       "segmenter": {"fp32": 0.1, "bf16": 0.7}}}
    again = FakeProbe(fp32=0.1, bf16=0.7)
    cached = precision.cpu_choice("teacher", measure_fn=again)
    assert cached.name == "bf16" and again.calls == []
    assert cached.reason.startswith(f"cached probe ({probe_env}): bf16 autocast 4.00x")
    assert precision.cpu_choice("segmenter", measure_fn=FakeProbe(2.0, 0.5)).name == "fp32"


def _fake_cpu(monkeypatch, tmp_path, name: str, flags: str | None, onednn_bf16: bool) -> None:
    """This process sees another CPU: a ``/proc/cpuinfo`` with ``flags`` (no flags line where None, as off
    Linux) and oneDNN's bf16 answer."""
    info = tmp_path / f"cpuinfo-{name}"
    flags_line = f"flags\t\t: fpu sse avx2 {flags}\n" if flags is not None else ""
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\n" + flags_line)
    monkeypatch.setattr(precision, "CPUINFO", info)
    monkeypatch.setattr(precision, "native_bf16", lambda device: onednn_bf16)


def test_the_cache_key_is_what_decides_the_answer(probe_env, monkeypatch, tmp_path):
    """Model name, the CPU's bf16 flags, logical cores, torch, threads and the probe's version."""
    monkeypatch.setattr(precision.os, "cpu_count", lambda: 64)
    _fake_cpu(monkeypatch, tmp_path, "amx", "amx_tile avx512_bf16 avx512f amx_bf16", onednn_bf16=True)
    assert precision.cpu_bf16_flags() == ("amx_bf16", "amx_tile", "avx512_bf16")
    assert precision.machine_key() == (f"AMD EPYC | bf16 flags amx_bf16,amx_tile,avx512_bf16 | 64 cores | torch "
                                       f"{torch.__version__} | 1 threads | probe {precision.PROBE_VERSION}")
    _fake_cpu(monkeypatch, tmp_path, "avx2", "avx512f", onednn_bf16=False)
    assert precision.machine_key().startswith("AMD EPYC | bf16 flags none | 64 cores | torch")
    assert not precision.cpu_bf16_native()
    _fake_cpu(monkeypatch, tmp_path, "mac", None, onednn_bf16=True)  # no flags line: oneDNN's answer decides
    assert precision.cpu_bf16_flags() is None and precision.cpu_bf16_native()
    assert precision.machine_key().startswith("AMD EPYC | bf16 flags unknown | 64 cores")
    precision.cpu_choice("teacher", measure_fn=FakeProbe(2.0, 0.5))
    torch.set_num_threads(2)  # the one_thread fixture restores the count afterwards
    other = FakeProbe(fp32=0.1, bf16=0.7)
    assert precision.cpu_choice("teacher", measure_fn=other).name == "fp32" and other.calls == ["teacher"]
    assert len(json.loads(probe_env.read_text())) == 2


def test_a_cache_copied_from_a_cpu_with_other_flags_is_not_used(probe_env, monkeypatch, tmp_path):
    """Two CPUs named "AMD EPYC": bf16 measured faster on the one with AMX. A home folder copied to the
    one with AVX512-BF16 only (where, say, the probe answers fp32) is measured again, not trusted."""
    _fake_cpu(monkeypatch, tmp_path, "amx", "amx_bf16 amx_tile avx512_bf16", onednn_bf16=True)
    assert precision.cpu_choice("segmenter", measure_fn=FakeProbe(2.0, 0.5)).name == "bf16"
    monkeypatch.setattr(precision, "_memo", {})  # the next process, on the other CPU
    _fake_cpu(monkeypatch, tmp_path, "zen4", "avx512_bf16", onednn_bf16=True)
    probe = FakeProbe(fp32=1.0, bf16=0.95)
    choice = precision.cpu_choice("segmenter", measure_fn=probe)
    assert (choice.name, probe.calls) == ("fp32", ["segmenter"]) and choice.reason.startswith("probe:")
    assert len(json.loads(probe_env.read_text())) == 2  # both CPUs' answers kept, each under its own key


def test_a_cached_bf16_answer_is_dropped_where_the_cpu_has_no_native_bf16(probe_env, monkeypatch, tmp_path):
    """Where the key cannot tell the CPUs apart (no flags line, as off Linux), a cached bf16 answer on a
    CPU without native bf16 is measured again; a cached fp32 answer there is kept."""
    _fake_cpu(monkeypatch, tmp_path, "mac", None, onednn_bf16=True)
    precision.cpu_choice("teacher", measure_fn=FakeProbe(2.0, 0.5))  # bf16, cached
    precision.cpu_choice("segmenter", measure_fn=FakeProbe(0.1, 0.7))  # fp32, cached
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    again = FakeProbe(fp32=0.1, bf16=0.9)
    assert precision.cpu_choice("teacher", measure_fn=again).name == "fp32" and again.calls == ["teacher"]
    kept = FakeProbe(fp32=2.0, bf16=0.5)
    assert precision.cpu_choice("segmenter", measure_fn=kept).name == "fp32" and kept.calls == []
    assert json.loads(probe_env.read_text())[precision.machine_key()]["teacher"] == {"fp32": 0.1, "bf16": 0.9}


def test_env_var_overrides_and_bad_values(probe_env, monkeypatch):
    monkeypatch.setenv(precision.ENV_CHOICE, " BF16 ")
    never = FakeProbe(1.0, 1.0)
    choice = precision.cpu_choice("segmenter", measure_fn=never)
    assert choice == precision.PrecisionChoice("bf16", "CARBSEG_CPU_PRECISION=bf16") and never.calls == []
    monkeypatch.setenv(precision.ENV_CHOICE, "fp32")
    assert precision.cpu_choice("teacher", measure_fn=FakeProbe(2.0, 0.5)).name == "fp32"
    monkeypatch.setenv(precision.ENV_CHOICE, "half")
    with pytest.raises(UserError, match="CARBSEG_CPU_PRECISION='half' is not valid; set it to fp32 or bf16"):
        precision.cpu_choice("teacher")
    assert not probe_env.exists()


TRUNCATED = '{"KEY": {"segmenter": {"fp32": 0.1, "bf16": 0.7}, "teacher": {"fp32": 2.0, "bf'


@pytest.mark.parametrize("content", [
    "{not json", "[1, 2]", TRUNCATED, "", '{"KEY": 5}', '{"KEY": {"teacher": {"fp32": "x"}}}',
    '{"KEY": {"teacher": {"fp32": 1.0, "bf16": 0}}}',
    '{"KEY": {"teacher": {"fp32": 1.0, "bf16": 0.5, "bf16_wins": 9, "pairs": 7}}}',
    '{"KEY": {"teacher": {"fp32": 1.0, "bf16": 0.5, "pairs": 7}}}', '{"KEY": {"teacher": {"fp32": 1.0, "bf16": 0.5, '
    '"bf16_wins": 1}}}', '{"KEY": {"teacher": {"fp32": 1.0, "bf16": 0.5, "bf16_wins": 0, "pairs": 0}}}'])
def test_a_broken_cache_file_is_measured_again_and_repaired(probe_env, content, caplog):
    """Damaged (a write cut short, a hand edit): one warning naming the file, a new probe, a file rewritten
    whole; the next question (the other workload) reads the repaired file without warning again."""
    probe_env.parent.mkdir(parents=True)
    probe_env.write_text(content.replace("KEY", precision.machine_key()))
    probe = FakeProbe(fp32=2.0, bf16=0.5)
    with caplog.at_level("WARNING", logger="carbseg.precision"):
        assert precision.cpu_choice("teacher", measure_fn=probe).name == "bf16" and probe.calls == ["teacher"]
        precision.cpu_choice("segmenter", measure_fn=FakeProbe(0.1, 0.7))
        precision.cpu_choice("teacher", measure_fn=probe)
    assert probe.calls == ["teacher"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{probe_env}: ") and "ignored" in warnings[0]
    assert json.loads(probe_env.read_text())[precision.machine_key()] == {"teacher": {"fp32": 2.0, "bf16": 0.5},
                                                                         "segmenter": {"fp32": 0.1, "bf16": 0.7}}


def test_an_unwritable_cache_only_means_probing_again(probe_env):
    probe_env.parent.write_text("a file where the cache folder should be")
    probe = FakeProbe(fp32=2.0, bf16=0.5)
    assert precision.cpu_choice("teacher", measure_fn=probe).name == "bf16" and probe.calls == ["teacher"]


PROBING_PROCESS = """
import os, sys, time
from pathlib import Path
from carbseg import precision

os.getloadavg = lambda: (0.0, 0.0, 0.0)  # an idle machine: only the other probe makes this one busy

workload, folder = sys.argv[1], Path(sys.argv[2])
(folder / workload).touch()
while len(list(folder.iterdir())) < 2:  # both processes ready: they start probing together
    time.sleep(0.01)

def fake(w, under_load=False):
    time.sleep(0.5)
    return {"teacher": {"fp32": 2.0, "bf16": 0.5}, "segmenter": {"fp32": 0.1, "bf16": 0.7}}[w]

print(precision.cpu_choice(workload, measure_fn=fake).name, flush=True)
"""


def test_two_processes_probing_together_share_the_cache(probe_env, tmp_path):
    """As the two training processes of a study started at once: separate processes, one cache file."""
    import os
    import subprocess
    import sys

    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the fixture's cache and unset choice are inherited
    procs = [subprocess.Popen([sys.executable, "-c", PROBING_PROCESS, w, str(ready)], env=env, text=True,
                              stdout=subprocess.PIPE) for w in ("teacher", "segmenter")]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["bf16", "fp32"]
    entry = json.loads(probe_env.read_text())[precision.machine_key()]
    assert {k: (v["fp32"], v["bf16"]) for k, v in entry.items()} == {"teacher": (2.0, 0.5), "segmenter": (0.1, 0.7)}
    # The one that waited for the other's lock measured a busy machine; the other did not.
    assert sorted(v.get("measured_under", "idle") for v in entry.values()) == ["another probe was running", "idle"]


def test_without_fcntl_the_cache_works_unlocked(probe_env, monkeypatch):
    """Windows has no fcntl: no lock file is opened (none left open), the probe's answer is still cached."""
    monkeypatch.setattr(precision, "fcntl", None)
    probe = FakeProbe(fp32=2.0, bf16=0.5)
    assert precision.cpu_choice("teacher", measure_fn=probe).name == "bf16" and probe.loaded == [False]
    assert json.loads(probe_env.read_text())[precision.machine_key()]["teacher"] == {"fp32": 2.0, "bf16": 0.5}
    assert sorted(p.name for p in probe_env.parent.iterdir()) == ["cpu_precision.json"]


class ProductDtypes(TorchDispatchMode):
    """Records the dtypes that the matrix products, attention and convolutions run under it computed in
    (after autocast's casts: what the CPU really multiplied), forward and backward."""

    PRODUCTS = ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "convolution", "scaled_dot_product",
                "_scaled_dot_product", "mkldnn_")  # inference mode keeps linear and attention whole

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__.startswith(self.PRODUCTS):
            outputs = out if isinstance(out, (tuple, list)) else (out,)
            self.dtypes |= {t.dtype for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point()}
        return out


def test_the_real_probes_time_the_dtype_they_name_and_auto_never_picks_a_slower_bf16(probe_env, monkeypatch):
    """The probes' timed calls, as ``measure`` makes them, are watched: the fp32 calls multiply in fp32
    only, the bf16 calls in bf16 (the segmenter's depthwise convolution stays fp32 by design). A probe that
    ignored its dtype -- timing fp32 twice -- would pass every timing check and quietly keep a bf16 CPU
    in fp32; here it fails."""
    calls, real = [], dict(precision.PROBES)
    for workload in precision.WORKLOADS:
        def watched(build=precision.PROBES[workload], workload=workload):
            run = build()

            def timed(dtype):
                with ProductDtypes() as products:
                    run(dtype)
                calls.append((workload, dtype, products.dtypes))
            return timed

        monkeypatch.setitem(precision.PROBES, workload, watched)
        timings = precision.measure(workload, rounds=1)
        assert set(timings) == {"fp32", "bf16"} and all(0 < t < 60 for t in timings.values())
    for workload in precision.WORKLOADS:
        ran = [(dtype, dtypes) for w, dtype, dtypes in calls if w == workload]
        assert {dtype for dtype, _ in ran} == {None, torch.bfloat16}  # both precisions were timed
        assert all(dtypes == {torch.float32} for dtype, dtypes in ran if dtype is None)
        bf16 = [dtypes for dtype, dtypes in ran if dtype is torch.bfloat16]
        expected = {torch.bfloat16} if workload == "teacher" else {torch.bfloat16, torch.float32}
        assert all(dtypes == expected for dtypes in bf16), (workload, bf16)
    precision.PROBES.update(real)  # unwatched again, for the timed choice
    teacher = precision.teacher_precision("auto", "cpu")
    segmenter = precision.segmenter_precision("cpu")
    cached = json.loads(probe_env.read_text())[precision.machine_key()]
    assert set(cached) == {"teacher", "segmenter"}
    # Whatever this CPU is, the choice is the cached measurement's: bf16 only if >= 1.2x faster.
    assert teacher.name == precision.decide(cached["teacher"])
    assert segmenter.name == precision.decide(cached["segmenter"])
    # The process remembers the answer: a second call reads neither the probe nor the file.
    probe_env.unlink()
    assert precision.segmenter_precision("cpu") is segmenter and not probe_env.exists()


class ScriptedClock:
    """A fake ``time.perf_counter`` and probe: each probe call advances the clock by the seconds scripted
    for its dtype and call number, and is recorded, so ``measure``'s warm-up and early exit are testable."""

    def __init__(self, seconds: dict[str, list[float]]):
        self.now, self.seconds, self.calls = 0.0, seconds, []

    def perf_counter(self) -> float:
        return self.now

    def probe(self, dtype: torch.dtype | None) -> None:
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        done = sum(call == name for call in self.calls)
        self.calls.append(name)
        self.now += self.seconds[name][min(done, len(self.seconds[name]) - 1)]


def _scripted_measure(monkeypatch, seconds: dict[str, list[float]]) -> tuple[dict[str, float], list[str]]:
    clock = ScriptedClock(seconds)
    monkeypatch.setattr(precision.time, "perf_counter", clock.perf_counter)
    monkeypatch.setitem(precision.PROBES, "teacher", lambda: clock.probe)
    return precision.measure("teacher", rounds=3), clock.calls


def test_bf16s_slow_first_call_is_an_untimed_warm_up(monkeypatch):
    """On an AMX CPU oneDNN's first bf16 call builds kernels (3x fp32's time, measured); timed, it made
    the early exit choose fp32 where warm bf16 is faster. It is now run once untimed, like fp32's."""
    timings, calls = _scripted_measure(monkeypatch, {"fp32": [1.0], "bf16": [3.5, 0.5]})
    assert calls == ["fp32", "bf16"] + ["fp32", "bf16"] * 4  # warm-ups, the first timed pair, 3 rounds
    assert timings == {"fp32": 1.0, "bf16": 0.5} and precision.decide(timings) == "bf16"


def test_an_emulated_bf16_stops_after_one_timed_pair(monkeypatch):
    """Warm bf16 over 3x fp32's time (AVX2-only CPUs): decided after the first timed pair."""
    timings, calls = _scripted_measure(monkeypatch, {"fp32": [1.0], "bf16": [8.0]})
    assert calls == ["fp32", "bf16", "fp32", "bf16"]
    assert timings == {"fp32": 1.0, "bf16": 8.0} and precision.decide(timings) == "fp32"


def test_under_load_each_interleaved_pair_votes(monkeypatch):
    """Beside another job a probe's calls are slowed at random. Here the fp32 calls of three pairs ran
    while the load let up: the medians say bf16 (2x), but bf16 won clearly (>= 1.2x) in only 1 of the 7
    pairs, so a busy machine answers fp32; the same calls on an idle machine keep the medians' answer."""
    # Each: the untimed warm-up, the first timed pair, then the 7 rounds.
    seconds = {"fp32": [1.0, 1.0] + [1.0, 1.0, 1.0, 1.0, 0.55, 0.55, 0.55],
               "bf16": [0.5, 0.5] + [0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5]}
    clock = ScriptedClock(seconds)
    monkeypatch.setattr(precision.time, "perf_counter", clock.perf_counter)
    monkeypatch.setitem(precision.PROBES, "teacher", lambda: clock.probe)
    loaded = precision.measure("teacher", under_load=True)
    assert clock.calls == ["fp32", "bf16"] * 2 + ["fp32", "bf16"] * precision.LOADED_ROUNDS == ["fp32", "bf16"] * 9
    assert loaded == {"fp32": 1.0, "bf16": 0.5, "bf16_wins": 1, "pairs": 7}
    assert precision.decide(loaded) == "fp32"
    assert precision.decide({"fp32": 1.0, "bf16": 0.5}) == "bf16"  # the medians alone
    assert precision.decide({"fp32": 1.0, "bf16": 0.5, "bf16_wins": 4, "pairs": 7}) == "bf16"
    assert precision.decide({"fp32": 1.0, "bf16": 0.5, "bf16_wins": 3, "pairs": 6}) == "fp32"  # a tie is no win


def test_a_probe_under_load_is_provisional_and_measured_again_when_idle(probe_env, monkeypatch):
    cores = precision.os.cpu_count()
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (cores + 0.5, 1.0, 1.0))
    busy = FakeProbe(fp32=2.0, bf16=0.5)
    choice = precision.cpu_choice("teacher", measure_fn=busy)
    assert busy.loaded == [True] and choice.name == "bf16"
    assert choice.reason.endswith(f"; provisional (measured under load: load average {cores + 0.5:.1f} >= {cores} "
                                  "cores), again when idle")
    entry = json.loads(probe_env.read_text())[precision.machine_key()]["teacher"]
    assert entry == {"fp32": 2.0, "bf16": 0.5, "provisional": True,
                     "measured_under": f"load average {cores + 0.5:.1f} >= {cores} cores"}
    # Still busy at the next start: the provisional answer is used, not measured under load again.
    still = FakeProbe(fp32=0.1, bf16=0.7)
    assert precision.cpu_choice("teacher", measure_fn=still).name == "bf16" and still.calls == []
    # The first idle start measures again, and its answer is no longer provisional.
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (0.2, 0.5, 1.0))
    idle = FakeProbe(fp32=0.1, bf16=0.7)
    choice = precision.cpu_choice("teacher", measure_fn=idle)
    assert (idle.calls, idle.loaded, choice.name) == (["teacher"], [False], "fp32")
    assert json.loads(probe_env.read_text())[precision.machine_key()]["teacher"] == {"fp32": 0.1, "bf16": 0.7}
    assert precision.cpu_choice("teacher", measure_fn=FakeProbe(2.0, 0.5)).name == "fp32"  # kept now


def _start_together(*calls):
    """Run the calls in threads started at the same moment; their results in order."""
    barrier, results = threading.Barrier(len(calls)), [None] * len(calls)

    def run(index, call):
        barrier.wait()
        results[index] = call()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_two_concurrent_probes_take_turns_and_both_answers_are_kept(probe_env):
    """Two runs starting together (two study runs, two trainings) once probed at the same time, each
    disturbing the other, and wrote the cache without a lock. Now the second waits for the first's lock,
    knows another probe was running (so its own measurement is of a busy machine: interleaved pairs,
    provisional), and the read-modify-writes keep both answers in a valid file."""
    teacher, segmenter = FakeProbe(2.0, 0.5, seconds=0.4), FakeProbe(0.1, 0.7, seconds=0.4)
    chosen = _start_together(lambda: precision.cpu_choice("teacher", measure_fn=teacher),
                             lambda: precision.cpu_choice("segmenter", measure_fn=segmenter))
    assert [c.name for c in chosen] == ["bf16", "fp32"]
    assert sorted(teacher.loaded + segmenter.loaded) == [False, True]  # one ran alone, one waited for it
    entry = json.loads(probe_env.read_text())[precision.machine_key()]
    second = "teacher" if teacher.loaded == [True] else "segmenter"
    assert entry[second]["provisional"] is True and entry[second]["measured_under"] == "another probe was running"
    assert {k: entry[k]["fp32"] for k in entry} == {"teacher": 2.0, "segmenter": 0.1}


def test_two_concurrent_starts_of_one_workload_probe_once(probe_env):
    """The second waits for the first's probe and reads its answer: one probe, one answer for both."""
    probe = FakeProbe(2.0, 0.5, seconds=0.4)
    chosen = _start_together(lambda: precision.cpu_choice("teacher", measure_fn=probe),
                             lambda: precision.cpu_choice("teacher", measure_fn=probe))
    assert probe.calls == ["teacher"] and [c.name for c in chosen] == ["bf16", "bf16"]
    assert sorted(c.reason.split(":")[0] for c in chosen) == [f"cached probe ({probe_env})", "probe"]
    assert json.loads(probe_env.read_text()) == {precision.machine_key(): {"teacher": {"fp32": 2.0, "bf16": 0.5}}}


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_the_probe_runs_when_first_asked_for_inside_inference(probe_env, mode):
    """On a new machine the first question may come from ``carbseg predict`` (under inference mode): the
    segmenter probe's backward still runs there (it once failed: "element 0 of tensors does not require
    grad"), and the caller's mode is unchanged afterwards."""
    with getattr(torch, mode)():
        choice = precision.segmenter_precision("cpu")
        assert not torch.is_grad_enabled()
    assert choice.name in ("fp32", "bf16") and "probe:" in choice.reason
    assert set(json.loads(probe_env.read_text())[precision.machine_key()]) == {"segmenter"}


def test_the_segmenter_probe_leaves_the_global_random_stream_alone():
    """The probe may run inside ``carbseg train`` (no cached answer): a run's random stream must not
    depend on whether it did."""
    state = torch.random.get_rng_state()
    precision.PROBES["segmenter"]()(None)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_explicit_precisions_and_the_training_choice(probe_env, monkeypatch):
    cpu = torch.device("cpu")
    assert precision.teacher_precision("fp32", cpu) == precision.PrecisionChoice("fp32", "asked for")
    assert precision.teacher_precision("bf16", cpu).autocast_dtype == torch.bfloat16
    monkeypatch.setenv(precision.ENV_CHOICE, "bf16")
    chosen = precision.training_precision("auto", cpu, clip_teacher=True)
    assert (chosen["model"].name, chosen["teacher"].name) == ("bf16", "bf16")
    assert precision.training_autocast_dtype("auto", cpu) == torch.bfloat16
    assert precision.inference_autocast_dtype(cpu) == torch.bfloat16
    assert precision.training_precision("off", cpu, clip_teacher=False) == {
        "model": precision.PrecisionChoice("fp32", "train.amp = off"), "teacher": None}
    # A resumed CPU run keeps what its checkpoint recorded, whatever the probe answers now.
    record = precision.recorded_precision({"model": precision.PrecisionChoice("fp32", "x"),
                                           "teacher": precision.PrecisionChoice("fp32", "y")}, cpu)
    assert record == {"device": "cpu", "model": "fp32", "teacher": "fp32"}
    kept = precision.training_precision("auto", cpu, clip_teacher=True, saved=record)
    assert kept == {"model": precision.PrecisionChoice("fp32", "train.amp = auto, as chosen when this run started"),
                    "teacher": precision.PrecisionChoice("fp32", "auto, as chosen when this run started")}
    # An explicit train.amp is not overridden by the checkpoint's auto answer.
    assert precision.training_precision("bf16", cpu, False, saved=record)["model"].name == "bf16"
    # A choice recorded on a GPU (fp16, say) or a malformed entry is not carried into a CPU run.
    for saved in ({"device": "cuda", "model": "fp16"}, {"device": "cpu", "model": "half"}, "fp32", None):
        assert precision.training_precision("auto", cpu, False, saved=saved)["model"].name == "bf16"
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        precision.training_precision("fp16", cpu, clip_teacher=False)


def test_the_clip_teacher_follows_the_cpu_choice(probe_env, monkeypatch):
    from test_teacher_pseudo_masks import _tiny_teacher

    monkeypatch.setenv(precision.ENV_CHOICE, "bf16")
    teacher = _tiny_teacher(precision="auto")[0]
    assert teacher.resolved_precision("cpu") == precision.PrecisionChoice("bf16", "CARBSEG_CPU_PRECISION=bf16")
    assert teacher._autocast(torch.device("cpu")).fast_dtype == torch.bfloat16
    # Resolved once: a later change of the environment does not switch a teacher mid-run.
    monkeypatch.setenv(precision.ENV_CHOICE, "fp32")
    assert teacher.resolved_precision("cpu").name == "bf16"
    assert not isinstance(_tiny_teacher(precision="auto")[0]._autocast(torch.device("cpu")), torch.autocast)
    # (the teacher's bf16 path itself runs on this CPU in test_teacher_pseudo_masks.py)


def test_inference_runs_in_bf16_on_this_cpu_when_auto_chooses_it(probe_env, monkeypatch, tmp_path):
    from carbseg.engine.checkpoint import load_model
    from carbseg.engine.inference import predict_whole
    from test_reliability_common import make_checkpoint

    model = load_model(make_checkpoint(tmp_path / "model.safetensors"), device="cpu").model.eval()
    images = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 255
    monkeypatch.setenv(precision.ENV_CHOICE, "fp32")
    fp32 = predict_whole(model, images)
    assert torch.equal(fp32, predict_whole(model, images, amp=False))
    monkeypatch.setenv(precision.ENV_CHOICE, "bf16")
    bf16 = predict_whole(model, images)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert torch.equal(bf16, predict_whole(model, images, amp=torch.bfloat16))  # the bf16 path, not fp32's
    assert not torch.equal(bf16, fp32)
    assert (bf16.argmax(1) == fp32.argmax(1)).float().mean() > 0.9


@pytest.mark.parametrize("backbone", ["tiny", "efficientnet_lite0"])
def test_a_resumed_run_keeps_the_precision_auto_chose_and_stays_bit_exact(probe_env, monkeypatch, tmp_path, caplog,
                                                                          backbone):
    """bf16 chosen at the start (forced here: this CPU's probe may say fp32) is recorded in the
    checkpoint; the resume, whose choice now answers fp32, still trains in bf16 and equals the straight run.
    EfficientNet-Lite0 adds the depthwise convolutions that compute in fp32 under bf16 autocast (dilated
    ones phase split)."""
    scenes = make_scenes(tmp_path / "scenes")
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, train={"max_iters": 4},
                               model={"backbone": backbone})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    monkeypatch.setenv(precision.ENV_CHOICE, "bf16")
    with caplog.at_level("INFO", logger="carbseg.engine.train"):
        assert main(["train", "--config", str(config), "--out", str(straight), "--no-progress"]) == 0
    assert any("precision: model bf16 autocast (CARBSEG_CPU_PRECISION=bf16); from iteration 0 to 4" in m
               for m in caplog.messages)
    assert main(["train", "--config", str(config), "--out", str(resumed), "--max-iters", "2", "--no-progress"]) == 0
    assert load_training_state(resumed / "checkpoint_last.pt")["precision"] == {
        "device": "cpu", "model": "bf16", "teacher": None}
    assert yaml.safe_load((resumed / "config.yaml").read_text())["train"]["amp"] == "auto"
    monkeypatch.setenv(precision.ENV_CHOICE, "fp32")
    caplog.clear()
    with caplog.at_level("INFO", logger="carbseg.engine.train"):
        assert main(["train", "--config", str(config), "--out", str(resumed), "--resume", "--no-progress"]) == 0
    assert any("precision: model bf16 autocast (train.amp = auto, as chosen when this run started); resumed at "
               "iteration 2" in m for m in caplog.messages)
    assert load_training_state(resumed / "checkpoint_last.pt")["precision"]["model"] == "bf16"
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed bf16 run must continue bit-identically"
    # Started afresh with fp32, the same run computes something else: the recorded choice mattered.
    fresh = tmp_path / "fresh"
    assert main(["train", "--config", str(config), "--out", str(fresh), "--no-progress"]) == 0
    c = load_file(fresh / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_checkpoint_from_before_the_probe_resumes_as_it_started(probe_env, monkeypatch, tmp_path):
    """A checkpoint without a precision entry was trained with the older auto: fp32 segmenter on a CPU.
    Resumed where the choice now says bf16, it stays fp32 and equals the run that never stopped."""
    from carbseg.engine.checkpoint import save_training_state

    scenes = make_scenes(tmp_path / "scenes")
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, train={"max_iters": 4})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    monkeypatch.setenv(precision.ENV_CHOICE, "fp32")
    assert main(["train", "--config", str(config), "--out", str(straight), "--no-progress"]) == 0
    assert main(["train", "--config", str(config), "--out", str(resumed), "--max-iters", "2", "--no-progress"]) == 0
    state = load_training_state(resumed / "checkpoint_last.pt")
    del state["precision"]
    save_training_state(resumed / "checkpoint_last.pt", state)
    assert precision.precision_before_the_probe()["model"] == "fp32"
    monkeypatch.setenv(precision.ENV_CHOICE, "bf16")
    assert main(["train", "--config", str(config), "--out", str(resumed), "--resume", "--no-progress"]) == 0
    assert load_training_state(resumed / "checkpoint_last.pt")["precision"]["model"] == "fp32"
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- GPUs without native bf16: the teacher in fp16
@pytest.mark.parametrize("capability, name, dtype", [
    ((7, 0), "fp16", torch.float16), ((7, 5), "fp16", torch.float16),
    ((8, 0), "bf16", torch.bfloat16), ((9, 0), "bf16", torch.bfloat16)])
def test_the_clip_teacher_runs_in_fp16_on_gpus_without_native_bf16(monkeypatch, capability, name, dtype):
    """V100 and T4 (compute capability 7.x) emulate bf16: the teacher's auto takes fp16 autocast there
    (OpenAI's CLIP was trained in fp16), not fp32; from Ampere on bf16. PyTorch's emulation-counting
    ``is_bf16_supported`` says yes everywhere and must not decide."""
    from test_teacher_pseudo_masks import _tiny_teacher

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cuda = torch.device("cuda", 0)
    choice = precision.teacher_precision("auto", cuda)
    assert (choice.name, choice.autocast_dtype) == (name, dtype)
    if name == "fp16":
        assert choice.reason == "bf16 is emulated on this GPU (compute capability < 8.0); CLIP was trained in fp16"
    teacher = _tiny_teacher(precision="auto")[0]
    assert teacher.resolved_precision(cuda) == choice
    region = teacher._autocast(cuda)
    assert isinstance(region, torch.autocast) and region.fast_dtype == dtype and region.device == "cuda"
    assert precision.teacher_precision("fp32", cuda).autocast_dtype is None  # asked for: as asked
    # By name too (benchmarks/bench_teacher.py hands its children the resolved answer).
    assert _tiny_teacher(precision="fp16")[0]._autocast(cuda).fast_dtype == torch.float16
    assert not isinstance(_tiny_teacher(precision="fp32")[0]._autocast(cuda), torch.autocast)


# ---------------------------------------------------------------- carbseg doctor: bf16 and the probe's answers
class FakeGPUs:
    """CUDA devices of the given compute capabilities, for ``torch.cuda`` monkeypatched: PyTorch's
    ``is_bf16_supported`` answers for the current device and, like the real one, counts emulation unless
    told ``including_emulation=False`` (``with_flag``; older PyTorch has no such parameter and says yes)."""

    def __init__(self, monkeypatch, capabilities, with_flag: bool):
        import contextlib
        import types

        self.capabilities, self.current = capabilities, 0

        @contextlib.contextmanager
        def device(index):
            before, self.current = self.current, index
            yield
            self.current = before

        def supported(including_emulation=True):
            return tuple(self.capabilities[self.current]) >= (8, 0) or including_emulation

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported if with_flag else lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capabilities[index])
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(
            name=["Tesla V100-SXM2-16GB", "NVIDIA A100-SXM4-40GB"][index], total_memory=16 * 2**30,
            major=capabilities[index][0], minor=capabilities[index][1]))
        monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)


@pytest.mark.parametrize("with_flag", [True, False])
def test_doctor_says_native_bf16_only_where_it_is_not_emulated(monkeypatch, capsys, with_flag):
    """PyTorch's ``is_bf16_supported()`` says yes on a V100 (emulation); the doctor's line says no there."""
    FakeGPUs(monkeypatch, [(7, 0), (8, 0)], with_flag)
    assert [precision.cuda_bf16_native(i) for i in (0, 1)] == [False, True]
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "  cuda:0       Tesla V100-SXM2-16GB, 16 GiB, compute capability 7.0, native bf16: no\n" in out
    assert "  cuda:1       NVIDIA A100-SXM4-40GB, 16 GiB, compute capability 8.0, native bf16: yes\n" in out


def test_doctor_shows_the_cached_answers_and_reprobe_clears_them(probe_env, monkeypatch, capsys):
    key = precision.machine_key()
    cores = precision.os.cpu_count()
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (cores + 1.0, 1.0, 1.0))
    precision.cpu_choice("teacher", measure_fn=lambda w, under_load: {"fp32": 0.02, "bf16": 0.008, "bf16_wins": 6,
                                                                      "pairs": 7})
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    precision.cpu_choice("segmenter", measure_fn=FakeProbe(fp32=0.0315, bf16=0.045))
    data = json.loads(probe_env.read_text())
    data["Other CPU | bf16 flags none | 8 cores | torch 2.0 | 8 threads | probe 1"] = {
        "segmenter": {"fp32": 0.1, "bf16": 0.7}}
    probe_env.write_text(json.dumps(data))
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index(f"CPU precision: probe cache {probe_env}")
    assert lines[start + 1:start + 6] == [
        f"  this machine: {key}",
        f"    teacher   -> bf16: fp32 20.0 ms, bf16 8.0 ms (2.50x; bf16 won 6 of 7 pairs; provisional: load average "
        f"{cores + 1.0:.1f} >= {cores} cores)",
        "    segmenter -> fp32: fp32 31.5 ms, bf16 45.0 ms (0.70x)",
        "  other key: Other CPU | bf16 flags none | 8 cores | torch 2.0 | 8 threads | probe 1: segmenter fp32",
        "  carbseg doctor --reprobe clears them all: the next CPU run measures again"]
    assert main(["doctor", "--reprobe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"CPU precision: cleared 3 cached probe answer(s) from {probe_env}; the next CPU run "
                          "measures again\n")
    assert f"  this machine: {key}\n    not measured yet: the first run on this CPU probes\n" in out
    assert not probe_env.exists()
    probe = FakeProbe(fp32=2.0, bf16=0.5)
    assert precision.cpu_choice("teacher", measure_fn=probe).name == "bf16" and probe.calls == ["teacher"]
    probe_env.unlink()
    assert main(["doctor", "--reprobe"]) == 0
    assert capsys.readouterr().out.startswith(f"CPU precision: no probe cache at {probe_env}; nothing to clear")
    monkeypatch.setenv(precision.ENV_CHOICE, "fp32")
    assert main(["doctor"]) == 0
    assert f"CPU precision: forced by {precision.ENV_CHOICE}=fp32; probe cache {probe_env}\n" in capsys.readouterr().out


# ---------------------------------------------------------------- each answer, its reason and its message
def _fake_gpus(monkeypatch, capabilities, names=("Tesla V100-SXM2-16GB", "NVIDIA A100-SXM4-40GB")):
    """CUDA devices of the given compute capabilities (``torch.cuda`` monkeypatched), asked by index, by
    ``torch.device`` or, with no argument, for the current device (0)."""
    def index(device=None) -> int:
        return device if isinstance(device, int) else (torch.device(device).index or 0) if device is not None else 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capabilities[index(device)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[index(device)])


def _onednn_bf16(monkeypatch, answer: bool) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: answer)


def test_native_bf16_asks_onednn_on_a_cpu_and_the_capability_of_that_gpu(monkeypatch):
    for answer in (True, False):
        _onednn_bf16(monkeypatch, answer)
        assert precision.native_bf16("cpu") is answer and precision.native_bf16(torch.device("cpu")) is answer

    def no_onednn():
        raise RuntimeError("oneDNN is not built in")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", no_onednn)
    assert precision.native_bf16("cpu") is False
    _onednn_bf16(monkeypatch, True)
    assert precision.native_bf16("meta") is False  # neither a CPU nor a CUDA device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.native_bf16("cuda") is False
    _fake_gpus(monkeypatch, [(7, 5), (8, 6)])
    assert [precision.native_bf16(d) for d in ("cuda", "cuda:0", "cuda:1", torch.device("cuda", 1))] == [
        False, False, True, True]


def test_the_fast_precision_of_each_device(monkeypatch):
    """bf16 where native, fp16 on a CUDA GPU without it, none on a CPU without it; inference's ``amp=True``
    is that precision (bf16 on any CPU: asked for), the segmenter's and the teacher's auto follow it on GPUs."""
    _fake_gpus(monkeypatch, [(7, 0), (8, 0)])
    _onednn_bf16(monkeypatch, False)
    devices = [torch.device(d) for d in ("cuda:0", "cuda:1", "cpu", "meta")]
    assert [precision.fast_autocast_dtype(d) for d in devices] == [torch.float16, torch.bfloat16, None, None]
    assert precision.fast_autocast_dtype("cuda:1") == torch.bfloat16
    assert [precision.inference_autocast_dtype(d, True) for d in devices[:3]] == [
        torch.float16, torch.bfloat16, torch.bfloat16]
    assert precision.inference_autocast_dtype(devices[0], False) is None
    assert precision.inference_autocast_dtype(devices[0], torch.float32) == torch.float32
    assert [precision.segmenter_precision(d) for d in devices[:2] + devices[3:]] == [
        precision.PrecisionChoice("fp16", "bf16 is emulated on this GPU"),
        precision.PrecisionChoice("bf16", "native bf16 on this GPU"),
        precision.PrecisionChoice("fp32", "no autocast")]
    assert precision.inference_autocast_dtype(devices[0]) == torch.float16
    assert precision.teacher_precision("auto", "cuda:1") == precision.PrecisionChoice("bf16", "native bf16 on this GPU")
    assert precision.teacher_precision("auto", "meta") == precision.PrecisionChoice(
        "fp32", "no native bf16 on this device")
    _onednn_bf16(monkeypatch, True)
    assert precision.fast_autocast_dtype("cpu") == torch.bfloat16


def test_cuda_bf16_native_asks_pytorch_without_emulation_for_device_0_by_default(monkeypatch):
    """Where ``is_bf16_supported`` takes ``including_emulation``, its answer (for the device asked about)
    decides, not the capability: here a GPU of capability 9.0 that PyTorch says computes bf16 only by
    emulation."""
    import contextlib

    current, asked = [0], []

    @contextlib.contextmanager
    def device(index):
        before, current[0] = current[0], index
        yield
        current[0] = before

    def supported(including_emulation=True):
        asked.append((current[0], including_emulation))
        return current[0] == 0

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert precision.cuda_bf16_native() is True and precision.cuda_bf16_native(1) is False
    assert asked == [(0, False), (1, False)]


def test_cpu_bf16_native_from_either_flag(monkeypatch, tmp_path):
    for flags in ("avx512_bf16", "amx_bf16", "amx_tile avx512_bf16 amx_bf16"):
        _fake_cpu(monkeypatch, tmp_path, flags.replace(" ", "-"), flags, onednn_bf16=False)
        assert precision.cpu_bf16_native(), flags
    _fake_cpu(monkeypatch, tmp_path, "tile", "amx_tile avx512f", onednn_bf16=False)
    assert not precision.cpu_bf16_native()


def test_precision_before_the_probe_follows_the_cpu_flag(monkeypatch):
    for native, teacher in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        assert precision.precision_before_the_probe() == {"device": "cpu", "model": "fp32", "teacher": teacher}


def test_training_precision_on_a_gpu_and_the_fp16_message(monkeypatch):
    cuda = torch.device("cuda")
    assert precision.training_precision("fp16", cuda, clip_teacher=False) == {
        "model": precision.PrecisionChoice("fp16", "train.amp = fp16"), "teacher": None}
    assert precision.training_precision("bf16", "cuda:0", clip_teacher=False)["model"] == precision.PrecisionChoice(
        "bf16", "train.amp = bf16")
    message = "train.amp = fp16 needs a CUDA GPU; use train.amp=bf16 or off on CPU"
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        precision.training_precision("fp16", "cpu", clip_teacher=False)


def test_the_trainings_autocast_probes_only_the_segmenter(probe_env, monkeypatch):
    """``training_autocast_dtype`` asks about the segmenter: it does not run (or cache) the teacher's probe."""
    probe = FakeProbe(fp32=0.1, bf16=0.7)
    monkeypatch.setattr(precision, "measure", probe)
    assert precision.training_autocast_dtype("auto", torch.device("cpu")) is None
    assert probe.calls == ["segmenter"] and set(json.loads(probe_env.read_text())[precision.machine_key()]) == {
        "segmenter"}


@pytest.mark.parametrize("load, cores, busy", [
    ((4.0, 0.0, 0.0), 4, "load average 4.0 >= 4 cores"), ((3.9, 9.0, 9.0), 4, None),
    ((1.5, 0.0, 0.0), None, "load average 1.5 >= 1 cores")])
def test_machine_busy_at_a_load_of_the_core_count(monkeypatch, load, cores, busy):
    """The 1-minute load average against the logical cores (1 where unknown)."""
    monkeypatch.setattr(precision.os, "getloadavg", lambda: load)
    monkeypatch.setattr(precision.os, "cpu_count", lambda: cores)
    assert precision.machine_busy() == busy


def test_machine_busy_without_a_load_average(monkeypatch):
    def unavailable():
        raise OSError("load average unobtainable")

    monkeypatch.setattr(precision.os, "getloadavg", unavailable)
    assert precision.machine_busy() is None
    monkeypatch.delattr(precision.os, "getloadavg")  # Windows
    assert precision.machine_busy() is None


def test_machine_summary_names_cpu_gpu_threads_and_load(monkeypatch, tmp_path):
    from carbseg.allocator import allocator_state

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n")
    monkeypatch.setattr(precision, "CPUINFO", info)
    _onednn_bf16(monkeypatch, True)  # the flag the summary names is oneDNN's
    monkeypatch.setattr(precision.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (2.5, 1.0, 0.5))
    _fake_gpus(monkeypatch, [(8, 0), (9, 0)], names=("GPU zero", "GPU one"))
    rest = (f"torch {torch.__version__}; threads {torch.get_num_threads()} intra-op / "
            f"{torch.get_num_interop_threads()} inter-op; allocator {allocator_state()}; load average")
    cpu = "CPU AMD EPYC (8 logical cores), native CPU bf16 flag True"
    assert precision.machine_summary() == f"{cpu}; {rest} 2.5"
    assert precision.machine_summary("cuda:1") == f"{cpu}, GPU GPU one; {rest} 2.5"
    monkeypatch.delattr(precision.os, "getloadavg")  # Windows
    assert precision.machine_summary(torch.device("cpu")) == f"{cpu}; {rest} nan"


def test_measure_times_three_rounds_when_idle_and_seven_under_load(monkeypatch):
    for under_load, rounds in ((False, 3), (True, precision.LOADED_ROUNDS)):
        clock = ScriptedClock({"fp32": [1.0], "bf16": [0.5]})
        monkeypatch.setattr(precision.time, "perf_counter", clock.perf_counter)
        monkeypatch.setitem(precision.PROBES, "teacher", lambda clock=clock: clock.probe)
        precision.measure("teacher", under_load=under_load)
        assert clock.calls == ["fp32", "bf16"] * (2 + rounds)


class ExactClock:
    """Like :class:`ScriptedClock`, but each timed call reads exactly its scripted seconds (the clock reads
    0 before a call and the call's seconds after it): for the comparisons at their boundaries."""

    def __init__(self, seconds: dict[str, list[float]]):
        self.seconds, self.calls, self.last, self.reads = seconds, [], 0.0, 0

    def perf_counter(self) -> float:
        self.reads += 1
        return 0.0 if self.reads % 2 else self.last

    def probe(self, dtype: torch.dtype | None) -> None:
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        done = sum(call == name for call in self.calls)
        self.calls.append(name)
        self.last = self.seconds[name][min(done, len(self.seconds[name]) - 1)]


@pytest.mark.parametrize("fp32, bf16, early", [(1.0, 3.0, False), (2.0, 4.0, False), (1.0, 3.5, True)])
def test_the_early_exit_is_for_bf16_over_three_times_fp32(monkeypatch, fp32, bf16, early):
    """The first timed pair ends the probe only where bf16 took more than 3x fp32's time (exactly 3x goes on)."""
    clock = ExactClock({"fp32": [fp32], "bf16": [bf16, bf16, fp32 / 2]})
    monkeypatch.setattr(precision.time, "perf_counter", clock.perf_counter)
    monkeypatch.setitem(precision.PROBES, "teacher", lambda: clock.probe)
    timings = precision.measure("teacher", rounds=3)
    assert len(clock.calls) == (4 if early else 10)
    assert timings == ({"fp32": fp32, "bf16": bf16} if early else {"fp32": fp32, "bf16": fp32 / 2})


def test_under_load_a_pair_at_exactly_the_margin_is_a_bf16_win(monkeypatch):
    clock = ExactClock({"fp32": [precision.MARGIN * 0.5], "bf16": [0.5]})
    monkeypatch.setattr(precision.time, "perf_counter", clock.perf_counter)
    monkeypatch.setitem(precision.PROBES, "teacher", lambda: clock.probe)
    assert precision.measure("teacher", rounds=3, under_load=True) == {
        "fp32": precision.MARGIN * 0.5, "bf16": 0.5, "bf16_wins": 3, "pairs": 3}


class RecordedOps(TorchDispatchMode):
    """Records the named aten ops run under it, with their arguments (a tensor as its shape)."""

    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        self.names, self.ops = names, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        def described(value):
            if isinstance(value, torch.Tensor):
                return tuple(value.shape)
            return type(value)(described(v) for v in value) if isinstance(value, (list, tuple)) else value

        if func.overloadpacket.__name__ in self.names:
            self.ops.append((func.overloadpacket.__name__, *described(list(args))))
        return func(*args, **(kwargs or {}))


def _closure(run) -> dict:
    return dict(zip(run.__code__.co_freevars, (cell.cell_contents for cell in run.__closure__), strict=True))


def test_the_teacher_probe_is_one_vit_b16_block_over_256_tokens():
    """The operations and shapes of a CLIP ViT-B/16 block (12 heads of 64, MLP 3072, no biases), on
    weights of CLIP's scale; its inputs drawn without touching the global random stream."""
    state = torch.random.get_rng_state()
    run = precision.PROBES["teacher"]()
    assert torch.equal(torch.random.get_rng_state(), state)
    names = ("layer_norm", "linear", "view", "permute", "scaled_dot_product_attention", "transpose", "reshape",
             "add", "sub", "gelu")
    with RecordedOps(names) as recorded:
        run(None)
    n, qkv = 256, (1, 12, 256, 64)
    assert recorded.ops == [
        ("layer_norm", (1, n, 768), [768]), ("linear", (1, n, 768), (2304, 768)),
        ("view", (1, n, 2304), [1, n, 3, 12, 64]), ("permute", (1, n, 3, 12, 64), [2, 0, 3, 1, 4]),
        ("scaled_dot_product_attention", qkv, qkv, qkv), ("transpose", qkv, 1, 2),
        ("reshape", (1, n, 12, 64), [1, n, 768]), ("linear", (1, n, 768), (768, 768)),
        ("add", (1, n, 768), (1, n, 768)),
        ("layer_norm", (1, n, 768), [768]), ("linear", (1, n, 768), (3072, 768)), ("gelu", (1, n, 3072)),
        ("linear", (1, n, 3072), (768, 3072)), ("add", (1, n, 768), (1, n, 768))]
    tensors = _closure(run)
    assert abs(float(tensors["x0"].std()) - 1.0) < 0.01
    for name in ("qkv_w", "out_w", "fc1_w", "fc2_w"):
        assert abs(float(tensors[name].std()) - 0.02) < 0.0005, name


def test_the_segmenter_probe_is_an_mbconv_block_and_a_dilated_3x3_channels_last():
    """Forward: 1x1 expand 256 -> 1024, BN, ReLU6, 3x3 depthwise, BN, ReLU6, 1x1 project plus the
    residual, dilated 3x3 256 -> 512 (no biases, stride 1, the map kept at 24x32); backward through all
    four; the gradients dropped after each call (set to None, not zeroed and accumulated)."""
    run = precision.PROBES["segmenter"]()
    with RecordedOps(("convolution", "native_batch_norm", "hardtanh", "add", "sub", "convolution_backward")) as rec:
        run(None)
    x, wide = (1, 256, 24, 32), (1, 1024, 24, 32)
    bn = ("native_batch_norm", wide, None, None, None, None, True, 0.1, 1e-05)
    forward = [op for op in rec.ops if op[0] != "convolution_backward"]
    assert forward == [
        ("convolution", x, (1024, 256, 1, 1), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1), bn,
        ("hardtanh", wide, 0, 6),
        ("convolution", wide, (1024, 1, 3, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1024), bn,
        ("hardtanh", wide, 0, 6),
        ("convolution", wide, (256, 1024, 1, 1), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1), ("add", x, x),
        ("convolution", x, (512, 256, 3, 3), None, [1, 1], [2, 2], [2, 2], False, [0, 0], 1)]
    assert len(rec.ops) - len(forward) == 4  # each convolution's backward
    layers = _closure(run)
    for name in ("expand", "depthwise", "project", "dense"):
        weight = layers[name].weight
        assert weight.grad is None and abs(float(weight.detach().std()) - 0.05) < 0.003, name
        assert weight.is_contiguous(memory_format=torch.channels_last), name
    assert not layers["dense"].weight.is_contiguous()  # channels-last for real (a 1x1 kernel is both)


@pytest.mark.parametrize("timings", [
    {"fp32": 1.0, "bf16": 0.5, "bf16_wins": 0, "pairs": 7}, {"fp32": 1.0, "bf16": 0.5, "bf16_wins": 7, "pairs": 7},
    {"fp32": 1.0, "bf16": 0.5, "bf16_wins": 1, "pairs": 1}, {"fp32": 1.0, "bf16": 0.9}])
def test_well_formed_cached_answers_at_their_bounds_are_used(probe_env, monkeypatch, caplog, timings):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    probe_env.parent.mkdir(parents=True)
    probe_env.write_text(json.dumps({precision.machine_key(): {"teacher": timings}}))
    probe = FakeProbe(fp32=0.1, bf16=0.7)
    with caplog.at_level("INFO", logger="carbseg.precision"):
        choice = precision.cpu_choice("teacher", measure_fn=probe)
    assert probe.calls == [] and caplog.records == [] and choice.name == precision.decide(timings)
    assert precision.cached_answers() == [(precision.machine_key(), "teacher", timings)]


def test_the_damaged_cache_warnings_say_what_is_wrong_once_per_file(probe_env, monkeypatch, caplog, tmp_path):
    other = tmp_path / "other.json"
    probe_env.parent.mkdir(parents=True)
    for path in (probe_env, other):
        path.write_text("{not json")
    with caplog.at_level("INFO", logger="carbseg.precision"):
        for _ in range(2):
            assert precision._read_cache(probe_env) == {} and precision._read_cache(other) == {}
    tail = "; ignored, the probe measures again and rewrites it"
    assert [r.getMessage() for r in caplog.records] == [
        f"{probe_env}: the CPU precision cache is damaged (not a JSON object){tail}",
        f"{other}: the CPU precision cache is damaged (not a JSON object){tail}"]
    caplog.clear()
    monkeypatch.setattr(precision, "_warned", set())  # the next process
    probe_env.write_text(json.dumps({precision.machine_key(): {"segmenter": {"fp32": "x"}, "teacher": {
        "fp32": 1.0, "bf16": 2.0}}}))
    with caplog.at_level("INFO", logger="carbseg.precision"):
        assert precision.cpu_choice("teacher", measure_fn=FakeProbe(2.0, 0.5)).name == "fp32"  # the cached one
        assert caplog.records == []  # the other workload's entry is not read
        precision.cpu_choice("segmenter", measure_fn=FakeProbe(0.1, 0.7))
    assert [r.getMessage() for r in caplog.records] == [
        f"{probe_env}: the cached segmenter answer for this machine is malformed{tail}"]


def test_why_a_cached_answer_is_measured_again_is_logged(probe_env, monkeypatch, caplog, tmp_path):
    cores = precision.os.cpu_count()
    _fake_cpu(monkeypatch, tmp_path, "mac", None, onednn_bf16=True)  # no flags: oneDNN's answer decides
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (cores + 0.5, 1.0, 1.0))
    precision.cpu_choice("teacher", measure_fn=FakeProbe(0.1, 0.7))  # provisional: measured under load
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    precision.cpu_choice("segmenter", measure_fn=FakeProbe(2.0, 0.5))  # bf16
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    with caplog.at_level("INFO", logger="carbseg.precision"):
        precision.cpu_choice("teacher", measure_fn=FakeProbe(0.1, 0.7))
        precision.cpu_choice("segmenter", measure_fn=FakeProbe(0.1, 0.7))
    start = "precision: the cached {} probe answer is measured again: "
    assert [r.getMessage() for r in caplog.records] == [
        start.format("teacher") + f"provisional (measured under load: load average {cores + 0.5:.1f} >= {cores} "
                                   "cores), the machine is idle now",
        start.format("segmenter") + "bf16, but this CPU has no native bf16 (a cache copied from another CPU?)"]


def test_the_cache_keeps_timings_to_the_microsecond_and_a_failed_write_is_no_error(probe_env, monkeypatch):
    import errno

    import carbseg.io

    precision.cpu_choice("teacher", measure_fn=FakeProbe(fp32=0.0123456789, bf16=0.0051234567))
    assert json.loads(probe_env.read_text())[precision.machine_key()] == {
        "teacher": {"fp32": 0.012346, "bf16": 0.005123}}

    def failing(path, obj):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(carbseg.io, "write_json_atomic", failing)
    assert precision.cpu_choice("segmenter", measure_fn=FakeProbe(0.1, 0.7)).name == "fp32"


def test_cached_answers_and_clear_cache_of_another_file(probe_env, tmp_path, caplog):
    """The answers of a given cache file (doctor): a damaged one has none, silently (doctor says "not measured
    yet"); malformed entries and unknown workloads are left out."""
    precision.cpu_choice("teacher", measure_fn=FakeProbe(0.1, 0.7))
    damaged = tmp_path / "damaged.json"
    damaged.write_text("{not json")
    with caplog.at_level("INFO", logger="carbseg.precision"):
        assert precision.cached_answers(damaged) == [] and caplog.records == []
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"K": {"teacher": {"fp32": 0.1, "bf16": 0.7}, "segmenter": {"fp32": "x"},
                                       "encoder": {"fp32": 0.1, "bf16": 0.7}}, "L": 5}))
    assert precision.cached_answers(other) == [("K", "teacher", {"fp32": 0.1, "bf16": 0.7})]
    assert precision.clear_cache(other) == 1 and not other.exists() and probe_env.exists()
    assert precision.clear_cache(other) is None


def _while_another_start_holds_the_lock(probe_env, monkeypatch, write):
    """Start a teacher choice in a thread while this test holds the cache's lock (another process
    probing); once it waits, ``write(probe_env)`` (what that process left) and release. Its choice and probe."""
    import fcntl

    probe_env.parent.mkdir(parents=True, exist_ok=True)
    lock = open(probe_env.with_name(probe_env.name + ".lock"), "a")  # noqa: SIM115 - closed below
    fcntl.flock(lock, fcntl.LOCK_EX)
    waiting, sleep = threading.Event(), time.sleep

    def noted_sleep(seconds):
        waiting.set()
        sleep(seconds)

    monkeypatch.setattr(precision.time, "sleep", noted_sleep)
    probe, result = FakeProbe(fp32=0.1, bf16=0.7), []
    thread = threading.Thread(target=lambda: result.append(precision.cpu_choice("teacher", measure_fn=probe)))
    thread.start()
    assert waiting.wait(timeout=30)
    write(probe_env)
    lock.close()
    thread.join(timeout=30)
    return result[0], probe


def test_a_start_that_waited_uses_the_other_probes_answer_even_provisional(probe_env, monkeypatch):
    """The other process measured under load (provisional): the start that waited for it is on a busy
    machine too, so it uses that answer rather than measuring again."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    entry = {"fp32": 2.0, "bf16": 0.5, "provisional": True, "measured_under": "another probe was running"}
    choice, probe = _while_another_start_holds_the_lock(
        probe_env, monkeypatch, lambda path: path.write_text(json.dumps({precision.machine_key(): {"teacher": entry}})))
    assert probe.calls == [] and choice.name == "bf16" and choice.reason.startswith(f"cached probe ({probe_env})")


def test_the_reads_under_the_lock_do_not_warn(probe_env, monkeypatch, caplog):
    """Only the read before the probe reports a damaged file; the re-read after waiting for another probe
    and the read-modify-write say nothing (here the file was damaged while this start waited)."""
    with caplog.at_level("WARNING", logger="carbseg.precision"):
        choice, probe = _while_another_start_holds_the_lock(probe_env, monkeypatch,
                                                            lambda path: path.write_text("{not json"))
    assert probe.calls == ["teacher"] and choice.name == "fp32" and caplog.records == []
    assert json.loads(probe_env.read_text())[precision.machine_key()]["teacher"]["fp32"] == 0.1


def test_the_cache_path_default_and_its_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv(precision.ENV_CACHE, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert precision.cache_path() == tmp_path / "home" / ".cache" / "carbseg" / "cpu_precision.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert precision.cache_path() == tmp_path / "xdg" / "carbseg" / "cpu_precision.json"
    monkeypatch.setenv(precision.ENV_CACHE, str(tmp_path / "mine.json"))
    assert precision.cache_path() == tmp_path / "mine.json"


def test_the_reason_of_a_probe_under_load_names_the_pairs_and_the_load(probe_env, monkeypatch):
    cores = precision.os.cpu_count()
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (cores + 1.0, 1.0, 1.0))
    choice = precision.cpu_choice("teacher", measure_fn=lambda w, under_load: {
        "fp32": 0.02, "bf16": 0.008, "bf16_wins": 6, "pairs": 7})
    assert choice == precision.PrecisionChoice("bf16", (
        "probe: bf16 autocast 2.50x fp32's speed on the teacher probe (bf16 needs >= 1.2x in most interleaved pairs: "
        f"6 of 7); provisional (measured under load: load average {cores + 1.0:.1f} >= {cores} cores), again when idle"))


def test_cpu_model_from_cpuinfo_else_what_platform_knows(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nModel Name\t: Vendor CPU: rev 2 @ 2.00GHz \nmodel name\t: the second\n")
    monkeypatch.setattr(precision, "CPUINFO", info)
    assert precision.cpu_model() == "Vendor CPU: rev 2 @ 2.00GHz"
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "no-cpuinfo")  # not Linux
    for processor, machine, model in (("arm", "arm64", "arm"), ("", "arm64", "arm64"), ("", "", "unknown CPU")):
        monkeypatch.setattr(precision.platform, "processor", lambda processor=processor: processor)
        monkeypatch.setattr(precision.platform, "machine", lambda machine=machine: machine)
        assert precision.cpu_model() == model


def test_autocast_to_the_dtype_asked_for():
    cpu = torch.device("cpu")
    assert [precision.autocast(cpu, dtype).fast_dtype for dtype in (torch.bfloat16, torch.float16)] == [
        torch.bfloat16, torch.float16]
    assert precision.autocast(cpu, torch.float16).device == "cpu"
    assert not isinstance(precision.autocast(cpu, None), torch.autocast)


def test_the_process_remembers_each_answer_per_cache_file(probe_env, monkeypatch, tmp_path):
    """Asked again, the same answer without reading the file; another cache file (another
    ``$CARBSEG_PRECISION_CACHE``) is read for its own answer."""
    probe = FakeProbe(fp32=2.0, bf16=0.5)
    monkeypatch.setattr(precision, "measure", probe)
    first = precision.cpu_choice("teacher")
    assert first.name == "bf16" and precision.cpu_choice("teacher") is first and probe.calls == ["teacher"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({precision.machine_key(): {"teacher": {"fp32": 0.1, "bf16": 0.7}}}))
    monkeypatch.setenv(precision.ENV_CACHE, str(other))
    assert precision.cpu_choice("teacher").name == "fp32" and probe.calls == ["teacher"]
    with pytest.raises(ValueError, match=re.escape("workload must be one of ('teacher', 'segmenter')")):
        precision.cpu_choice("encoder")


def test_a_resumed_cpu_run_keeps_the_recorded_choices():
    """training_precision alone (no training): what the resumed-run tests check end to end, which the
    mutation run leaves out for their cost."""
    from carbseg.precision import PrecisionChoice, training_precision

    kept = training_precision("auto", "cpu", clip_teacher=True,
                              saved={"device": "cpu", "model": "bf16", "teacher": "fp32"})
    assert kept == {"model": PrecisionChoice("bf16", "train.amp = auto, as chosen when this run started"),
                    "teacher": PrecisionChoice("fp32", "auto, as chosen when this run started")}
