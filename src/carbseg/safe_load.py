"""Reading tensors from files that someone else wrote, without ever running code from them.

safetensors files hold no code at all. Torch pickles (``.pt``/``.pth``/``.bin``) are read only with
``torch.load(weights_only=True)``, whose unpickler refuses any global outside a small tensor
allow-list, so a pickle with a ``__reduce__`` payload is rejected before the payload is called.
Refusals and damaged files become one-line ``UserError``s; torch's own message is multi-line and
advises ``weights_only=False``, which is exactly what must not be done with an untrusted file.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from carbseg.errors import UserError


def one_line_reason(err: BaseException) -> str:
    """The informative line of a loading error: for a weights-only refusal, the refused global."""
    text = str(err)
    for line in text.splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().split(". Please use")[0].replace("WeightsUnpickler error: ", "")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first.split(" This file can still be loaded")[0].replace("\x1b[1m", "").replace("\x1b[0m", "")


def torch_load_weights_only(path: str | os.PathLike, fix: str):
    """``torch.load(path, weights_only=True)`` on CPU; UserError naming ``path`` and ``fix`` otherwise."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: refused to load: it holds objects a weights-only load does not allow "
                        f"({one_line_reason(err)}); it may be malicious -- {fix}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, IndexError) as err:
        raise UserError(f"{path}: cannot read ({type(err).__name__}: {one_line_reason(err)}); {fix}") from None
