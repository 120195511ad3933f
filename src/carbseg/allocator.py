"""Keep freed memory in the process (glibc): no page faults on every training step.

PyTorch's CPU allocator hands each tensor to ``malloc`` and back. glibc serves blocks above its mmap
threshold with a fresh ``mmap`` and unmaps them on free, and returns the top of its heap to the system
once more than its trim threshold lies free there, so the next step's tensors of the same sizes fault
their pages in again. On a 2-core virtual machine that was about 10,000 minor page faults per demo
iteration (3 million in 300 iterations, 5 s of system time) and 50,000-200,000 per EfficientNet-Lite0
step. Keeping them made the demo 1.14-1.20x and that step 1.06-1.13x faster (benchmarks/RESULTS.md, "Page faults").

:func:`keep_freed_memory` fixes the mmap threshold at its largest allowed value (32 MiB on 64-bit glibc:
larger blocks are still mapped and unmapped) and raises the trim threshold, so blocks below 32 MiB are
reused from the heap instead. Exact: only where memory comes from changes, never a value. The cost is
that memory freed by the process stays mapped to it (its resident size stays at its peak), which is what
a training or inference job wants; ``CARBSEG_ALLOCATOR=default`` leaves glibc's defaults.

Only glibc has these knobs; elsewhere (macOS, Windows, musl) this does nothing and says so in its answer.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "CARBSEG_ALLOCATOR"
# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2); mallopt refuses more
TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: trim only beyond 2 GiB lying free

_state: str | None = None


def keep_freed_memory() -> str:
    """Set glibc's mmap and trim thresholds once per process (see the module docstring); returns what
    was done, for logs and benchmark tables: ``"kept (glibc)"``, ``"default (CARBSEG_ALLOCATOR=default)"``,
    ``"default (not glibc)"`` or ``"default (mallopt refused)"``. Idempotent.
    """
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get(ENV, "keep").strip().lower()
    if choice not in ("keep", "default"):
        from carbseg.errors import UserError

        raise UserError(f"{ENV}={os.environ[ENV]!r}: use 'keep' (the default) or 'default' (glibc's own thresholds)")
    if choice == "default":
        _state = f"default ({ENV}=default)"
    else:
        mallopt = _glibc_mallopt()
        if mallopt is None:
            _state = "default (not glibc)"
        elif mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
            _state = "kept (glibc)"
        else:  # a glibc that refuses the values: whatever it kept, say that it is not ours
            _state = "default (mallopt refused)"
    return _state


def allocator_state() -> str:
    """What :func:`keep_freed_memory` did in this process, without doing it: for machine lines."""
    return _state or "default (not set in this process)"


def _glibc_mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int  # int mallopt(int, int)
    return mallopt
