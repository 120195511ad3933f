"""Precision ``auto`` on a CPU: a timed probe's answer, cached per machine, kept by a resumed run.

The choice logic is tested with fake probes giving both answers (no CPU here need have fast bf16);
the bf16 code paths of the teacher, the trainer and inference are run for real (slowly where bf16 is
emulated, as on AVX2-only CPUs).
"""

from __future__ import annotations

import json
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
    '{"KEY": {"teacher": {"fp32": 1.0, "bf16": 0.5, "bf16_wins": 9, "pairs": 7}}}'])
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
