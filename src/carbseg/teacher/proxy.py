"""The proxy teacher: an image-driven stand-in for CLIP's dense path (a RESEARCH INSTRUMENT).

No CLIP weights can be had offline, and the simulated teacher reads the ground truth, so neither
can show what the method does with a teacher whose errors come from the *pixels*. The proxy
teacher is frozen and sees only the image, like CLIP's dense path:

- **Dense features** of a frozen ImageNet EfficientNet-Lite0 (the only pretrained network that
  exists offline here), taken at three levels (output strides 8, 16, 32) and brought to one coarse
  grid of ``GRID_STRIDE`` = 16 px -- the footprint of ViT-B/16's patches: stride-8 features are
  average-pooled, stride-32 features bilinearly upsampled, and the three are concatenated.
- **A per-class linear classifier** on the standardised features, fitted once on the ground truth
  of a small declared *fit set* of training images (``carbseg fit-proxy-teacher``; the ids are in
  the weight file's metadata). That is what makes it an instrument and not weak supervision: a few
  images' masks were used. Its fit images are excluded from training and from every evaluation
  that reports it.
- **The same post-processing as the CLIP teacher**, through the same functions: scores upsampled
  bilinearly to the view, restricted to the image-level classes with -inf, argmax; multi-scale
  averaging like ``teacher.scales``.

Because the labels are a function of the pixels, the same region gets the same label in every
view up to resampling (its errors persist across crops and flips, as CLIP's do), and a zoomed GLV
patch gets finer labels only because the network sees more pixels of it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carbseg.data.classes import IGNORE_INDEX, ClassSet
from carbseg.errors import UserError
from carbseg.teacher.pseudo_masks import masks_from_scores

log = logging.getLogger(__name__)

FORMAT = "carbseg-proxy-teacher"
FORMAT_VERSION = "1"
GRID_STRIDE = 16  # px: the coarse grid of ViT-B/16's patches
FEATURE_LEVELS = (2, 3, 4)  # timm efficientnet_lite0 feature indices at output strides 8, 16, 32
BACKBONE = "efficientnet_lite0"
# The fit images are seen at these zooms: GLV asks the teacher to label patches zoomed up to ~2.5x,
# and a classifier fitted at one scale only mislabels every zoomed view (CamVid val: 43.6 -> 35.7
# mIoU at 2x when fitted at 1x on 10 images), which would bias the instrument against GLV.
FIT_SCALES = (1.0, 2.0)
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class ProxyFeatures(nn.Module):
    """Frozen EfficientNet-Lite0 features at strides 8/16/32, concatenated on a 16-px grid."""

    def __init__(self, load_pretrained: bool = True):
        super().__init__()
        import timm

        from carbseg.models.backbones import load_efficientnet_lite0_imagenet

        self.body = timm.create_model(BACKBONE, features_only=True, out_indices=FEATURE_LEVELS, pretrained=False)
        if load_pretrained:
            load_efficientnet_lite0_imagenet(self.body)
        self.body.eval().requires_grad_(False)
        self.out_channels = int(sum(self.body.feature_info.channels()))

    def train(self, mode: bool = True) -> ProxyFeatures:  # frozen: BN statistics never change
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Float RGB (B, 3, H, W) in 0..255 -> (B, D, ceil(H/16), ceil(W/16)) features."""
        # no_grad as a block rather than a decorator here and below: mutation testing (docs/testing.md)
        # skips decorated functions, and these are the instrument's core.
        with torch.no_grad():
            mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
            x = (images.float() - mean) / std
            grid = (-(-images.shape[-2] // GRID_STRIDE), -(-images.shape[-1] // GRID_STRIDE))
            levels = []
            for feats in self.body(x):
                if feats.shape[-2] >= grid[0] and feats.shape[-1] >= grid[1]:
                    levels.append(F.adaptive_avg_pool2d(feats, grid))  # finer level: average within a cell
                else:
                    levels.append(F.interpolate(feats, size=grid, mode="bilinear", align_corners=False))
            return torch.cat(levels, dim=1).float()


@dataclass
class ProxyClassifier:
    """Standardisation and a linear map from the concatenated features to class scores."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, C, h, w) class scores."""
        z = (features - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return torch.einsum("bdhw,cd->bchw", z, self.weight) + self.bias.view(1, -1, 1, 1)


@dataclass
class ProxyWeights:
    """A fitted proxy teacher as stored on disk: the classifier and what it was fitted on."""

    classifier: ProxyClassifier
    class_names: list[str]
    dataset: str
    split: str
    fit_ids: list[str]
    seed: int
    fit_pixel_accuracy: float | None = None
    fit_scales: tuple[float, ...] = FIT_SCALES  # the zooms the fit images were seen at (each also mirrored)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from carbseg.io import atomic_path

        tensors = {name: getattr(self.classifier, name).contiguous().float()
                   for name in ("weight", "bias", "mean", "std")}
        metadata = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "note": "research instrument: a linear classifier fitted on the ground truth of fit_ids",
            "backbone": BACKBONE, "feature_levels": "8,16,32", "grid_stride": str(GRID_STRIDE),
            "classes": json.dumps(self.class_names), "dataset": self.dataset, "split": self.split,
            "fit_ids": json.dumps(self.fit_ids), "fit_scales": ",".join(str(s) for s in self.fit_scales),
            "num_fit_images": str(len(self.fit_ids)), "seed": str(self.seed),
            "fit_pixel_accuracy": "" if self.fit_pixel_accuracy is None else f"{self.fit_pixel_accuracy:.4f}",
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> ProxyWeights:
        from safetensors import safe_open

        path = Path(path)
        fix = "fit one with carbseg fit-proxy-teacher and set teacher.proxy_weights (or --proxy-weights) to it"
        if not path.is_file():
            raise UserError(f"{path}: proxy teacher weights not found; {fix}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open has no __iter__
        except Exception as err:  # noqa: BLE001 -- any decoding failure is the file's fault
            raise UserError(f"{path}: not a readable safetensors file ({type(err).__name__}); {fix}") from None
        if metadata.get("format") != FORMAT or not {"weight", "bias", "mean", "std"} <= set(tensors):
            raise UserError(f"{path}: not a proxy teacher weight file; {fix}")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}: proxy teacher format version {metadata.get('format_version')!r} is not "
                            f"{FORMAT_VERSION}; refit it with this version of carbseg")
        accuracy = metadata.get("fit_pixel_accuracy") or None
        scales = metadata.get("fit_scales") or ",".join(str(s) for s in FIT_SCALES)
        return cls(
            classifier=ProxyClassifier(tensors["weight"], tensors["bias"], tensors["mean"], tensors["std"]),
            class_names=json.loads(metadata["classes"]), dataset=metadata.get("dataset", ""),
            split=metadata.get("split", ""), fit_ids=json.loads(metadata.get("fit_ids", "[]")),
            seed=int(metadata.get("seed", 0)), fit_pixel_accuracy=None if accuracy is None else float(accuracy),
            fit_scales=tuple(float(s) for s in scales.split(",")),
        )


def read_fit_ids(path: str | Path) -> list[str]:
    """The ids of the images a proxy teacher was fitted on (to exclude them from training/evaluation)."""
    return ProxyWeights.load(path).fit_ids


class ProxyTeacher:
    """Implements ``carbseg.teacher.base.Teacher`` from the pixels (a research instrument)."""

    reads_ground_truth = False

    def __init__(self, features: ProxyFeatures, weights: ProxyWeights, classes: ClassSet,
                 scales: Sequence[float] = (1.0,), confidence_threshold: float | None = None,
                 flip_average: bool = True):
        if list(weights.class_names) != list(classes.names):
            raise UserError(f"proxy teacher weights were fitted for the classes {weights.class_names[:4]}..., "
                            f"not this dataset's {classes.names[:4]}...; fit one for this dataset")
        if weights.classifier.weight.shape[1] != features.out_channels:
            raise UserError("proxy teacher weights do not fit the feature extractor (width "
                            f"{weights.classifier.weight.shape[1]} vs {features.out_channels}); refit them")
        self.features = features
        self.weights = weights
        self.classifier = weights.classifier
        self.fit_ids = list(weights.fit_ids)
        self.num_classes = classes.num_classes
        self.scales = tuple(float(s) for s in scales)
        self.confidence_threshold = confidence_threshold
        # A CNN's stride-2 sampling and zero padding are not mirror-symmetric, so on its own it labels a
        # flipped view differently; averaging the scores of the view and its mirror image makes the
        # labels a function of the pixels under flips too (the augmentation flips every other view).
        self.flip_average = flip_average
        log.warning("proxy teacher: a frozen ImageNet network with a classifier fitted on the ground truth of "
                    "%d %s/%s images; a research instrument, not weak supervision",
                    len(self.fit_ids), weights.dataset, weights.split)

    def to(self, device) -> ProxyTeacher:
        self.features.to(device)
        c = self.classifier
        self.classifier = ProxyClassifier(c.weight.to(device), c.bias.to(device), c.mean.to(device), c.std.to(device))
        return self

    def _scores_at_own_size(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scores of the (B, 3, h, w) images ``x``: their coarse grid covers ceil(size / 16)
        cells from the top-left corner; it is brought to the covered size and cropped to ``x``'s."""
        s = self.classifier.scores(self.features(x))
        return F.interpolate(s, size=(-(-x.shape[-2] // GRID_STRIDE) * GRID_STRIDE,
                                      -(-x.shape[-1] // GRID_STRIDE) * GRID_STRIDE),
                             mode="bilinear", align_corners=False)[..., : x.shape[-2], : x.shape[-1]]

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) class scores averaged over the scales (before any label restriction)."""
        with torch.no_grad():
            h, w = images.shape[-2:]
            total = None
            for scale in self.scales:
                x = images.float()
                if scale != 1.0:
                    x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
                s = self._scores_at_own_size(x)
                if self.flip_average:  # mirrored back in pixels: the mirror's grid starts at the other edge
                    s = 0.5 * (s + self._scores_at_own_size(x.flip(-1)).flip(-1))
                if s.shape[-2:] != (h, w):
                    s = F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)
                total = s if total is None else total + s
            return total / len(self.scales)

    def __call__(self, images: torch.Tensor, image_labels: torch.Tensor, gt: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None, frames=None) -> torch.Tensor:
        with torch.no_grad():
            scores = self.scores(images)
            labels = image_labels.to(scores.device).bool()
            return masks_from_scores(scores, labels, tuple(images.shape[-2:]), self.confidence_threshold,
                                     None if valid is None else valid.to(scores.device))


def load_proxy_teacher(path: str | Path, classes: ClassSet, device="cpu", scales: Sequence[float] = (1.0,),
                       confidence_threshold: float | None = None) -> ProxyTeacher:
    weights = ProxyWeights.load(path)
    return ProxyTeacher(ProxyFeatures(), weights, classes, scales, confidence_threshold).to(device)


# ---------------------------------------------------------------- fitting
def choose_fit_ids(ids: Sequence[str], num_images: int, seed: int) -> list[str]:
    """``num_images`` ids of the split drawn by a seeded permutation of the sorted ids."""
    ordered = sorted(ids)
    if not 1 <= num_images <= len(ordered):
        raise UserError(f"--num-images {num_images}: the split has {len(ordered)} images; choose 1 to {len(ordered)}")
    order = np.random.default_rng(seed).permutation(len(ordered))[:num_images]
    return sorted(ordered[i] for i in order)


def cell_targets(gt: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """(H, W) train ids -> (gh, gw) class distribution per 16-px cell: (gh, gw, C) float, rows sum to 1
    (all-zero rows where a cell has no labelled pixel)."""
    h, w = gt.shape
    pad_h, pad_w = grid[0] * GRID_STRIDE - h, grid[1] * GRID_STRIDE - w
    padded = F.pad(gt.long(), (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    onehot = F.one_hot(padded.clamp(max=num_classes), num_classes + 1)[..., :num_classes].float()
    counts = onehot.view(grid[0], GRID_STRIDE, grid[1], GRID_STRIDE, num_classes).sum(dim=(1, 3))
    return counts / counts.sum(-1, keepdim=True).clamp(min=1)


def fit_classifier(features: torch.Tensor, targets: torch.Tensor, weight_decay: float = 1e-3,
                   max_iter: int = 100) -> ProxyClassifier:
    """A class-weighted softmax regression on (N, D) features and (N, C) soft cell targets.

    Class weights are inverse class frequencies (normalised to mean 1 over the classes present), so
    that the few cells of poles and signs are not drowned by road and sky -- like CLIP, the proxy
    then still finds small classes poorly, but not never. Full-batch L-BFGS (100 iterations, about a
    minute on 2 cores for 12 CamVid images): deterministic for a given torch build and thread count.
    """
    mean = features.mean(0)
    std = features.std(0).clamp(min=1e-6)
    z = (features - mean) / std
    freq = targets.sum(0)
    present = freq > 0
    class_weight = torch.zeros_like(freq)
    class_weight[present] = 1.0 / freq[present]
    class_weight = class_weight / class_weight[present].mean()
    sample_weight = (targets * class_weight).sum(1)
    num_classes = targets.shape[1]
    weight = torch.zeros(num_classes, z.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    # Soft targets, weighted per cell by its classes' weights: each class contributes equally overall.
    weighted_targets = targets * class_weight
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        logp = torch.log_softmax(z @ weight.T + bias, dim=1)
        loss = -(weighted_targets * logp).sum() / sample_weight.sum() + weight_decay * (weight ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return ProxyClassifier(weight.detach(), bias.detach(), mean, std)


def fit_proxy_teacher(dataset, dataset_name: str, split: str, num_images: int, seed: int = 0,
                      progress: bool = True, features: ProxyFeatures | None = None,
                      scales: Sequence[float] = FIT_SCALES) -> ProxyWeights:
    """Fit the proxy teacher's classifier on ``num_images`` images of ``dataset`` (their ground truth),
    each seen at every zoom of ``scales`` (and mirrored)."""
    from tqdm import tqdm

    if not dataset.has_masks:
        raise UserError(f"{dataset_name}: the {split} split has no ground-truth masks; the proxy teacher "
                        "is fitted on a few labelled images -- choose a split with masks (e.g. train)")
    fit_ids = choose_fit_ids(dataset.ids, num_images, seed)
    features = features or ProxyFeatures()
    num_classes = dataset.classes.num_classes
    position = {image_id: k for k, image_id in enumerate(dataset.ids)}
    xs, ts = [], []
    for image_id in tqdm(fit_ids, desc="proxy features", unit="img", disable=not progress):
        index = position[image_id]
        image = dataset.load_image(index)
        frame = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        gt = torch.from_numpy(dataset.load_mask(index, image.shape[:2])).long()
        for scale in scales:
            size = (round(frame.shape[-2] * scale), round(frame.shape[-1] * scale))
            view = F.interpolate(frame, size=size, mode="bilinear", align_corners=False) if scale != 1 else frame
            view_gt = F.interpolate(gt[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
            for mirrored in (False, True):
                x = view.flip(-1) if mirrored else view
                feats = features(x)[0]
                targets = cell_targets(view_gt.flip(-1) if mirrored else view_gt, tuple(feats.shape[-2:]),
                                       num_classes)
                keep = targets.sum(-1) > 0
                xs.append(feats.permute(1, 2, 0)[keep])
                ts.append(targets[keep])
    x, t = torch.cat(xs), torch.cat(ts)
    classifier = fit_classifier(x, t)
    predicted = classifier.scores(x.T[None, :, :, None])[0, :, :, 0].argmax(0)
    accuracy = float((t.argmax(1) == predicted).float().mean())
    return ProxyWeights(classifier, list(dataset.classes.names), dataset_name, split, fit_ids, seed, accuracy,
                        fit_scales=tuple(float(s) for s in scales))
