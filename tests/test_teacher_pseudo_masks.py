"""Label-restricted argmax, threshold, refinements, and the CLIP teacher end to end (tiny model)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import open_clip
import pytest
import torch

from carbseg.errors import UserError
from carbseg.teacher import refine
from carbseg.teacher.clip_dense import DenseCLIP
from carbseg.teacher.clip_teacher import CLIPTeacher
from carbseg.teacher.pseudo_masks import masks_from_scores, restrict_to_image_labels, upsample_scores
from carbseg.teacher.tiny import TINY_VIT_CONFIG


def test_minus_inf_restriction_keeps_a_negative_present_class_over_an_absent_zero():
    # Class 0 absent with score 0.0; class 1 present with score -0.2; class 2 present with -0.5.
    scores = torch.tensor([0.0, -0.2, -0.5]).view(1, 3, 1, 1)
    labels = torch.tensor([[False, True, True]])
    assert masks_from_scores(scores, labels, (1, 1)).item() == 1
    # The release's multiplication by the 0/1 label gets it wrong: 0 * 0.0 = 0 > -0.2.
    assert (scores * labels.view(1, 3, 1, 1)).argmax(dim=1).item() == 0
    restricted = restrict_to_image_labels(scores, labels)
    assert restricted[0, 0, 0, 0].item() == -math.inf and restricted[0, 1, 0, 0].item() == pytest.approx(-0.2)


def test_upsampling_threshold_valid_and_images_without_classes():
    # 1x2 grid upsampled bilinearly to 1x4 (align_corners=False): class-0 minus class-1 margin is
    # 0.1, 0.05, -0.05, -0.1 across the row.
    scores = torch.tensor([[[[0.30, 0.20]], [[0.20, 0.30]]]])
    labels = torch.tensor([[True, True]])
    assert masks_from_scores(scores, labels, (1, 4)).tolist() == [[[0, 0, 1, 1]]]
    # Probability of the winner with CLIP's scale 100: sigmoid(100 * margin) = 0.9999, 0.9933, ...
    # A 0.995 threshold keeps only the outer pixels.
    assert masks_from_scores(scores, labels, (1, 4), confidence_threshold=0.995).tolist() == [[[0, 255, 255, 1]]]
    valid = torch.tensor([[[True, False, True, True]]])
    assert masks_from_scores(scores, labels, (1, 4), valid=valid).tolist() == [[[0, 255, 1, 1]]]
    assert masks_from_scores(scores, torch.tensor([[False, False]]), (1, 4)).tolist() == [[[255] * 4]]


def test_upsample_scores_is_bilinear_without_corner_alignment_and_skips_its_own_size():
    # Pixel centres of the 1x4 row sit at 1/8, 3/8, 5/8, 7/8 of the 1x2 grid, whose centres are 1/4 and
    # 3/4: weights give 0, 0.25, 0.75, 1 (corner alignment would give 0, 1/3, 2/3, 1).
    scores = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    assert upsample_scores(scores, (1, 4)).flatten().tolist() == [0.0, 0.25, 0.75, 1.0]
    assert upsample_scores(scores, (1, 2)) is scores  # already at the view size: no resampling


def test_threshold_keeps_a_pixel_exactly_at_it_and_a_class_free_image_is_ignored_alone():
    # Two present classes tied: softmax probability exactly 0.5, which is not *below* a 0.5 threshold.
    tied = torch.zeros(2, 2, 1, 1)
    labels = torch.tensor([[True, True], [True, True]])
    assert masks_from_scores(tied, labels, (1, 1), confidence_threshold=0.5).flatten().tolist() == [0, 0]
    assert masks_from_scores(tied, labels, (1, 1), confidence_threshold=0.51).flatten().tolist() == [255, 255]
    # In a batch, only the image without any present class becomes all ignore.
    scores = torch.tensor([0.1, 0.3]).view(1, 2, 1, 1).repeat(2, 1, 1, 2)
    masks = masks_from_scores(scores, torch.tensor([[True, True], [False, False]]), (1, 2))
    assert masks.tolist() == [[[1, 1]], [[255, 255]]]


def test_prompt_denoising_drops_a_class_never_confident_but_keeps_one():
    # Two present classes; class 1 never wins confidently (max prob = sigmoid(100 * -0.01) < 0.5).
    scores = torch.tensor([[[[0.30, 0.31]], [[0.20, 0.30]], [[0.9, 0.9]]]])
    labels = torch.tensor([[True, True, False]])
    assert refine.prompt_denoising(scores, labels).tolist() == [[True, False, False]]
    # Both low: the most confident one survives.
    flat = torch.tensor([[[[0.3]], [[0.3]]]])
    kept = refine.prompt_denoising(flat, torch.tensor([[True, True]]), threshold=0.9)
    assert kept.tolist() == [[True, False]]


def test_key_smoothing_averages_over_similar_keys_only():
    scores = torch.tensor([[[[1.0, 0.0, 5.0]]]])  # (1, 1, 1, 3)
    keys = torch.tensor([[[[1.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]]])  # patches 0,1 alike, 2 orthogonal
    out = refine.key_smoothing(scores, keys)
    torch.testing.assert_close(out, torch.tensor([[[[0.5, 0.5, 5.0]]]]))
    # Built one query row at a time, the answer is the same.
    torch.testing.assert_close(refine.key_smoothing(scores, keys, block_elements=1), out)


def _key_smoothing_whole(scores, keys, min_affinity):
    """Reference: the whole (B, hw, hw) affinity at once, as MaskCLIP states it."""
    b, c, h, w = scores.shape
    k = torch.nn.functional.normalize(keys.double().flatten(2), dim=1)
    affinity = k.transpose(1, 2) @ k
    affinity = torch.where(affinity >= min_affinity, affinity, torch.zeros_like(affinity)).clamp_min(0.0)
    affinity = affinity / affinity.sum(dim=-1, keepdim=True).clamp_min(1e-6)
    return (scores.double().flatten(2) @ affinity.transpose(1, 2)).view(b, c, h, w)


@pytest.mark.parametrize("block_elements", [1, 2 * 35 * 3, 1 << 24])
@pytest.mark.parametrize("min_affinity", [0.5, 0.0, -1.0])
def test_key_smoothing_in_row_blocks_equals_the_whole_affinity(block_elements, min_affinity):
    # Blocks of query rows (here 1 row, 3 rows, all 35 rows; a last block shorter than the others)
    # bound the memory; each row is normalised on its own, so the result must not change.
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 4, 5, 7, generator=gen)
    keys = torch.randn(2, 6, 5, 7, generator=gen)
    out = refine.key_smoothing(scores, keys, min_affinity=min_affinity, block_elements=block_elements)
    torch.testing.assert_close(out.double(), _key_smoothing_whole(scores, keys, min_affinity), atol=1e-5, rtol=1e-5)


def test_crf_without_the_extra_says_how_to_install(monkeypatch):
    real_import = __import__

    def no_crf(name, *args, **kwargs):
        if name.startswith(("pydensecrf", "pydensecrf2")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", no_crf)
    with pytest.raises(UserError, match=r"pip install -e '\.\[crf\]' in the carbseg checkout"):
        refine.dense_crf(torch.zeros(2, 2, 3).numpy(), torch.tensor([[0, 1], [1, 0]]).numpy(), 2)


def _tiny_teacher(**kwargs):
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_VIT_CONFIG).eval()
    text = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    return CLIPTeacher(DenseCLIP(model.visual), text, **kwargs), model, text


def test_clip_teacher_equals_the_reference_computation_and_respects_labels():
    teacher, model, text = _tiny_teacher(precision="fp32")
    images = torch.rand(2, 3, 40, 72) * 255
    labels = torch.tensor([[True, False, True, False], [False, True, False, False]])
    masks = teacher(images, labels)
    assert masks.shape == (2, 40, 72) and masks.dtype == torch.long
    assert set(masks[0].unique().tolist()) <= {0, 2} and masks[1].unique().tolist() == [1]
    # Reference: normalise, pad to 48x80, value-path features, cosine, upsample, crop, -inf, argmax.
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = torch.nn.functional.pad((images / 255 - mean) / std, (0, 8, 0, 8))
    with torch.no_grad():
        feats = DenseCLIP(model.visual).dense_features(x)
    cos = torch.einsum("bdhw,cd->bchw", torch.nn.functional.normalize(feats, dim=1), text)
    up = torch.nn.functional.interpolate(cos, size=(48, 80), mode="bilinear", align_corners=False)[..., :40, :72]
    expected = up.masked_fill(~labels[:, :, None, None], -math.inf).argmax(1)
    assert torch.equal(masks, expected)


def test_bf16_and_multiscale_stay_close_to_fp32():
    images = torch.rand(1, 3, 64, 96) * 255
    labels = torch.ones(1, 4, dtype=torch.bool)
    fp32 = _tiny_teacher(precision="fp32")[0](images, labels)
    bf16 = _tiny_teacher(precision="bf16")[0](images, labels)
    assert (fp32 == bf16).float().mean() > 0.9
    multi = _tiny_teacher(precision="fp32", scales=(1.0, 1.5))[0]
    single = _tiny_teacher(precision="fp32")[0]
    avg = (single.scores(images) + _tiny_teacher(precision="fp32", scales=(1.5,))[0].scores(images)) / 2
    torch.testing.assert_close(multi.scores(images), avg)


def test_dense_crf_snaps_a_mislabelled_block_to_the_image_edges():
    pytest.importorskip("pydensecrf2.densecrf" if importlib.util.find_spec("pydensecrf2") else "pydensecrf.densecrf")
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, 20:] = 255  # a sharp vertical edge at x = 20
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 20:] = 2
    noisy = mask.copy()
    noisy[10:30, 14:20] = 2  # a label that bleeds 6 px over the edge
    refined = refine.dense_crf(image, noisy, 3)
    assert set(np.unique(refined).tolist()) <= {0, 2}
    assert (refined == mask).mean() > (noisy == mask).mean()
