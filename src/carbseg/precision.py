"""Which reduced precision a device runs fast, and the autocast of training and inference: the one
place the trainer, the teacher and inference ask.

bf16 is only fast where the hardware has it: NVIDIA GPUs from Ampere on (compute capability >= 8.0)
and CPUs with AVX512-BF16 / AMX. Elsewhere it is emulated -- on a V100, T4 or RTX 20xx PyTorch still
*accepts* bf16 (``torch.cuda.is_bf16_supported()`` is True there, by emulation) but convolutions
run several times slower than in fp32 -- so on those GPUs the mixed precision of choice is fp16
(with a GradScaler when training), and the CLIP teacher runs under fp16 autocast (OpenAI's CLIP
was trained in fp16).

On a CPU the flags alone do not decide: ``auto`` is the answer of a short timed fp32-vs-bf16 probe
of the operations that matter for each workload (:func:`cpu_choice`), cached per machine (keyed by
what decides the answer, the CPU's bf16 flags included), measured again where it was taken under load;
a training run records it in its checkpoint, so ``--resume`` keeps it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from carbseg.allocator import allocator_state

try:  # POSIX; elsewhere (Windows) the probe cache is used without a lock
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None

log = logging.getLogger(__name__)

AMPERE = (8, 0)


def native_bf16(device: torch.device | str) -> bool:
    """True where bf16 matrix products are native: CUDA of compute capability >= 8.0, or a CPU with
    AVX512-BF16/AMX (measured 7x slower than fp32 on an AVX2-only CPU; see benchmarks/RESULTS.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        return tuple(torch.cuda.get_device_capability(device)) >= AMPERE
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def cuda_bf16_native(index: int = 0) -> bool:
    """True where CUDA device ``index`` computes bf16 natively (compute capability >= 8.0). PyTorch's
    plain ``torch.cuda.is_bf16_supported()`` also says yes on a V100 or T4, where bf16 is emulated and
    several times slower: its ``including_emulation=False`` (PyTorch >= 2.3) is asked where it exists,
    else the capability."""
    if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        with torch.cuda.device(index):  # is_bf16_supported asks the current device
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return tuple(torch.cuda.get_device_capability(index)) >= AMPERE


def fast_autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The automatic mixed precision for ``device``: bf16 where native, fp16 on older CUDA GPUs,
    none on a CPU without native bf16 (autocast would only slow it down)."""
    device = torch.device(device)
    if native_bf16(device):
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; no autocast at all for ``None`` (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def training_autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The segmenter's autocast in training for ``train.amp``. ``auto``: bf16 autocast on GPUs where
    bf16 is native (Ampere and newer), fp16 with the GradScaler on older ones (V100, T4, RTX 20xx
    emulate bf16, several times slower); on a CPU what the timed probe measured faster (fp32 unless
    bf16 is). The trainer itself uses :func:`training_precision`, which also keeps a resumed run's choice."""
    return training_precision(amp, device, clip_teacher=False)["model"].autocast_dtype


def inference_autocast_dtype(device: torch.device, amp: bool | torch.dtype | None = None) -> torch.dtype | None:
    """The autocast of inference: ``None`` (default) is the device's fast precision on CUDA (bf16 from
    Ampere on, fp16 on older GPUs where bf16 is emulated) and on a CPU the timed probe's answer
    (:func:`segmenter_precision`: no autocast unless bf16 measured faster);
    ``True`` the fast precision (bf16 on a CPU); ``False`` none; a dtype exactly that dtype (the
    trainer's validation passes train.amp's, so fp16 stays fp16)."""
    if isinstance(amp, torch.dtype):
        return amp
    if amp is None:
        return segmenter_precision(device).autocast_dtype
    if amp:
        return fast_autocast_dtype(device) or torch.bfloat16
    return None


# ---------------------------------------------------------------- CPUs: measured, not assumed
# A CPU's flags do not say whether bf16 pays: on AVX2-only CPUs it is emulated (several times slower),
# and with AVX512-BF16/AMX the teacher's matrix products may be ~2x faster while the segmenter's
# depthwise backward is slower (issue 12 measured 0.76x for a whole EfficientNet-Lite0 step). So on a
# CPU ``auto`` times the operations that matter for each workload, once per machine, and keeps bf16
# only where it is clearly faster.

WORKLOADS = ("teacher", "segmenter")
MARGIN = 1.2  # bf16 must take at most 1 / MARGIN of fp32's time to be chosen (noise and rounding cost)
PROBE_VERSION = 3  # bump when a probe changes: older cached answers are then measured again
ENV_CHOICE = "CARBSEG_CPU_PRECISION"  # fp32 | bf16: skip the probe and use this on the CPU
ENV_CACHE = "CARBSEG_PRECISION_CACHE"  # where the probe's answers are kept (a JSON file)
LOADED_ROUNDS = 7  # interleaved fp32/bf16 pairs timed on a busy machine (3 when idle)
LOCK_WAIT_S = 120.0  # the longest wait for another process's probe; then this one probes without the lock

# One probe per (workload, machine key, cache file) and process: the answer is read (or measured)
# once, not at every inference call. Tests reset it.
_memo: dict[tuple[str, str, str], PrecisionChoice] = {}


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision one workload runs at on this machine, and why (said in logs and benchmarks)."""

    name: str  # "fp32" | "bf16" | "fp16"
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)


CPUINFO = Path("/proc/cpuinfo")  # Linux; elsewhere the model comes from ``platform`` and the flags are unknown


@functools.lru_cache(maxsize=4)
def _cpuinfo_lines(path: Path) -> tuple[str, ...]:
    """The lines of ``path`` (read once per process: on a many-core machine the file is large, and the
    machine key is asked at every inference call); none where it cannot be read."""
    with contextlib.suppress(OSError):
        return tuple(path.read_text(encoding="utf-8", errors="replace").splitlines())
    return ()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    for line in _cpuinfo_lines(CPUINFO):
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


# The CPU flags that decide whether bf16 is native: one model name covers CPUs with and without them
# (two "AMD EPYC" measured bf16 1.7x and 0.14x fp32's speed), so they are part of the cache key.
BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")


def cpu_bf16_flags() -> tuple[str, ...] | None:
    """Which of :data:`BF16_FLAGS` the CPU lists in ``/proc/cpuinfo`` (sorted); ``None`` where the file
    has no flags line (not Linux)."""
    for line in _cpuinfo_lines(CPUINFO):
        if line.lower().startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return tuple(flag for flag in BF16_FLAGS if flag in flags)
    return None


def cpu_bf16_native() -> bool:
    """True where this CPU computes bf16 natively: oneDNN says so, or the CPU lists AVX512-BF16 / AMX-BF16.
    Without it bf16 is emulated (several times slower), and a cached bf16 answer is not believed."""
    flags = cpu_bf16_flags() or ()
    return native_bf16("cpu") or "avx512_bf16" in flags or "amx_bf16" in flags


def machine_key() -> str:
    """What a probe's answer depends on: the CPU (model, bf16 flags, logical cores), the torch build (its
    oneDNN), the thread count and the probe's version."""
    flags = cpu_bf16_flags()
    flags_text = "unknown" if flags is None else (",".join(flags) or "none")
    return (f"{cpu_model()} | bf16 flags {flags_text} | {os.cpu_count()} cores | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads | probe {PROBE_VERSION}")


def machine_summary(device: torch.device | str = "cpu") -> str:
    """One line naming what a benchmark row was measured on: CPU model and cores, the CPU's native
    bf16 flag (the flag only: the probe decides), the GPU if any, torch, threads, whether freed memory is kept
    (``carbseg.allocator``) and the load average."""
    device = torch.device(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"CPU {cpu_model()} ({os.cpu_count()} logical cores), native CPU bf16 flag {native_bf16('cpu')}{gpu}; "
            f"torch {torch.__version__}; threads {torch.get_num_threads()} intra-op / "
            f"{torch.get_num_interop_threads()} inter-op; allocator {allocator_state()}; load average {load:.1f}")


def cache_path() -> Path:
    """``$CARBSEG_PRECISION_CACHE``, else ``cpu_precision.json`` in the user cache folder
    (``$XDG_CACHE_HOME/carbseg``, default ``~/.cache/carbseg``)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "carbseg" / "cpu_precision.json"


PROBE_TOKENS = 256  # the teacher probe's sequence: at 64 tokens AMX bf16 measured 1.4x, at 256 2.5x (the real
# teacher at 1024x512, 2,049 tokens: 2.75x; benchmarks/RESULTS.md), so shorter probes understate bf16's gain


def _teacher_probe() -> Callable[[torch.dtype | None], None]:
    """One ViT-B/16 block's work (attention over 256 tokens, 12 heads, and the 768-3072-768 MLP), as
    the CLIP teacher runs it: no gradient, bf16 under autocast (~12 ms in fp32 on 2 idle AMX cores)."""
    n = PROBE_TOKENS
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, n, 768, generator=gen)
    qkv_w, out_w, fc1_w, fc2_w = (torch.randn(shape, generator=gen) * 0.02
                                  for shape in ((3 * 768, 768), (768, 768), (3072, 768), (768, 3072)))

    def run(dtype: torch.dtype | None) -> None:
        with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
            h = F.layer_norm(x0, (768,))
            q, k, v = F.linear(h, qkv_w).view(1, n, 3, 12, 64).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, n, 768)
            x = x0 + F.linear(a, out_w)
            x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, (768,)), fc1_w)), fc2_w)
            float(x.float().sum())

    return run


def _segmenter_probe() -> Callable[[torch.dtype | None], None]:
    """Forward and backward, as the trainer runs them (channels-last), of one MBConv block of the width of
    EfficientNet-Lite0's late stages (1x1 expand 256 -> 1024, 3x3 depthwise, 1x1 project, BN, ReLU6) and
    a dilated dense 3x3 convolution 256 -> 512 as in the ASPP head, on a (1, 256, 24, 32) map (~30 ms in
    fp32 on 2 idle AMX cores). The depthwise convolution is the model's own :class:`Fp32DepthwiseConv2d`,
    so the probe follows the model's rule (fp32 there under autocast).

    Its size is measured (2-core AMX Xeon, where the real EfficientNet-Lite0 step ran 1.7x and the demo's
    step 1.37x faster in bf16): the earlier probe (32 channels, 24x32) gave bf16 0.9-1.1x, one of 128 ->
    768 channels 1.03-1.54x from run to run (products too small for AMX to pay reliably), this one
    1.5-1.8x."""
    from torch import nn

    from carbseg.models.depthwise import Fp32DepthwiseConv2d

    # skip_init: the layers are built without drawing from the global generator (a training run's
    # random stream must not depend on whether the probe ran); their weights come from ``gen``.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 24, 32, generator=gen)
    expand = nn.utils.skip_init(nn.Conv2d, 256, 1024, 1, bias=False)
    depthwise = nn.utils.skip_init(Fp32DepthwiseConv2d, 1024, 1024, 3, padding=1, groups=1024, bias=False)
    project = nn.utils.skip_init(nn.Conv2d, 1024, 256, 1, bias=False)
    dense = nn.utils.skip_init(nn.Conv2d, 256, 512, 3, padding=2, dilation=2, bias=False)
    layers = nn.ModuleList([expand, depthwise, project, dense])
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.05)
    # Channels-last, as the segmenter computes (Segmenter.use_memory_format).
    layers.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)

    def run(dtype: torch.dtype | None) -> None:
        with autocast(torch.device("cpu"), dtype):
            h = F.relu6(F.batch_norm(expand(x), None, None, training=True))
            h = F.relu6(F.batch_norm(depthwise(h), None, None, training=True))
            out = dense(project(h) + x)
        out.float().square().mean().backward()
        layers.zero_grad(set_to_none=True)

    return run


# Each builds its inputs once and returns the timed call.
PROBES: dict[str, Callable[[], Callable[[torch.dtype | None], None]]] = {
    "teacher": _teacher_probe, "segmenter": _segmenter_probe}


def measure(workload: str, rounds: int | None = None, under_load: bool = False) -> dict:
    """Median seconds of the workload's probe in fp32 and under bf16 autocast, timed in turn
    (fp32, bf16, fp32, bf16, ...) after one untimed call of each, so both see the same load.

    The untimed bf16 call matters: on an AMX CPU oneDNN's first bf16 call builds its kernels (the
    teacher probe's first bf16 call measured 18.5 ms against 5.9 ms in fp32, where warm bf16 runs 1.4x
    faster than fp32), and timed it made the early exit below answer fp32. After it, one timed pair
    decides early when bf16 takes over 3x fp32's time (AVX2-only CPUs emulate bf16; the segmenter probe
    runs 5-10x slower there): nothing more is run. Else the rounds follow (3; under load 7).

    ``under_load`` (:func:`machine_busy`, or another probe was running): beside another job one probe
    measured 0.68-2.21x on a CPU where bf16 is 1.8x faster, so each interleaved pair is judged on its own
    and the result adds ``bf16_wins`` (pairs where bf16 took at most 1 / MARGIN of its fp32 neighbour's
    time) and ``pairs``: :func:`decide` then takes bf16 only where it won most of them.

    The probe may be asked for first inside inference (``carbseg predict`` on a new machine runs under
    ``torch.inference_mode``), where the segmenter probe's backward could not run: it is measured with
    gradients enabled whatever the caller's mode."""
    rounds = rounds or (LOADED_ROUNDS if under_load else 3)
    with torch.inference_mode(False), torch.enable_grad():
        return _measure(PROBES[workload](), rounds, under_load)


def _measure(probe: Callable[[torch.dtype | None], None], rounds: int, under_load: bool = False) -> dict:
    probe(None)
    probe(torch.bfloat16)

    def timed(dtype: torch.dtype | None) -> float:
        start = time.perf_counter()
        probe(dtype)
        return time.perf_counter() - start

    fp32, first_bf16 = timed(None), timed(torch.bfloat16)
    if first_bf16 > 3 * fp32:
        return {"fp32": fp32, "bf16": first_bf16}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        times["fp32"].append(timed(None))
        times["bf16"].append(timed(torch.bfloat16))
    result: dict = {name: statistics.median(t) for name, t in times.items()}
    if under_load:
        result["bf16_wins"] = sum(f >= MARGIN * b for f, b in zip(times["fp32"], times["bf16"], strict=True))
        result["pairs"] = rounds
    return result


def decide(timings: dict, margin: float = MARGIN) -> str:
    """bf16 only where the probe measured it at least ``margin`` times faster than fp32; for a probe
    taken under load (it has ``pairs``), only where it was so in most of the interleaved pairs."""
    if "pairs" in timings:
        return "bf16" if 2 * timings["bf16_wins"] > timings["pairs"] else "fp32"
    return "bf16" if timings["fp32"] >= margin * timings["bf16"] else "fp32"


def machine_busy() -> str | None:
    """Why a probe now would measure a disturbed machine (the 1-minute load average at or above the
    logical core count), or ``None`` where it looks idle (or the load is not known)."""
    with contextlib.suppress(OSError, AttributeError):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load >= cores:
            return f"load average {load:.1f} >= {cores} cores"
    return None


@contextlib.contextmanager
def _cache_lock(path: Path) -> Iterator[bool]:
    """An exclusive ``fcntl`` lock on ``PATH.lock`` while the block runs (a probe and the cache's
    read-modify-write), so concurrent starts neither probe at the same time nor lose each other's
    answers. Yields True when another process or thread held it first: another probe was running, so
    this one measures a busy machine. Without a lock (no fcntl, an unwritable folder, a wait over
    :data:`LOCK_WAIT_S`) the block runs anyway: the cache only saves a probe."""
    handle = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - closed below
    if handle is None:
        yield False
        return
    waited, deadline = False, time.monotonic() + LOCK_WAIT_S
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = True
                if time.monotonic() > deadline:
                    log.warning("%s.lock: held for over %.0f s; probing without it", path, LOCK_WAIT_S)
                    break
                time.sleep(0.05)
            except OSError:  # a file system without locks
                break
        yield waited
    finally:
        handle.close()  # releases the lock


# Damaged cache files warned about in this process: one warning each (the next probe rewrites them).
_warned: set[str] = set()


def _warn_damaged(path: Path, what: str) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        log.warning("%s: %s; ignored, the probe measures again and rewrites it", path, what)


def _read_cache(path: Path, warn: bool = True) -> dict:
    """The cache's content; a missing or unreadable file is an empty cache, and so is a damaged one
    (truncated, not JSON, not an object), with one warning."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        return data
    if warn:
        _warn_damaged(path, "the CPU precision cache is damaged (not a JSON object)")
    return {}


def _valid_timings(entry) -> bool:
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not (isinstance(entry, dict) and all(number(entry.get(k)) and entry[k] > 0 for k in ("fp32", "bf16"))):
        return False
    if "pairs" in entry or "bf16_wins" in entry:
        pairs, wins = entry.get("pairs"), entry.get("bf16_wins")
        return isinstance(pairs, int) and isinstance(wins, int) and 0 <= wins <= pairs and pairs > 0
    return True


def _unusable(timings, busy: str | None) -> str | None:
    """Why a cached answer is measured again (``None``: it is used)."""
    if not _valid_timings(timings):
        return "malformed"
    if decide(timings) == "bf16" and not cpu_bf16_native():
        return "bf16, but this CPU has no native bf16 (a cache copied from another CPU?)"
    if timings.get("provisional") and busy is None:
        return f"provisional (measured under load: {timings.get('measured_under')}), the machine is idle now"
    return None


def _cached(path: Path, key: str, workload: str, busy: str | None, warn: bool = True) -> dict | None:
    entry = _read_cache(path, warn).get(key)
    if entry is None or (isinstance(entry, dict) and workload not in entry):
        return None
    timings = entry.get(workload) if isinstance(entry, dict) else None
    why = _unusable(timings, busy)
    if why == "malformed":
        if warn:
            _warn_damaged(path, f"the cached {workload} answer for this machine is malformed")
        return None
    if why:
        log.info("precision: the cached %s probe answer is measured again: %s", workload, why)
        return None
    return timings


def _write_cache(path: Path, key: str, workload: str, timings: dict) -> None:
    """Read-modify-write under :func:`_cache_lock` (the caller holds it), replaced atomically. Best
    effort: a read-only home only means the probe runs again in the next process."""
    from carbseg.errors import UserError
    from carbseg.io import write_json_atomic

    data = _read_cache(path, warn=False)
    if not isinstance(data.get(key), dict):
        data[key] = {}
    data[key][workload] = {k: round(v, 6) if isinstance(v, float) else v for k, v in timings.items()}
    with contextlib.suppress(OSError, UserError):
        write_json_atomic(path, data)


def _probe(path: Path, key: str, workload: str, measure_fn: Callable, busy: str | None) -> tuple[dict, str]:
    """Measure ``workload`` and record it, holding the cache's lock; the timings and where they came from."""
    with _cache_lock(path) as another_probe_ran:
        if another_probe_ran:
            busy = busy or "another probe was running"
            # It may have measured this very answer while this process waited: no second probe then.
            cached = _cached(path, key, workload, busy, warn=False)
            if cached is not None:
                return cached, f"cached probe ({path})"
        timings = dict(measure_fn(workload, under_load=busy is not None))
        if busy:
            timings.update(provisional=True, measured_under=busy)
        _write_cache(path, key, workload, timings)
    return timings, "probe"


def _reason(source: str, timings: dict, workload: str) -> str:
    ratio = timings["fp32"] / max(timings["bf16"], 1e-12)
    rule = f"bf16 needs >= {MARGIN:.1f}x"
    if "pairs" in timings:
        rule += f" in most interleaved pairs: {timings['bf16_wins']} of {timings['pairs']}"
    reason = f"{source}: bf16 autocast {ratio:.2f}x fp32's speed on the {workload} probe ({rule})"
    if timings.get("provisional"):
        reason += f"; provisional (measured under load: {timings.get('measured_under')}), again when idle"
    return reason


def cpu_choice(workload: str, measure_fn: Callable[..., dict] | None = None) -> PrecisionChoice:
    """fp32 or bf16 for ``workload`` (``teacher`` or ``segmenter``) on this CPU.

    ``$CARBSEG_CPU_PRECISION`` (fp32 | bf16) decides if set; else the answer cached for this machine
    (:func:`machine_key`) in :func:`cache_path`; else the probe is run (0.15 s for the teacher, 0.6 s
    for the segmenter on a 2-core AMX CPU) and its timings cached. A cached answer is measured again
    where it says bf16 on a CPU without native bf16 (:func:`cpu_bf16_native`), and where it was measured
    under load (``provisional``) and the machine is idle now. Probing on a busy machine (:func:`machine_busy`,
    or another process's probe holding the lock) times more interleaved pairs and keeps the answer
    provisional. ``measure_fn`` replaces :func:`measure` (tests fake both answers with it).
    """
    from carbseg.errors import UserError

    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}")
    forced = os.environ.get(ENV_CHOICE, "").strip().lower()
    if forced:
        if forced not in ("fp32", "bf16"):
            raise UserError(f"{ENV_CHOICE}={forced!r} is not valid; set it to fp32 or bf16, or unset it")
        return PrecisionChoice(forced, f"{ENV_CHOICE}={forced}")
    path, key = cache_path(), machine_key()
    memo_key = (workload, key, str(path))
    if measure_fn is None and memo_key in _memo:
        return _memo[memo_key]
    busy = machine_busy()
    timings, source = _cached(path, key, workload, busy), f"cached probe ({path})"
    if timings is None:
        timings, source = _probe(path, key, workload, measure_fn or measure, busy)
    choice = PrecisionChoice(decide(timings), _reason(source, timings, workload))
    if measure_fn is None:
        _memo[memo_key] = choice
    return choice


def cached_answers(path: Path | None = None) -> list[tuple[str, str, dict]]:
    """``(machine key, workload, timings)`` of every well-formed answer in the probe cache (doctor)."""
    data = _read_cache(path or cache_path(), warn=False)
    return [(key, workload, timings) for key, entry in data.items() if isinstance(entry, dict)
            for workload, timings in entry.items() if workload in WORKLOADS and _valid_timings(timings)]


def clear_cache(path: Path | None = None) -> int | None:
    """Delete the probe cache (under its lock), so that the next run on a CPU measures again
    (``carbseg doctor --reprobe``); how many answers it held, ``None`` where there was no cache."""
    path = path or cache_path()
    if not path.exists():  # checked first: no folder or lock file is made where there is nothing to clear
        return None
    with _cache_lock(path):
        if not path.exists():
            return None
        held = len(cached_answers(path))
        path.unlink()
    _memo.clear()
    return held


def teacher_precision(precision: str, device: torch.device | str) -> PrecisionChoice:
    """The CLIP teacher's precision for ``precision`` (auto | bf16 | fp32) on ``device``: auto is bf16
    on GPUs with native bf16, fp16 on older CUDA GPUs (V100, T4: bf16 is emulated there, and OpenAI's
    CLIP was trained in fp16; LayerNorm and softmax stay fp32 under autocast) and the probe's answer on
    a CPU."""
    device = torch.device(device)
    if precision != "auto":
        return PrecisionChoice(precision, "asked for")
    if device.type == "cpu":
        return cpu_choice("teacher")
    if native_bf16(device):
        return PrecisionChoice("bf16", "native bf16 on this GPU")
    if device.type == "cuda":
        return PrecisionChoice("fp16", "bf16 is emulated on this GPU (compute capability < 8.0); "
                                       "CLIP was trained in fp16")
    return PrecisionChoice("fp32", "no native bf16 on this device")


def segmenter_precision(device: torch.device | str) -> PrecisionChoice:
    """The segmenter's automatic precision (training's ``auto`` and inference's default) on
    ``device``: bf16 where native and fp16 on older CUDA GPUs; on a CPU the probe's answer."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_choice("segmenter")
    dtype = fast_autocast_dtype(device)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    why = {"bf16": "native bf16 on this GPU", "fp16": "bf16 is emulated on this GPU"}.get(name, "no autocast")
    return PrecisionChoice(name, why)


def training_precision(amp: str, device: torch.device | str, clip_teacher: bool,
                       saved: dict | None = None) -> dict[str, PrecisionChoice | None]:
    """What a training run computes in: ``{"model": ..., "teacher": ... or None}``.

    ``amp`` is ``train.amp`` (auto | bf16 | fp16 | off); the teacher (only a CLIP teacher has a
    precision) is always ``auto``, its own, never ``train.amp``. ``saved`` is the ``precision`` entry
    of the checkpoint being resumed (:func:`recorded_precision` wrote it): on a CPU, what ``auto`` chose
    when the run started is kept, so a resumed run computes exactly as the one that never stopped even if
    this machine's probe now answers otherwise. A choice recorded on a GPU is not carried over (there
    ``auto`` follows the GPU, which a resume may change), nor one recorded on a GPU into a CPU run.
    """
    from carbseg.errors import UserError

    device = torch.device(device)
    if not (isinstance(saved, dict) and device.type == "cpu" and saved.get("device") == "cpu"):
        saved = {}
    saved = {k: v for k, v in saved.items() if k in ("model", "teacher") and v in ("fp32", "bf16")}
    if amp == "off":
        model = PrecisionChoice("fp32", "train.amp = off")
    elif amp == "auto" and saved.get("model"):
        model = PrecisionChoice(saved["model"], "train.amp = auto, as chosen when this run started")
    elif amp == "auto":
        model = segmenter_precision(device)
    elif amp == "fp16" and device.type != "cuda":
        raise UserError("train.amp = fp16 needs a CUDA GPU; use train.amp=bf16 or off on CPU")
    else:
        model = PrecisionChoice(amp, f"train.amp = {amp}")
    teacher = None
    if clip_teacher:
        teacher = (PrecisionChoice(saved["teacher"], "auto, as chosen when this run started")
                   if saved.get("teacher") else teacher_precision("auto", device))
    return {"model": model, "teacher": teacher}


def precision_before_the_probe() -> dict:
    """The ``precision`` entry for a checkpoint written before carbseg recorded one: what ``auto`` did on
    a CPU then (the segmenter in fp32; the CLIP teacher in bf16 where the CPU flags native bf16), so that
    such a run, resumed on a CPU, still computes as it started."""
    return {"device": "cpu", "model": "fp32", "teacher": "bf16" if native_bf16("cpu") else "fp32"}


def recorded_precision(choices: dict[str, PrecisionChoice | None], device: torch.device | str) -> dict:
    """The checkpoint entry of :func:`training_precision`'s answer (names only, and the device type)."""
    return {"device": torch.device(device).type,
            **{k: (v.name if v is not None else None) for k, v in choices.items()}}
