"""Precision ``auto`` on a CPU: a timed probe's answer, cached per machine, kept by a resumed run.

The choice logic is tested with fake probes giving both answers (no CPU here need have fast bf16);
the bf16 code paths of the teacher, the trainer and inference are run for real (slowly where bf16 is
emulated, as on AVX2-only CPUs).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from carbseg import precision
from carbseg.cli import main
from carbseg.engine.checkpoint import load_training_state
from carbseg.errors import UserError
from test_reliability_common import make_scenes, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def probe_env(monkeypatch, tmp_path):
    """No forced choice (conftest pins fp32 for the rest of the suite), a private cache, no memo."""
    monkeypatch.delenv(precision.ENV_CHOICE, raising=False)
    cache = tmp_path / "cache" / "cpu_precision.json"
    monkeypatch.setenv(precision.ENV_CACHE, str(cache))
    monkeypatch.setattr(precision, "_memo", {})
    return cache


class FakeProbe:
    """Stands for ``precision.measure``: fixed timings, and a record of the workloads it was asked for."""

    def __init__(self, fp32: float, bf16: float):
        self.timings, self.calls = {"fp32": fp32, "bf16": bf16}, []

    def __call__(self, workload: str) -> dict[str, float]:
        self.calls.append(workload)
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


def test_the_cache_key_is_the_cpu_torch_and_thread_count(probe_env):
    key = precision.machine_key()
    assert key == f"{precision.cpu_model()} | torch {torch.__version__} | 1 threads | probe {precision.PROBE_VERSION}"
    precision.cpu_choice("teacher", measure_fn=FakeProbe(2.0, 0.5))
    torch.set_num_threads(2)  # the one_thread fixture restores the count afterwards
    other = FakeProbe(fp32=0.1, bf16=0.7)
    assert precision.cpu_choice("teacher", measure_fn=other).name == "fp32" and other.calls == ["teacher"]
    assert len(json.loads(probe_env.read_text())) == 2


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


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"KEY": 5}', '{"KEY": {"teacher": {"fp32": "x"}}}',
                                     '{"KEY": {"teacher": {"fp32": 1.0, "bf16": 0}}}'])
def test_a_broken_cache_file_is_measured_again_and_repaired(probe_env, content):
    probe_env.parent.mkdir(parents=True)
    probe_env.write_text(content.replace("KEY", precision.machine_key()))
    probe = FakeProbe(fp32=2.0, bf16=0.5)
    assert precision.cpu_choice("teacher", measure_fn=probe).name == "bf16" and probe.calls == ["teacher"]
    assert json.loads(probe_env.read_text())[precision.machine_key()]["teacher"] == {"fp32": 2.0, "bf16": 0.5}


def test_an_unwritable_cache_only_means_probing_again(probe_env):
    probe_env.parent.write_text("a file where the cache folder should be")
    probe = FakeProbe(fp32=2.0, bf16=0.5)
    assert precision.cpu_choice("teacher", measure_fn=probe).name == "bf16" and probe.calls == ["teacher"]


def test_the_real_probes_run_and_auto_never_picks_a_slower_bf16(probe_env):
    for workload in precision.WORKLOADS:
        timings = precision.measure(workload, rounds=1)
        assert set(timings) == {"fp32", "bf16"} and all(0 < t < 60 for t in timings.values())
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
