"""Seeds and random-number-generator state: what makes a training run a function of (seed, iteration, rank).

Every iteration reseeds the global torch generator and draws its GLV patch from a generator seeded
by ``derive_seed(seed, iteration, ...)``, so nothing random depends on how the run got there; the
global torch and numpy states are still saved in the checkpoint (``rng_state``), for anything
outside that rule.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, iteration, rank, ...), well mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def numpy_rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))
