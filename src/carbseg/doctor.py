"""``carbseg doctor``: what this environment can do, on one screen, before a long run finds out.

Every check is read-only and local (no download, no network probe); a check that fails says so on its
line instead of stopping the report, so the command always exits 0.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

from carbseg import __version__

# The optional extras of pyproject.toml and the modules that stand for them (crf: either package).
EXTRAS = {"crf": ("pydensecrf2", "pydensecrf"), "onnx": ("onnx", "onnxruntime"), "video": ("av",)}
DATA_ENV = "CARBSEG_DATA"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _safely(check: Callable[[], str]) -> str:
    try:
        return check()
    except Exception as err:  # noqa: BLE001 - a broken check is reported on its line, never fatal
        return f"unknown ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def _packages() -> str:
    import torch  # its own version string tells a CPU-only build (+cpu) from a CUDA one (+cu124)

    return f"torch {torch.__version__}, " + ", ".join(
        f"{name} {_version(name)}" for name in ("torchvision", "open_clip_torch", "numpy", "pillow"))


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _cpu() -> str:
    import torch

    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    from carbseg.allocator import allocator_state

    return (f"{os.cpu_count()} cores, PyTorch uses {torch.get_num_threads()} threads; native bf16 (AVX512-BF16/AMX): "
            f"{_yes(bf16)}; freed memory: {allocator_state()}")


def _cpu_precision() -> list[str]:
    """The CPU precision probe's cached answers (``carbseg.precision.cpu_choice``): this machine's with
    their timings, then a short line for each other machine key sharing the cache file (another thread
    count, CPU or torch)."""
    from carbseg import precision

    path, key = precision.cache_path(), precision.machine_key()
    forced = os.environ.get(precision.ENV_CHOICE, "").strip()
    lines = [f"CPU precision: {f'forced by {precision.ENV_CHOICE}={forced}; ' if forced else ''}probe cache {path}",
             f"  this machine: {key}"]
    answers = precision.cached_answers(path)
    mine = [(workload, timings) for machine, workload, timings in answers if machine == key]
    for workload, timings in mine:
        rule = f"; bf16 won {timings['bf16_wins']} of {timings['pairs']} pairs" if "pairs" in timings else ""
        note = f"; provisional: {timings.get('measured_under')}" if timings.get("provisional") else ""
        lines.append(f"    {workload:<9} -> {precision.decide(timings)}: fp32 {timings['fp32'] * 1e3:.1f} ms, "
                     f"bf16 {timings['bf16'] * 1e3:.1f} ms ({timings['fp32'] / timings['bf16']:.2f}x{rule}{note})")
    if not mine:
        lines.append("    not measured yet: the first run on this CPU probes")
    others: dict[str, list[str]] = {}
    for machine, workload, timings in answers:
        if machine != key:
            others.setdefault(machine, []).append(f"{workload} {precision.decide(timings)}")
    for machine, chosen in list(others.items())[:3]:
        lines.append(f"  other key: {machine}: {', '.join(chosen)}")
    if len(others) > 3:
        lines.append(f"  and {len(others) - 3} other machine keys")
    if answers:
        lines.append("  carbseg doctor --reprobe clears them all: the next CPU run measures again")
    return lines


def _cuda() -> list[str]:
    import torch

    from carbseg.precision import cuda_bf16_native

    if not torch.cuda.is_available():
        built = f"PyTorch built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only PyTorch"
        return [f"CUDA GPUs:    none visible ({built}); --device auto runs on the CPU"]
    lines = [f"CUDA GPUs:    {torch.cuda.device_count()} (CUDA {torch.version.cuda}); NCCL: "
             f"{_yes(torch.distributed.is_available() and torch.distributed.is_nccl_available())}"]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        # Native only: is_bf16_supported() alone also says yes on a V100 or T4, where bf16 is emulated.
        lines.append(f"  cuda:{index}       {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
                     f"{props.major}.{props.minor}, native bf16: {_yes(cuda_bf16_native(index))}")
    return lines


def _clip_weights() -> str:
    from carbseg.teacher.weights import cached_clip_weights, hub_offline

    found = cached_clip_weights()
    offline = " (HF_HUB_OFFLINE is set: nothing will be downloaded)" if hub_offline() else ""
    if not found:
        return (f"none in the Hugging Face cache{offline}; the clip teacher downloads them on first use, "
                "or takes a file: --clip-pretrained PATH / teacher.clip_pretrained=PATH")
    return ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "") + offline


def _resnet_weights() -> str:
    import torch

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(p.name for p in folder.glob("resnet*.pth")) if folder.is_dir() else []
    return ", ".join(found) if found else f"none in {folder} (model.pretrained=imagenet downloads them)"


def _extras() -> str:
    def installed(extra: str) -> bool:
        found = [importlib.util.find_spec(module) is not None for module in EXTRAS[extra]]
        return any(found) if extra == "crf" else all(found)

    state = {extra: installed(extra) for extra in EXTRAS}
    missing = [extra for extra, ok in state.items() if not ok]
    hint = f' (pip install -e ".[{",".join(missing)}]" in the checkout)' if missing else ""
    return ", ".join(f"{extra} {_yes(ok)}" for extra, ok in state.items()) + hint


def shared_data_roots() -> list[Path]:
    """Where the user keeps datasets: the folder named by $CARBSEG_DATA (none guessed)."""
    return [Path(os.environ[DATA_ENV]).expanduser()] if os.environ.get(DATA_ENV) else []


def _data() -> list[str]:
    lines = []
    for root in shared_data_roots():
        if root.is_dir():
            names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            lines.append(f"data:         {root}: {', '.join(names) or '(empty)'}")
    if not lines:
        lines.append(f"data:         no shared data found (set {DATA_ENV}=DIR, or `carbseg synthesize` makes some)")
    return lines


def reprobe() -> str:
    """``carbseg doctor --reprobe``: clear the CPU precision probe's cached answers, and say so."""
    from carbseg import precision

    path = precision.cache_path()
    held = precision.clear_cache(path)
    if held is None:
        return f"CPU precision: no probe cache at {path}; nothing to clear (the next CPU run measures)"
    return f"CPU precision: cleared {held} cached probe answer(s) from {path}; the next CPU run measures again"


def report_lines() -> list[str]:
    """The doctor's report, one line per fact (about 15-20 lines)."""
    lines = [
        f"carbseg {__version__} on Python {platform.python_version()} ({platform.system()} {platform.machine()}), "
        f"{sys.executable}",
        "packages:     " + _safely(_packages),
        "CPU:          " + _safely(_cpu),
    ]
    cuda = _safely(lambda: "\n".join(_cuda()))
    lines += cuda.splitlines() if not cuda.startswith("unknown") else [f"CUDA GPUs:    {cuda}"]
    precision = _safely(lambda: "\n".join(_cpu_precision()))
    lines += precision.splitlines() if not precision.startswith("unknown") else [f"CPU precision: {precision}"]
    lines += [
        "CLIP weights: " + _safely(_clip_weights),
        "ResNet:       " + _safely(_resnet_weights),
        "extras:       " + _safely(_extras),
    ]
    lines += _data()
    return lines
