"""Checkpoints: the trained model as safetensors, the resumable training state as a weights-only pickle.

Two kinds of file, with different loading rules:

* ``model.safetensors`` -- what ``carbseg evaluate`` / ``predict`` / ``export-onnx`` read. It holds the
  model's ``state_dict`` plus, as string metadata, the resolved run config and the class set, so the
  segmenter can be rebuilt with nothing else. safetensors never executes code while loading.
* ``checkpoint_last.pt`` -- what ``carbseg train --resume`` reads (optimizer, iteration, CARB loss queue,
  AMP scaler, RNG state; see ``carbseg.engine.run_dir``).
  It is loaded only with ``torch.load(weights_only=True)``, which refuses any pickle that would import
  or call arbitrary Python (a "payload"), so a tampered file fails with a UserError instead of running.

A pickle (``.pt`` / ``.pth``) where a model is expected is refused outright: carbseg never unpickles a
file to get a model.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from carbseg import __version__
from carbseg.config import Config, config_from_dict, config_to_dict, upgrade_saved_config
from carbseg.data.classes import ClassSet
from carbseg.errors import UserError
from carbseg.io import atomic_path

META_CONFIG = "carbseg.config"
META_CLASSES = "carbseg.classes"
META_VERSION = "carbseg.version"

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTOCOL_OPCODE = 0x80  # first byte of a pickle of protocol >= 2 (torch's legacy format)


@dataclass
class LoadedModel:
    model: torch.nn.Module  # in eval() mode, on the requested device
    config: Config
    classes: ClassSet


# ---------------------------------------------------------------- model (safetensors)
def save_model(path: str | os.PathLike, model: torch.nn.Module, cfg: Config, classes: ClassSet) -> Path:
    """Write ``model.state_dict()`` with the config and class set as metadata, atomically."""
    path = Path(path)
    # safetensors wants contiguous CPU tensors that share no storage; clone() guarantees both
    # (e.g. a frozen text-embedding classifier that views a buffer would otherwise be refused).
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
    metadata = {
        META_CONFIG: json.dumps(config_to_dict(cfg)),
        META_CLASSES: json.dumps(classes.to_dict()),
        META_VERSION: __version__,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (u64, little-endian), then ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + header_len <= path.stat().st_size


def _looks_like_pickle(path: Path) -> bool:
    """A torch.save zip archive, or a raw pickle of protocol >= 2 (torch's legacy format)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(_ZIP_MAGIC) or (len(head) > 1 and head[0] == _PICKLE_PROTOCOL_OPCODE)


def read_model_metadata(path: str | os.PathLike) -> tuple[Config, ClassSet]:
    """The config and class set stored in a ``model.safetensors`` (no tensors are read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; pass the model.safetensors written by carbseg train")
    # Checked in this order: a safetensors header length may itself start with the byte 0x80.
    if not _looks_like_safetensors(path) and _looks_like_pickle(path):
        raise UserError(
            f"{path}: this is a PyTorch pickle (.pt/.pth), which carbseg never loads as a model because "
            "unpickling can run code; pass the model.safetensors written by carbseg train"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, struct.error) as err:
        raise UserError(
            f"{path}: not a valid safetensors file ({err}); pass the model.safetensors written by carbseg train"
        ) from None
    missing = [k for k in (META_CONFIG, META_CLASSES) if k not in metadata]
    if missing:
        raise UserError(
            f"{path}: safetensors file lacks the carbseg metadata ({', '.join(missing)}); it was not written by "
            "carbseg train -- use a carbseg model.safetensors (or re-save the weights with "
            "carbseg.engine.checkpoint.save_model)"
        )
    try:
        # A model written before a config key was renamed: its config is read with the new names.
        source = f"{path} (embedded config)"
        cfg = config_from_dict(upgrade_saved_config(json.loads(metadata[META_CONFIG]), source), source=source)
        classes = ClassSet.from_dict(json.loads(metadata[META_CLASSES]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: corrupt carbseg metadata ({err}); re-export the checkpoint") from None
    return cfg, classes


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the segmenter from the embedded config and load its weights (strictly), in eval mode."""
    from carbseg.models.segmenter import build_segmenter

    path = Path(path)
    cfg, classes = read_model_metadata(path)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the tensors ({err}); the file is damaged, copy it again") from None
    # No pretrained download: every weight (including the frozen CLIP text embeddings of the
    # text classifier) comes from the checkpoint itself.
    model = build_segmenter(cfg.model, classes.num_classes, load_pretrained=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else "state dict mismatch"
        detail = " ".join(str(err).split())[:300]
        raise UserError(
            f"{path}: weights do not match the model described by its own config ({first}: {detail}); "
            "the file was written by an incompatible carbseg version or edited"
        ) from None
    model.to(device).eval()
    return LoadedModel(model=model, config=cfg, classes=classes)


# ---------------------------------------------------------------- training state (weights-only pickle)
def save_training_state(path: str | os.PathLike, state: dict) -> Path:
    """``torch.save`` atomically. Keep ``state`` weights-only loadable: tensors, numbers, strings,
    lists/tuples/dicts of those (e.g. convert a numpy RNG state with ``.tolist()``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _unsafe_global_reason(message: str) -> str:
    """The line of torch's weights-only error that names the refused object (its advice to
    re-run with ``weights_only=False`` is exactly what must not be done with an untrusted file)."""
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().split(". Please use")[0].replace("WeightsUnpickler error: ", "")
    return "unsupported content"


def load_training_state(path: str | os.PathLike) -> dict:
    """Load a training state on CPU with ``weights_only=True``; any payload is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: training state not found; start without --resume or point to the run folder")
    if not _looks_like_pickle(path):
        raise UserError(f"{path}: not a training state written by carbseg train (not a PyTorch file); it was "
                        "replaced or damaged -- restore it, or start again in a new --out without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unsafe_global_reason(str(err))
        raise UserError(
            f"{path}: refused to load: the file contains objects a weights-only load does not allow ({reason}); "
            "it was not written by carbseg train or has been tampered with -- do not use it"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: cannot read the training state ({reason}); the file is damaged") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: training state is a {type(state).__name__}, expected a dict")
    return state
