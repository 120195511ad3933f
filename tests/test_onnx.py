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
    path = export_onnx(checkpoint, tmp_path / "fixed.onnx", height=24, width=40)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, CAMVID.num_classes, 24, 40]
    images = torch.randint(0, 256, (1, 3, 24, 40)).float()
    assert onnx_parity(load_model(checkpoint).model, path, images) < 1e-4


def test_cli_export_onnx(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path, "learned")
    out = tmp_path / "cli.onnx"
    assert main(["export-onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--height", "32",
                 "--width", "32", "--dynamic"]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert main(["export-onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--opset", "13"]) == 2
    assert "opset 13 is too old" in capsys.readouterr().err
