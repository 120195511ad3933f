"""Global-Local View: patch sampling, cut-out, zoom and the way back."""

from __future__ import annotations

import pytest
import torch

from carbseg.data.views import (
    LocalPatch,
    cut_out,
    labels_to_patch_size,
    sample_local_patch,
    zoom_images,
    zoom_labels,
)


def index_image(b: int, c: int, h: int, w: int) -> torch.Tensor:
    """Every element holds its own flat index: any slice is recognisable."""
    return torch.arange(b * c * h * w, dtype=torch.float32).view(b, c, h, w)


def test_cut_out_equals_the_slice():
    patch = LocalPatch(top=2, left=3, height=4, width=5, scale=1.7)
    logits = index_image(2, 3, 10, 12)
    assert torch.equal(cut_out(logits, patch), logits[:, :, 2:6, 3:8])
    labels = torch.arange(2 * 10 * 12).view(2, 10, 12)
    assert torch.equal(cut_out(labels, patch), labels[:, 2:6, 3:8])


def test_zoom_by_one_is_identity():
    patch = LocalPatch(top=1, left=2, height=6, width=4, scale=1.0)
    images = torch.rand(2, 3, 9, 9) * 255
    assert patch.zoomed_hw == (6, 4)
    assert torch.allclose(zoom_images(images, patch), images[:, :, 1:7, 2:6])
    labels = torch.randint(0, 5, (2, 9, 9), dtype=torch.uint8)
    assert torch.equal(zoom_labels(labels, patch), labels[:, 1:7, 2:6])
    assert torch.equal(labels_to_patch_size(labels[:, 1:7, 2:6], patch), labels[:, 1:7, 2:6])


@pytest.mark.parametrize("scale", [2.0, 3.0])
def test_zoom_then_back_by_nearest_recovers_the_labels(scale):
    patch = LocalPatch(top=3, left=1, height=5, width=7, scale=scale)
    labels = torch.randint(0, 19, (2, 10, 10))
    labels[0, 4, 4] = 255
    zoomed = zoom_labels(labels, patch)
    k = int(scale)
    assert zoomed.shape == (2, 5 * k, 7 * k) and zoomed.dtype == labels.dtype
    # every source pixel becomes a k x k block of its own label
    expected = cut_out(labels, patch).repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)
    assert torch.equal(zoomed, expected)
    assert torch.equal(labels_to_patch_size(zoomed, patch), cut_out(labels, patch))


def test_zoom_labels_keeps_bool_valid_maps_and_invents_no_labels():
    patch = LocalPatch(top=0, left=0, height=7, width=9, scale=1.37)
    valid = torch.zeros(1, 8, 10, dtype=torch.bool)
    valid[:, :4] = True
    zoomed = zoom_labels(valid, patch)
    assert zoomed.dtype == torch.bool and zoomed.shape == (1, 10, 12)  # round(7*1.37), round(9*1.37)
    labels = torch.tensor([[0, 3, 255]]).repeat(8, 4)[None, :, :10]
    assert set(zoom_labels(labels, patch).unique().tolist()) <= {0, 3, 255}


def test_label_resizing_samples_pixel_centres_at_fractional_zooms():
    # Zoom 1.5 of a 2-wide row: output centres 0.5, 1.5, 2.5 map to source 0.33, 1.0, 1.67 -> pixels 0, 1, 1
    # (plain "nearest" floors the left edge instead: 0, 0, 1).
    patch = LocalPatch(top=0, left=0, height=1, width=2, scale=1.5)
    assert patch.zoomed_hw == (2, 3)
    labels = torch.tensor([[[4, 7]]])
    assert zoom_labels(labels, patch).tolist() == [[[4, 7, 7], [4, 7, 7]]]
    # Back from 3 to 2: centres 0.75 and 2.25 -> pixels 0 and 2 (plain "nearest": 0 and 1).
    assert labels_to_patch_size(torch.tensor([[[1, 2, 3], [1, 2, 3]]]), patch).tolist() == [[[1, 3]]]


def test_zoom_images_is_bilinear_without_corner_alignment():
    patch = LocalPatch(top=0, left=0, height=1, width=2, scale=2.0)
    images = torch.tensor([0.0, 100.0]).view(1, 1, 1, 2).repeat(1, 3, 1, 1)
    zoomed = zoom_images(images, patch)
    # align_corners=False: output pixel centres at 0.25 and 0.75 of the input pixels -> 0, 25, 75, 100
    assert zoomed.shape == (1, 3, 2, 4)
    assert zoomed[0, 0, 0].tolist() == pytest.approx([0.0, 25.0, 75.0, 100.0])


def test_sample_local_patch_ranges_and_clamping():
    generator = torch.Generator().manual_seed(0)
    patches = [sample_local_patch((64, 128), (32, 16), 0.5, 2.0, generator) for _ in range(500)]
    scales = torch.tensor([p.scale for p in patches])
    assert scales.min() >= 0.5 and scales.max() < 2.5
    assert scales.min() < 0.6 and scales.max() > 2.4  # the whole range is used
    assert all((p.height, p.width) == (32, 16) for p in patches)
    assert all(0 <= p.top <= 32 and 0 <= p.left <= 112 for p in patches)
    assert {p.top for p in patches} >= {0, 32}  # both extreme positions are reachable
    # A patch larger than the view is clamped to the view.
    clamped = sample_local_patch((20, 10), (512, 256), 1.0, 1.0, generator)
    assert (clamped.top, clamped.left, clamped.height, clamped.width) == (0, 0, 20, 10)
    assert 1.0 <= clamped.scale < 2.0


def test_sample_local_patch_is_reproducible_from_the_generator():
    first = sample_local_patch((64, 64), (16, 16), 1.0, 1.0, torch.Generator().manual_seed(42))
    again = sample_local_patch((64, 64), (16, 16), 1.0, 1.0, torch.Generator().manual_seed(42))
    assert first == again
