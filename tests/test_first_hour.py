"""A new user's first hour: the exact inputs that used to crash or mislead, each now one line or working."""

from __future__ import annotations

import errno
import json
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from carbseg.cli import main
from carbseg.config import load_config
from test_reliability_common import error_line, make_checkpoint, make_scenes, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors")


# ---------------------------------------------------------------- config values as users type them
def test_exponent_learning_rates_are_floats_on_the_command_line_and_in_yaml(tmp_path):
    cfg = load_config(None, ["train.lr=1e-3", "train.min_lr=-2.5E-5", "carb.fixed_coefficient=3e-2"])
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.train.min_lr == -2.5e-5 and cfg.carb.fixed_coefficient == 0.03
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 5e-3\n  weight_decay: 1e-4\n")
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "5e-3"  # what YAML 1.1 makes of it
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.weight_decay) == (0.005, 0.0001)


def test_text_that_is_not_a_number_is_still_refused_for_a_float():
    with pytest.raises(Exception, match="train.lr must be float, got 'fast'"):
        load_config(None, ["train.lr=fast"])


def test_numbers_typed_for_text_keys_stay_the_text_typed(tmp_path):
    cfg = load_config(None, ["data.root=2024", "name=1.10", "data.labels=007"])
    assert (cfg.data.root, cfg.name, cfg.data.labels) == ("2024", "1.10", "007")
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: 2024\n")
    assert load_config(path).data.root == "2024"
    path.write_text("data:\n  root: yes\n")
    with pytest.raises(Exception, match="data.root must be text, got True; quote the value"):
        load_config(path)


def test_zero_batch_size_is_one_line(scenes, tmp_path, capsys):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "data.batch_size=0", "--out", str(out)]) == 2
    error_line(capsys.readouterr().err, "train", "data.batch_size = 0", "at least 1")
    assert not out.exists()


# ---------------------------------------------------------------- devices
@pytest.mark.parametrize("device", ["banana", "cuda:x"])
def test_unknown_device_is_one_line_on_every_command(device, scenes, checkpoint, tmp_path, capsys):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    assert main(["train", "--config", str(config), f"device={device}", "--out", str(tmp_path / "run")]) == 2
    error_line(capsys.readouterr().err, "train", f"device = {device!r} is not a device", "auto, cpu, cuda")
    labels = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--out", str(labels)]) == 0
    assert main(["pseudo-masks", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--labels",
                 str(labels), "--out", str(tmp_path / "pm"), "--teacher", "simulated", "--device", device]) == 2
    error_line(capsys.readouterr().err, "pseudo-masks", f"--device {device!r} is not a device")
    assert main(["evaluate", "--dataset", "synthetic", "--root", str(scenes), "--split", "val", "--checkpoint",
                 str(checkpoint), "--device", device]) == 2
    error_line(capsys.readouterr().err, "evaluate", f"--device {device!r}")
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(scenes / "images" / "val"),
                 "--out", str(tmp_path / "pred"), "--device", device]) == 2
    error_line(capsys.readouterr().err, "predict", f"--device {device!r}")
    assert not (tmp_path / "pm").exists() and not (tmp_path / "pred").exists() and not (tmp_path / "run").exists()


def test_cuda_without_a_gpu_is_one_line(scenes, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    labels = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--out", str(labels)]) == 0
    assert main(["pseudo-masks", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--labels",
                 str(labels), "--out", str(tmp_path / "pm"), "--teacher", "simulated", "--device", "cuda"]) == 2
    error_line(capsys.readouterr().err, "pseudo-masks", "--device 'cuda' but no CUDA GPU is visible", "carbseg doctor")
    assert not (tmp_path / "pm").exists()


# ---------------------------------------------------------------- a run that fails after starting
def _truncate(image: Path) -> bytes:
    good = image.read_bytes()
    image.write_bytes(good[:200])
    return good


@pytest.mark.parametrize("resume", [False, True])
def test_a_train_that_failed_after_starting_can_be_rerun_or_resumed(resume, scenes, tmp_path, capsys):
    """A corrupt image met at iteration 2 (read by a DataLoader worker): one line naming it, and after
    the fix the same command, or the same with --resume, trains in that folder."""
    data = shutil.copytree(scenes, tmp_path / "scenes")
    config = tiny_train_config(tmp_path / "tiny.yaml", data, data={"num_workers": 1})
    image = data / "images" / "train" / "synth_train_000001.png"
    good = _truncate(image)
    out = tmp_path / "run"
    command = ["train", "--config", str(config), "--out", str(out), "--max-iters", "3", "--no-progress"]
    assert main(command) == 2
    line = error_line(capsys.readouterr().err, "train", str(image), "truncated", "re-download or remove")
    assert "Traceback" not in line and "DataLoader worker" not in line
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "log.jsonl", "tb"]  # stopped before a checkpoint
    image.write_bytes(good)
    assert main(command + (["--resume"] if resume else [])) == 0
    lines = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]  # the failed run's line is gone
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1


def test_a_folder_with_a_finished_run_or_other_files_is_still_protected(scenes, tmp_path, capsys):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("name: x\n")
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--config", str(config), "--out", str(out), "--max-iters", "1"]) == 2
    error_line(capsys.readouterr().err, "train", "not empty", "--resume")
    assert main(["train", "--config", str(config), "--out", str(out / "notes.txt"), "--max-iters", "1"]) == 2
    error_line(capsys.readouterr().err, "train", "notes.txt: is a file, not a run directory")


def test_corrupt_image_in_a_pseudo_masks_worker_is_one_line(scenes, tmp_path, capsys):
    data = shutil.copytree(scenes, tmp_path / "scenes")
    labels = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(data), "--out", str(labels)]) == 0
    image = data / "images" / "train" / "synth_train_000002.png"
    _truncate(image)
    capsys.readouterr()
    assert main(["pseudo-masks", "--dataset", "synthetic", "--root", str(data), "--split", "train", "--labels",
                 str(labels), "--out", str(tmp_path / "pm"), "--teacher", "simulated", "--workers", "2"]) == 2
    line = error_line(capsys.readouterr().err, "pseudo-masks", str(image), "truncated")
    assert line == (f"carbseg pseudo-masks: error: {image}: cannot read image (image file is truncated); "
                    "re-download or remove this file")


# ---------------------------------------------------------------- progress bars
def _labels_command(scenes, out, *extra):
    return ["labels", "--dataset", "synthetic", "--root", str(scenes), "--out", str(out), *extra]


def test_progress_bars_only_on_a_terminal_and_never_with_no_progress(scenes, tmp_path, capsys, monkeypatch):
    assert main(_labels_command(scenes, tmp_path / "a.json")) == 0
    assert "image-level labels" not in capsys.readouterr().err  # stderr is not a terminal under pytest
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(_labels_command(scenes, tmp_path / "b.json")) == 0
    assert "image-level labels: 100%" in capsys.readouterr().err
    assert main(_labels_command(scenes, tmp_path / "c.json", "--no-progress")) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["labels", "convert-wilddash2", "pseudo-masks", "evaluate", "train", "predict",
                                     "demo", "synthesize"])
def test_every_long_command_has_no_progress(command):
    from carbseg.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    assert "--no-progress" in sub.format_help()


def test_an_error_starts_its_own_line_after_a_progress_bar(scenes, tmp_path, capsys, monkeypatch):
    data = shutil.copytree(scenes, tmp_path / "scenes")
    labels = tmp_path / "labels.json"
    assert main(_labels_command(data, labels, "--no-progress")) == 0
    image = data / "images" / "train" / "synth_train_000002.png"
    _truncate(image)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    capsys.readouterr()
    assert main(["pseudo-masks", "--dataset", "synthetic", "--root", str(data), "--split", "train", "--labels",
                 str(labels), "--out", str(tmp_path / "pm"), "--teacher", "simulated", "--workers", "0",
                 "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "pseudo-masks:" in err  # a bar was drawn
    assert err.splitlines()[-1].startswith(f"carbseg pseudo-masks: error: {image}: cannot read image"), err


# ---------------------------------------------------------------- outputs that cannot be written
@pytest.fixture
def labels_file(scenes, tmp_path):
    out = tmp_path / "labels.json"
    assert main(_labels_command(scenes, out, "--no-progress")) == 0
    return out


def test_out_that_is_an_existing_file(scenes, checkpoint, labels_file, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    runs = {
        "labels": _labels_command(scenes, blocker / "labels.json"),
        "pseudo-masks": ["pseudo-masks", "--dataset", "synthetic", "--root", str(scenes), "--split", "train",
                         "--labels", str(labels_file), "--out", str(blocker), "--teacher", "simulated"],
        "predict": ["predict", "--checkpoint", str(checkpoint), "--input", str(scenes / "images" / "val"),
                    "--out", str(blocker)],
        "export-onnx": ["export-onnx", "--checkpoint", str(checkpoint), "--out", str(blocker / "m.onnx")],
        "evaluate": ["evaluate", "--dataset", "synthetic", "--root", str(scenes), "--split", "val",
                     "--checkpoint", str(checkpoint), "--report", str(blocker)],
    }
    for command, argv in runs.items():
        capsys.readouterr()
        assert main(argv) == 2, command
        error_line(capsys.readouterr().err, command, str(blocker), "is a file")
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["labels.json",
                                                                                           "notes.txt"]
    assert main(["export-onnx", "--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    error_line(capsys.readouterr().err, "export-onnx", str(tmp_path), "is a folder; give a file name")


def _read_only(monkeypatch, root: Path) -> None:
    """Below ``root`` nothing can be created, as on a read-only mount (root may ignore permissions)."""
    real_mkdir, real_mkstemp = Path.mkdir, tempfile.mkstemp

    def mkdir(self, *args, **kwargs):
        if Path(self).absolute().is_relative_to(root) and not Path(self).is_dir():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 -- tempfile's own name
        if dir is not None and Path(dir).absolute().is_relative_to(root):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_read_only_file_system(scenes, checkpoint, labels_file, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    _read_only(monkeypatch, ro)
    runs = {
        "pseudo-masks": ["pseudo-masks", "--dataset", "synthetic", "--root", str(scenes), "--split", "train",
                         "--labels", str(labels_file), "--out", str(ro / "pm"), "--teacher", "simulated",
                         "--workers", "0"],
        "train": ["train", "--config", str(config), "--out", str(ro / "run"), "--max-iters", "1"],
        "evaluate": ["evaluate", "--dataset", "synthetic", "--root", str(scenes), "--split", "val",
                     "--checkpoint", str(checkpoint), "--report", str(ro / "report")],
        "labels": _labels_command(scenes, ro / "labels.json"),
    }
    for command, argv in runs.items():
        capsys.readouterr()
        assert main(argv) == 2, command
        error_line(capsys.readouterr().err, command, str(ro), "read-only", "choose an output folder")
    assert list(ro.iterdir()) == []


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # no thread traceback either
@pytest.mark.parametrize("target", ["log.jsonl", "tensorboard"])
def test_full_disk_while_logging_stops_with_one_line(target, scenes, tmp_path, capsys, monkeypatch):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, train={"checkpoint_interval": 2})
    out = tmp_path / "run"
    if target == "log.jsonl":
        real_open = open

        def full_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if str(file).endswith("log.jsonl") and "a" in mode and len(Path(file).read_text().splitlines()) >= 3:
                def write(_text):
                    raise OSError(errno.ENOSPC, "No space left on device")
                handle.write = write
            return handle

        monkeypatch.setattr("builtins.open", full_open)
        where = str(out / "log.jsonl")
    else:
        from tensorboard.summary.writer import record_writer

        real_write = record_writer.RecordWriter.write
        calls = []

        def write(self, data):
            calls.append(1)
            if len(calls) > 60:  # after the checkpoint of iteration 2
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(self, data)

        monkeypatch.setattr(record_writer.RecordWriter, "write", write)
        where = str(out / "tb")
    assert main(["train", "--config", str(config), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    error_line(err, "train", where, "the disk is full")
    assert "Exception in thread" not in err
    assert (out / "checkpoint_last.pt").is_file() and not (out / "model.safetensors").exists()
    monkeypatch.undo()
    assert main(["train", "--config", str(config), "--out", str(out), "--no-progress", "--resume"]) == 0
    iterations = [json.loads(line)["iteration"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert iterations == list(range(1, 11))


def test_a_text_file_as_checkpoint_last_under_resume(scenes, tmp_path, capsys):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--max-iters", "2", "--no-progress"]) == 0
    (out / "checkpoint_last.pt").write_text("hello\n")
    assert main(["train", "--config", str(config), "--out", str(out), "--resume", "--no-progress"]) == 2
    error_line(capsys.readouterr().err, "train", str(out / "checkpoint_last.pt"),
               "not a training state written by carbseg train")


# ---------------------------------------------------------------- CLIP weights on an offline machine
@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, an empty cache, and a hub that cannot be reached; records download attempts."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    probes, attempts = [], []

    def no_route(address, timeout=None):
        probes.append((address, timeout))
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    real_download = huggingface_hub.hf_hub_download

    def download(*args, local_files_only=False, **kwargs):
        attempts.append(local_files_only)
        assert local_files_only, "an unreachable hub must not be asked (it retries for a minute)"
        return real_download(*args, local_files_only=True, **kwargs)

    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return probes, attempts, tmp_path / "hf-cache"


def test_offline_clip_weights_fail_fast_with_the_option_of_each_command(unreachable_hub, scenes, labels_file,
                                                                        tmp_path, capsys):
    probes, attempts, cache = unreachable_hub
    assert main(["pseudo-masks", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--labels",
                 str(labels_file), "--out", str(tmp_path / "pm"), "--cache-dir", str(cache)]) == 2
    line = error_line(capsys.readouterr().err, "pseudo-masks", "ViT-B-16/openai", "hub is not reachable",
                      "--clip-pretrained PATH")
    assert "Retrying" not in line
    assert len(probes) == 1 and probes[0][1] == 5.0 and attempts and all(attempts)
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, teacher={"kind": "clip", "cache_dir": str(cache)})
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys.readouterr().err, "train", "hub is not reachable", "teacher.clip_pretrained=PATH")
    assert "--clip-pretrained" not in line
    assert not (tmp_path / "pm").exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- what train says
def test_train_states_device_precision_threads_and_the_resumed_iteration(scenes, tmp_path, caplog):
    import torch

    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, train={"eval_interval": 2})
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="carbseg.engine.train"):
        assert main(["train", "--config", str(config), "--out", str(out), "--max-iters", "2", "--no-progress"]) == 0
    threads = torch.get_num_threads()
    assert (f"training on cpu with {threads} CPU threads, 1 process; precision: model fp32 "
            "(CARBSEG_CPU_PRECISION=fp32); from iteration 0 to 2") in caplog.messages
    val = [m for m in caplog.messages if m.startswith("iteration 2: val mIoU ")]
    logged = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["val_miou"]
    assert val == [f"iteration 2: val mIoU {logged:.1f}"]  # one decimal, as the evaluate table
    caplog.clear()
    with caplog.at_level("INFO", logger="carbseg.engine.train"):
        assert main(["train", "--config", str(config), "--out", str(out), "--max-iters", "4", "--resume",
                     "--no-progress", "--device", "cpu", "--workers", "0"]) == 0
    assert (f"training on cpu with {threads} CPU threads, 1 process; precision: model fp32 (train.amp = auto, as "
            f"chosen when this run started); resumed at iteration 2 from {out / 'checkpoint_last.pt'} to 4"
            ) in caplog.messages


def test_device_and_workers_flags_of_train_are_the_config_keys(scenes, tmp_path):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "data.num_workers=3", "--workers", "0", "--device", "cpu",
                 "--out", str(out), "--max-iters", "1", "--no-progress"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["device"], saved["data"]["num_workers"]) == ("cpu", 0)  # the flag wins over key=value


# ---------------------------------------------------------------- help
def test_every_command_and_option_has_help():
    import argparse

    from carbseg.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in commands._choices_actions}
    for name, sub in commands.choices.items():
        assert helps.get(name), name
        assert sub.description and len(sub.description) > 40, f"{name} has no description in --help"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("command", ["pseudo-masks", "evaluate", "train", "predict"])
def test_device_is_chosen_the_same_way_on_every_command(command):
    from carbseg.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    device = next(a for a in sub._actions if "--device" in a.option_strings)
    assert "cuda:N" in device.help and "auto" in device.help


# ---------------------------------------------------------------- doctor
def test_doctor_reports_on_one_screen_and_exits_0(tmp_path, capsys, monkeypatch):
    import torch

    data = tmp_path / "datasets"
    (data / "camvid").mkdir(parents=True)
    (data / "cityscapes").mkdir()
    monkeypatch.setenv("CARBSEG_DATA", str(data))
    monkeypatch.chdir(tmp_path)
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert 8 <= len(lines) <= 24 and max(len(line) for line in lines) < 200
    text = "\n".join(lines)
    assert f"torch {torch.__version__}" in text
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert f"native bf16 (AVX512-BF16/AMX): {'yes' if bf16 else 'no'}" in text
    from carbseg.allocator import allocator_state

    assert allocator_state() != "default (not set in this process)"  # the command set it before running
    assert f"; freed memory: {allocator_state()}" in text
    assert ("CUDA GPUs:    none visible" in text) != torch.cuda.is_available()
    assert f"data:         {data}: camvid, cityscapes" in text
    assert "extras:       crf " in text and "onnx " in text and "video " in text


def test_doctor_survives_a_broken_check(capsys, monkeypatch):
    import carbseg.doctor

    def broken():
        raise RuntimeError("no driver")

    monkeypatch.setattr(carbseg.doctor, "_cuda", broken)
    assert main(["doctor"]) == 0
    assert "CUDA GPUs:    unknown (RuntimeError: no driver)" in capsys.readouterr().out
