"""Decoded training frames kept in memory, up to a byte budget.

Training reads every frame once per epoch and decodes its PNG (or JPEG) image and mask each time;
for a small dataset on a CPU the decoding is a large share of the step (the demo: 300 frames of
256 x 128, about 7 ms of a 70 ms iteration, benchmarks/RESULTS.md). The decoded arrays are the
same every epoch, so they are kept, frame by frame, until the budget is spent; frames beyond it are
decoded as before. The training batches are bit-identical with and without the cache.

The cached arrays are read-only: an augmentation that wrote into its input would corrupt every
later epoch of that frame, and fails loudly instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class DecodedCache:
    """``get(index, load)``: ``load(index)``'s arrays, decoded once while ``budget_bytes`` allows."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = max(int(budget_bytes), 0)
        self.used_bytes = 0
        self._frames: dict[int, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        return len(self._frames)

    def get(self, index: int, load: Callable[[int], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        cached = self._frames.get(index)
        if cached is not None:
            return cached
        arrays = load(index)
        size = sum(a.nbytes for a in arrays)
        if self.used_bytes + size <= self.budget_bytes:
            for a in arrays:
                a.flags.writeable = False
            self._frames[index] = arrays
            self.used_bytes += size
        return arrays
