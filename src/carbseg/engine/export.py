"""ONNX export of a trained segmenter, for deployment without PyTorch.

The exported graph is the whole segmenter, normalisation and final bilinear upsampling included:
input ``images`` float32 (B, 3, H, W) RGB in 0..255, output ``logits`` float32 (B, C, H, W) at the
input size; the argmax over C is the train-id prediction. By default (``dynamic=True``) the batch,
height and width are free, so one file takes a 360x480 CamVid frame and a 1024x2048 Cityscapes one
alike (``height`` x ``width`` is then only the size the graph is traced at); ``dynamic=False`` fixes the
input to 1 x 3 x ``height`` x ``width`` (some runtimes optimise better) and onnxruntime refuses any other.

The TorchScript-based exporter is used because it needs nothing beyond torch and onnx (the newer
torch.export-based exporter needs ``onnxscript``).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from carbseg.engine.checkpoint import LoadedModel, load_model
from carbseg.errors import UserError
from carbseg.io import atomic_path

MIN_OPSET = 17  # first opset with LayerNormalization; keeps every op of the backbones native
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def export_onnx(
    checkpoint: str | os.PathLike | LoadedModel,
    out_path: str | os.PathLike,
    height: int = 512,
    width: int = 1024,
    dynamic: bool = True,
    opset: int = MIN_OPSET,
) -> Path:
    """Write ``out_path`` (atomically) and check it with ``onnx.checker``; returns the path."""
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx extra: run pip install -e '.[onnx]' in the carbseg checkout") from None
    if opset < MIN_OPSET:
        raise UserError(f"ONNX opset {opset} is too old; use {MIN_OPSET} or newer")
    if height < 1 or width < 1:
        raise UserError(f"export size {height}x{width} must be positive")
    out_path = Path(out_path)
    if isinstance(checkpoint, LoadedModel):
        # A copy: the caller's model stays on its device, in its dtype and mode.
        model = copy.deepcopy(checkpoint.model).to("cpu").float().eval()
    else:
        model = load_model(checkpoint, device="cpu").model.float().eval()
    example = torch.zeros(1, 3, height, width)
    free = {0: "batch", 2: "height", 3: "width"}
    dynamic_axes = {INPUT_NAME: free, OUTPUT_NAME: free} if dynamic else None
    with atomic_path(out_path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated on every call; it is chosen on purpose.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
        onnx.checker.check_model(str(tmp))
    return out_path


def onnx_parity(model: torch.nn.Module, onnx_path: str | os.PathLike, images: torch.Tensor) -> float:
    """Max absolute difference between PyTorch's and onnxruntime's logits on ``images`` (0..255).

    Both run on the CPU in fp32, as the exported graph does. PyTorch's side runs on a copy of
    ``model``, so the caller's model keeps its device, dtype and training mode (the trainer's, or
    one on a GPU), and ``images`` may live on any device.
    """
    import onnxruntime as ort

    images = images.detach().cpu().float()  # numpy() reads host memory only
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
    reference = copy.deepcopy(model).to("cpu").float().eval()
    with torch.inference_mode():
        torch_logits = reference(images).numpy()
    return float(np.abs(onnx_logits - torch_logits).max())
