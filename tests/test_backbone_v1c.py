"""The release's backbone: mmsegmentation's ResNetV1c with open-mmlab's v1c ImageNet checkpoints.

The checkpoint is built synthetically with open-mmlab's key names and shapes (``state_dict`` wrapper,
``stem.0`` ... ``stem.7``, ``layerN.M.conv1``/``bn1``/``downsample.0``, the ImageNet ``fc``), and the
loaded backbone is compared with a forward pass written here from mmseg's definition (deep stem,
stride on the 3x3 conv, ``dilations=(1, 1, 2, 4)`` with ``contract_dilation``).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from carbseg.errors import MissingWeightsError, UserError
from carbseg.models import backbones
from carbseg.models.backbones import RESNET_V1C_URLS, build_backbone

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _bn(state, prefix, channels, gen, counters=True):
    state[f"{prefix}.weight"] = torch.rand(channels, generator=gen) + 0.5
    state[f"{prefix}.bias"] = torch.randn(channels, generator=gen) * 0.1
    state[f"{prefix}.running_mean"] = torch.randn(channels, generator=gen) * 0.1
    state[f"{prefix}.running_var"] = torch.rand(channels, generator=gen) + 0.5
    if counters:
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)


def _conv(state, key, cout, cin, k, gen):
    state[key] = torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5


def v1c_checkpoint(depth=50, counters=True, seed=0) -> dict:
    """An open-mmlab ``resnet{depth}_v1c`` checkpoint in layout, names and shapes, random values."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for index, (cin, cout) in zip((0, 3, 6), ((3, 32), (32, 32), (32, 64))):
        _conv(sd, f"stem.{index}.weight", cout, cin, 3, gen)
        _bn(sd, f"stem.{index + 1}", cout, gen, counters)
    inplanes = 64
    for stage, blocks in enumerate(BLOCKS[depth]):
        planes = 64 * 2**stage
        for block in range(blocks):
            p = f"layer{stage + 1}.{block}"
            _conv(sd, f"{p}.conv1.weight", planes, inplanes, 1, gen)
            _bn(sd, f"{p}.bn1", planes, gen, counters)
            _conv(sd, f"{p}.conv2.weight", planes, planes, 3, gen)
            _bn(sd, f"{p}.bn2", planes, gen, counters)
            _conv(sd, f"{p}.conv3.weight", planes * 4, planes, 1, gen)
            _bn(sd, f"{p}.bn3", planes * 4, gen, counters)
            if block == 0:
                _conv(sd, f"{p}.downsample.0.weight", planes * 4, inplanes, 1, gen)
                _bn(sd, f"{p}.downsample.1", planes * 4, gen, counters)
            inplanes = planes * 4
    sd["fc.weight"] = torch.randn(1000, 2048, generator=gen) * 0.01
    sd["fc.bias"] = torch.zeros(1000)
    return {"meta": {"mmcv_version": "1.4.0"}, "state_dict": sd}


def _ref_bn(x, sd, prefix):
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                        sd[f"{prefix}.bias"], training=False, eps=1e-5)


def reference_forward(sd: dict, x: torch.Tensor, depth: int = 50) -> torch.Tensor:
    """mmseg ResNetV1c(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True), eval mode."""
    for index, stride in zip((0, 3, 6), (2, 1, 1)):
        x = F.relu(_ref_bn(F.conv2d(x, sd[f"stem.{index}.weight"], stride=stride, padding=1), sd,
                           f"stem.{index + 1}"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for stage, (blocks, stride, dilation) in enumerate(zip(BLOCKS[depth], (1, 2, 1, 1), (1, 1, 2, 4))):
        for block in range(blocks):
            p = f"layer{stage + 1}.{block}"
            d = (dilation // 2 if dilation > 1 else 1) if block == 0 else dilation  # contract_dilation
            s = stride if block == 0 else 1
            out = F.relu(_ref_bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
            out = F.relu(_ref_bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=s, padding=d, dilation=d), sd,
                                 f"{p}.bn2"))
            out = _ref_bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            identity = x
            if block == 0:
                identity = _ref_bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=s), sd, f"{p}.downsample.1")
            x = F.relu(out + identity)
    return x


def test_v1c_checkpoint_loads_key_for_key_and_matches_mmseg_forward(tmp_path):
    checkpoint = v1c_checkpoint()
    path = tmp_path / "resnet50_v1c-2cccc1ad.pth"
    torch.save(checkpoint, path)
    backbone = build_backbone("resnet50_v1c", pretrained=str(path)).eval()
    sd = checkpoint["state_dict"]
    own = backbone.state_dict()
    assert {k for k in sd if not k.startswith("fc.")} | {k for k in own if k.endswith("num_batches_tracked")} \
        == set(own)
    assert all(torch.equal(own[k], sd[k]) for k in sd if k in own)
    x = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(1)) * 4 - 2
    with torch.no_grad():
        features = backbone(x)
    assert tuple(features.shape) == (1, 2048, 8, 10)  # output stride 8
    assert torch.allclose(features, reference_forward(sd, x), atol=1e-4, rtol=1e-4)


def test_a_checkpoint_without_bn_step_counters_loads(tmp_path):
    """Older open-mmlab files have no ``num_batches_tracked``; every other tensor must still load."""
    checkpoint = v1c_checkpoint(counters=False, seed=2)
    path = tmp_path / "old.pth"
    torch.save(checkpoint, path)
    own = build_backbone("resnet50_v1c", pretrained=str(path)).state_dict()
    assert all(torch.equal(own[k], v) for k, v in checkpoint["state_dict"].items() if not k.startswith("fc."))


def test_torchvision_weights_do_not_fit_the_v1c_backbone(tmp_path):
    import torchvision

    path = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(UserError, match="ResNetV1cBackbone.*missing.*stem"):
        build_backbone("resnet50_v1c", pretrained=str(path))


def test_imagenet_and_url_download_once_into_the_hub_cache(tmp_path, monkeypatch):
    source = tmp_path / "served.pth"
    torch.save(v1c_checkpoint(seed=3), source)
    hub = tmp_path / "hub"
    downloads = []

    def fake_download(url, dst, progress=True):
        downloads.append(url)
        shutil.copyfile(source, dst)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    first = build_backbone("resnet50_v1c", pretrained="imagenet")
    assert downloads == [RESNET_V1C_URLS[50]]
    assert (hub / "checkpoints" / "resnet50_v1c-2cccc1ad.pth").is_file()
    build_backbone("resnet50_v1c", pretrained="imagenet")  # cached: no second download
    assert downloads == [RESNET_V1C_URLS[50]]
    url = "https://example.org/weights/my_v1c.pth"
    second = build_backbone("resnet50_v1c", pretrained=url)
    assert downloads[-1] == url
    assert torch.equal(first.stem[0].weight, second.stem[0].weight)


def test_offline_without_the_file_names_the_url_and_the_cache_path(tmp_path, monkeypatch):
    def offline(url, dst, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MissingWeightsError) as err:
        build_backbone("resnet101_v1c", pretrained="imagenet")
    message = str(err.value)
    assert RESNET_V1C_URLS[101] in message and "resnet101_v1c-e67eebb6.pth" in message
    assert "\n" not in message


def test_a_pickled_payload_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"stem.0.weight": Payload()}}, path)
    with pytest.raises(UserError):
        backbones.build_backbone("resnet50_v1c", pretrained=str(path))
