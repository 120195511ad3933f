"""Each CPU fast path against the standard op it replaces, at the demo's, CamVid's and Cityscapes' shapes.

carbseg replaces four standard ops on a CPU where they measured slow:

- the logits' bilinear upsampling as two matrix products (``carbseg.models.upsample``) instead of
  ``F.interpolate``, taken where ``matrix_products_pay`` says so;
- dilated depthwise convolutions as undilated ones on the d x d phases (``PhaseSplitDepthwiseConv2d``)
  instead of the dilated ``nn.Conv2d``;
- the ASPP's dilated 3x3 convolutions as one matrix product per tap that reads the image
  (``PaddingSkippingConv2d``), taken where at most ``PADDING_SKIP_MAX_VALID_SHARE`` of the products do;
- ``class_argmax`` (``max(dim).indices``) instead of ``torch.argmax``.

For every shape both are run (the fast path forced, whatever its rule says), interleaved (fast,
standard, fast, ...) after a warm-up, and the table gives the median milliseconds, the speed-up
(standard / fast: above 1 the fast path pays), the peak memory each allocates over what was there
before (resident-set high-water mark, glibc made to return freed blocks; ``n/a`` where the kernel does
not let a process reset it) and whether carbseg's rule takes the fast path there. "train" rows time
forward + backward, "infer" rows the forward without gradients. The header names the machine (CPU,
its native bf16 flag, torch, threads, load average). A single thread by default, so that two runs on
one machine compare; the whole table takes 2-4 minutes on one idle core.

    python benchmarks/bench_fastpaths.py                 # every path, 3 repeats, 1 thread
    python benchmarks/bench_fastpaths.py --threads 2 --repeats 5 --only upsample
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from carbseg.class_argmax import class_argmax
from carbseg.models.dilated import (
    PADDING_SKIP_MAX_VALID_SHARE,
    PhaseSplitDepthwiseConv2d,
    _PaddingSkippingConvolution,
    valid_share,
)
from carbseg.models.upsample import matrix_products_pay, product_dtype, upsample_by_matrix_products
from carbseg.precision import machine_summary

MiB = 2**20


@dataclass
class Case:
    path: str  # which fast path
    shape: str  # what the row is, in words
    mode: str  # "train" (forward + backward) or "infer" (forward, no gradients)
    fast: Callable[[], object]
    standard: Callable[[], object]
    taken: str  # what carbseg's rule does at this shape


# ---------------------------------------------------------------- memory
def _libc():
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6")
    return None


def _return_freed_memory() -> None:
    """Make glibc map large blocks afresh and give freed ones back, so that the resident set measures
    what one call allocates (carbseg's own runs keep freed memory instead: ``carbseg.allocator``)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: blocks above 64 KiB are mapped and unmapped
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: give the heap's free top back at once


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_bytes(fn: Callable[[], object]) -> int | None:
    """Bytes ``fn`` adds at its peak: the resident high-water mark during the call minus the resident
    size before it (Linux: writing 5 to clear_refs resets the mark); None where that cannot be done."""
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        before = _status("VmRSS:")
        result = fn()
        peak = _status("VmHWM:") - before
    except OSError:
        return None
    del result
    return max(peak, 0)


# ---------------------------------------------------------------- the cases
def _train(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *params: torch.Tensor):
    """forward + backward through ``fn`` from a leaf copy of ``x`` (gradient of ones)."""

    def run():
        leaf = x.detach().requires_grad_()
        out = fn(leaf)
        grads = torch.autograd.grad(out, (leaf, *params), torch.ones_like(out))
        return out, grads

    return run


def _infer(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    def run():
        with torch.no_grad():
            return fn(x)

    return run


def upsample_cases() -> list[Case]:
    cases = []
    shapes = [  # (words, batch, classes, logits size, image size, mode, dtype)
        ("demo 4x19 16x32->128x256", 4, 19, (16, 32), (128, 256), "train", torch.float32),
        ("demo, bf16 logits", 4, 19, (16, 32), (128, 256), "train", torch.bfloat16),
        ("CamVid OS16 4x11 15x20->240x320", 4, 11, (15, 20), (240, 320), "train", torch.float32),
        ("CamVid OS16, bf16 logits", 4, 11, (15, 20), (240, 320), "train", torch.bfloat16),
        ("CamVid OS8 4x11 30x40->240x320", 4, 11, (30, 40), (240, 320), "train", torch.float32),
        ("CamVid frame 1x11 45x60->360x480", 1, 11, (45, 60), (360, 480), "infer", torch.float32),
        ("Cityscapes crop 4x19 64x128->512x1024", 4, 19, (64, 128), (512, 1024), "train", torch.float32),
        ("Cityscapes 1x19 128x256->1024x2048", 1, 19, (128, 256), (1024, 2048), "train", torch.float32),
        ("Cityscapes 8x19 128x256->1024x2048", 8, 19, (128, 256), (1024, 2048), "infer", torch.float32),
        ("Cityscapes x1.75 1x19 224x448->1792x3584", 1, 19, (224, 448), (1792, 3584), "infer", torch.float32),
    ]
    for words, batch, classes, size_in, size_out, mode, dtype in shapes:
        x = torch.randn(batch, classes, *size_in, generator=torch.Generator().manual_seed(0)).to(dtype)

        def fast(t, size_out=size_out):
            return upsample_by_matrix_products(t, size_out)

        def standard(t, size_out=size_out):
            return F.interpolate(t, size=size_out, mode="bilinear", align_corners=False)

        wrap = _train if mode == "train" else _infer
        product_size = torch.empty((), dtype=product_dtype(dtype)).element_size()
        taken = matrix_products_pay(batch * classes, size_in, size_out, x.element_size(), product_size)
        cases.append(Case("upsample", words, mode, wrap(fast, x), wrap(standard, x), "yes" if taken else "no"))
    return cases


def depthwise_cases() -> list[Case]:
    """EfficientNet-Lite0's 1152-channel 5x5 depthwise layer at dilation 4 (output stride 8)."""
    cases = []
    for words, batch, size, mode in [("demo 4x1152 16x32, d4", 4, (16, 32), "train"),
                                     ("CamVid 4x1152 30x40, d4", 4, (30, 40), "train"),
                                     ("CamVid frame 1x1152 45x60, d4", 1, (45, 60), "infer"),
                                     ("Cityscapes crop 1x1152 64x128, d4", 1, (64, 128), "train"),
                                     ("Cityscapes 1x1152 128x256, d4", 1, (128, 256), "infer")]:
        torch.manual_seed(0)
        standard = nn.Conv2d(1152, 1152, 5, padding=8, dilation=4, groups=1152, bias=False)
        fast = PhaseSplitDepthwiseConv2d(1152, 1152, 5, padding=8, dilation=4, groups=1152, bias=False)
        fast.load_state_dict(standard.state_dict())
        x = torch.randn(batch, 1152, *size).contiguous(memory_format=torch.channels_last)
        if mode == "train":
            run_fast, run_standard = _train(fast, x, fast.weight), _train(standard, x, standard.weight)
        else:
            run_fast, run_standard = _infer(fast, x), _infer(standard, x)
        cases.append(Case("phase-split depthwise", words, mode, run_fast, run_standard, "yes"))
    return cases


def aspp_cases() -> list[Case]:
    """One ASPP branch of EfficientNet-Lite0 at output stride 8 (320 -> 512 channels, 3x3), the
    release's dilations 12 and 24."""
    cases = []
    for words, batch, size in [("demo 4x320 16x32", 4, (16, 32)), ("CamVid 4x320 30x40", 4, (30, 40)),
                               ("Cityscapes crop 1x320 64x128", 1, (64, 128))]:
        for dilation in (12, 24):
            torch.manual_seed(0)
            conv = nn.Conv2d(320, 512, 3, padding=dilation, dilation=dilation, bias=False)
            x = torch.randn(batch, 320, *size).contiguous(memory_format=torch.channels_last)

            def fast(t, conv=conv, dilation=dilation):
                return _PaddingSkippingConvolution.apply(t, conv.weight, None, (dilation, dilation))

            share = valid_share(*size, (3, 3), (dilation, dilation))
            taken = f"{'yes' if share <= PADDING_SKIP_MAX_VALID_SHARE else 'no'} ({share:.0%} valid)"
            cases.append(Case("padding-skipping ASPP", f"{words}, d{dilation}", "train",
                              _train(fast, x, conv.weight), _train(conv, x, conv.weight), taken))
    return cases


def argmax_cases() -> list[Case]:
    cases = []
    for words, shape in [("demo 4x19 128x256", (4, 19, 128, 256)), ("CamVid 1x11 360x480", (1, 11, 360, 480)),
                         ("Cityscapes 1x19 1024x2048", (1, 19, 1024, 2048))]:
        scores = torch.randn(*shape)
        cases.append(Case("class_argmax", words, "infer", _infer(class_argmax, scores),
                          _infer(lambda s: torch.argmax(s, dim=1), scores), "yes"))
    return cases


PATHS = {"upsample": upsample_cases, "depthwise": depthwise_cases, "aspp": aspp_cases, "argmax": argmax_cases}


# ---------------------------------------------------------------- timing
def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(case: Case, repeats: int) -> dict:
    case.fast()
    case.standard()  # warm-up: first-call allocations, oneDNN primitive creation
    fast, standard = [], []
    for _ in range(repeats):
        fast.append(_ms(case.fast))
        standard.append(_ms(case.standard))
    fast_ms, standard_ms = statistics.median(fast), statistics.median(standard)
    return {"fast_ms": fast_ms, "standard_ms": standard_ms, "speedup": standard_ms / fast_ms,
            "fast_mem": peak_bytes(case.fast), "standard_mem": peak_bytes(case.standard)}


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MiB:,.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each path per row (median)")
    parser.add_argument("--only", choices=sorted(PATHS), action="append", help="these paths only (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _return_freed_memory()
    print(f"machine: {machine_summary('cpu')}")
    print(f"repeats {args.repeats}, medians; speed-up = standard / fast; memory = peak over the call, MiB\n")
    print("| fast path | shape | mode | fast ms | standard ms | speed-up | fast MiB | standard MiB "
          "| memory ratio | rule takes it |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.only or list(PATHS):
        for case in PATHS[name]():
            row = measure(case, args.repeats)
            ratio = ("n/a" if not row["fast_mem"] or not row["standard_mem"]
                     else f"{row['fast_mem'] / row['standard_mem']:.2f}x")
            print(f"| {case.path} | {case.shape} | {case.mode} | {row['fast_ms']:,.1f} | {row['standard_ms']:,.1f} "
                  f"| {row['speedup']:.2f}x | {_mib(row['fast_mem'])} | {_mib(row['standard_mem'])} | {ratio} "
                  f"| {case.taken} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
