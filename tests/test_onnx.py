"""ONNX export: a valid graph (opset >= 17) whose logits match PyTorch's under onnxruntime."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from carbseg.cli import main
from carbseg.config import Config, ModelConfig
from carbseg.data.classes import CAMVID
from carbseg.engine.checkpoint import load_model, save_model
from carbseg.models.segmenter import build_segmenter

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from carbseg.engine.export import export_onnx, onnx_parity  # noqa: E402  (after the optional imports)


def _checkpoint(tmp_path, classifier):
    cfg = Config(name="onnx-test")
    cfg.model = ModelConfig(backbone="tiny", pretrained="none", classifier=classifier, head_channels=32,
                            embed_dim=16, aspp_dilations=[1, 2])
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(CAMVID.num_classes, 16), dim=1) if classifier == "text" else None
    model = build_segmenter(cfg.model, CAMVID.num_classes, class_embeddings=embeddings, load_pretrained=False)
    return save_model(tmp_path / f"{classifier}.safetensors", model, cfg, CAMVID)


@pytest.mark.parametrize("classifier", ["learned", "text"])
def test_dynamic_export_matches_pytorch_at_several_sizes(tmp_path, classifier):
    checkpoint = _checkpoint(tmp_path, classifier)
    path = export_onnx(checkpoint, tmp_path / "model.onnx", height=32, width=48, dynamic=True)
    graph = onnx.load(str(path))
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in graph.graph.input] == ["images"] and [o.name for o in graph.graph.output] == ["logits"]
    model = load_model(checkpoint).model
    gen = torch.Generator().manual_seed(0)
    for shape in ((1, 3, 32, 48), (2, 3, 40, 56)):  # the second size was never seen at export
        images = torch.randint(0, 256, shape, generator=gen).float()
        assert onnx_parity(model, path, images) < 1e-4


def test_fixed_size_export_has_static_shapes(tmp_path):
    checkpoint = _checkpoint(tmp_path, "learned")
    path = export_onnx(checkpoint, tmp_path / "fixed.onnx", height=24, width=40, dynamic=False)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, CAMVID.num_classes, 24, 40]
    images = torch.randint(0, 256, (1, 3, 24, 40)).float()
    assert onnx_parity(load_model(checkpoint).model, path, images) < 1e-4


def test_cli_export_onnx(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path, "learned")
    out = tmp_path / "cli.onnx"
    assert main(["export-onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--dynamic"]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert main(["export-onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--opset", "13"]) == 2
    assert "opset 13 is too old" in capsys.readouterr().err
    assert main(["export-onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--fixed-size", "1024"]) == 2
    assert "--fixed-size '1024': expected HEIGHTxWIDTH" in capsys.readouterr().err
    assert main(["export-onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--fixed-size", "24x40",
                 "--height", "24"]) == 2
    assert "--fixed-size HxW is the whole size request" in capsys.readouterr().err


def test_cli_export_takes_any_frame_size_by_default(tmp_path, capsys):
    """One file with no size flag serves a 360x480 CamVid frame and a differently sized batch."""
    checkpoint = _checkpoint(tmp_path, "learned")
    out = tmp_path / "default.onnx"
    assert main(["export-onnx", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert "batch, height and width free" in capsys.readouterr().out
    model = load_model(checkpoint).model
    gen = torch.Generator().manual_seed(1)
    for shape in ((1, 3, 360, 480), (2, 3, 256, 320)):
        images = torch.randint(0, 256, shape, generator=gen).float()
        assert onnx_parity(model, out, images) < 1e-4, shape


@pytest.mark.parametrize("size_flags", [["--fixed-size", "24x40"], ["--height", "24", "--width", "40"]])
def test_cli_fixed_size_is_height_by_width(tmp_path, capsys, size_flags):
    import onnxruntime as ort

    checkpoint = _checkpoint(tmp_path, "learned")
    out = tmp_path / "fixed.onnx"
    assert main(["export-onnx", "--checkpoint", str(checkpoint), "--out", str(out), *size_flags]) == 0
    assert "fixed (1, 3, 24, 40)" in capsys.readouterr().out
    dims = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 24, 40]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension"):  # a fixed file refuses another size
        session.run(["logits"], {"images": torch.zeros(1, 3, 40, 24).numpy()})


def test_cli_size_flags_with_dynamic_only_set_the_traced_size(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path, "learned")
    out = tmp_path / "traced.onnx"
    assert main(["export-onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--height", "24", "--width",
                 "40", "--dynamic"]) == 0
    assert "batch, height and width free" in capsys.readouterr().out
    images = torch.randint(0, 256, (1, 3, 360, 480), generator=torch.Generator().manual_seed(2)).float()
    assert onnx_parity(load_model(checkpoint).model, out, images) < 1e-4


class _PretendGpuTensor(torch.Tensor):
    """A CPU tensor that behaves like a CUDA one where it matters here: ``numpy()`` refuses it until it
    is moved to the CPU with ``cpu()`` or ``to("cpu")`` (which return a plain tensor)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = super().__torch_function__(func, types, args, kwargs)
        targets = [*args[1:], *kwargs.values()]
        to_cpu = func is torch.Tensor.cpu or (
            func is torch.Tensor.to and any(str(t) == "cpu" for t in targets if isinstance(t, (str, torch.device))))
        return result.as_subclass(torch.Tensor) if to_cpu and isinstance(result, torch.Tensor) else result

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")


def test_parity_moves_images_to_the_cpu_and_leaves_the_callers_model_alone(tmp_path):
    checkpoint = _checkpoint(tmp_path, "learned")
    path = export_onnx(checkpoint, tmp_path / "m.onnx", height=32, width=48)
    caller = load_model(checkpoint).model.double().train()  # e.g. the trainer's model, mid-training
    device, weights = next(caller.parameters()).device, [p.detach().clone() for p in caller.parameters()]
    images = torch.randint(0, 256, (1, 3, 32, 48)).float().as_subclass(_PretendGpuTensor)
    with pytest.raises(TypeError, match="cuda"):
        images.numpy()  # the stand-in refuses as a CUDA tensor does
    assert onnx_parity(caller, path, images) < 1e-4
    assert caller.training and next(caller.parameters()).dtype == torch.float64
    assert next(caller.parameters()).device == device
    assert all(torch.equal(a, b) for a, b in zip(weights, caller.parameters()))
