"""CLIPTeacher against a reference written out step by step: scales, padding, key smoothing, prompt
denoising, confidence threshold, valid pixels and precision (a tiny random-weight CLIP ViT)."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from carbseg.precision import PrecisionChoice
from carbseg.teacher import refine
from carbseg.teacher.clip_dense import DenseCLIP
from carbseg.teacher.clip_teacher import CLIPTeacher
from carbseg.teacher.pseudo_masks import masks_from_scores
from carbseg.teacher.tiny import TINY_VIT_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_VIT_CONFIG).eval()
    text = torch.randn(4, 32)  # not normalised: the teacher normalises it
    return model, text


def teacher_of(clip, **kwargs) -> CLIPTeacher:
    model, text = clip
    return CLIPTeacher(DenseCLIP(model.visual), text, **kwargs)


def reference_scores(clip, images, scale=1.0, keys=False):
    """Normalise, resize by the scale, pad to whole 16-pixel patches, cosine with the text, (key
    smoothing,) upsample to the padded size, crop, resize back to the view."""
    model, text = clip
    h, w = images.shape[-2:]
    x = (images / 255 - MEAN) / STD
    if scale != 1.0:
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    sh, sw = x.shape[-2:]
    x = F.pad(x, (0, -sw % 16, 0, -sh % 16))
    with torch.no_grad():
        out = DenseCLIP(model.visual).dense_features(x, with_keys=keys)
    feats, k = out if keys else (out, None)
    cos = torch.einsum("bdhw,cd->bchw", F.normalize(feats, dim=1), F.normalize(text, dim=-1))
    if keys:
        cos = refine.key_smoothing(cos, k)
    up = F.interpolate(cos, size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :sh, :sw]
    return F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False) if (sh, sw) != (h, w) else up


# Blocks of 12 x 14 pixels of one colour: neighbouring patches have similar keys, so key smoothing
# changes the scores (on noise every patch's keys differ and the smoothing keeps each patch as it is).
# 36 x 84 is not a whole number of 16-pixel patches: 12 rows and 12 columns of padding.
IMAGES = (torch.rand(2, 3, 3, 6, generator=torch.Generator().manual_seed(1)) * 255).repeat_interleave(
    12, 2).repeat_interleave(14, 3)
H, W = 36, 84


def test_scores_average_the_scales_each_brought_back_to_the_view(clip):
    teacher = teacher_of(clip, precision="fp32", scales=(2.0, 0.75))
    assert teacher.scales == (2.0, 0.75) and teacher.num_classes == 4
    expected = (reference_scores(clip, IMAGES, 2.0) + reference_scores(clip, IMAGES, 0.75)) / 2
    scores = teacher.scores(IMAGES)
    assert scores.shape == (2, 4, H, W)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    single = teacher_of(clip, precision="fp32", scales=[1.0]).scores(IMAGES)
    torch.testing.assert_close(single, reference_scores(clip, IMAGES), atol=1e-5, rtol=1e-5)


def test_defaults(clip):
    teacher = teacher_of(clip)
    assert (teacher.scales, teacher.use_key_smoothing, teacher.use_prompt_denoising, teacher.confidence_threshold,
            teacher.precision) == ((1.0,), False, False, None, "auto")


def test_key_smoothing_smooths_the_scores_with_the_last_blocks_keys(clip):
    teacher = teacher_of(clip, precision="fp32", use_key_smoothing=True)
    expected = reference_scores(clip, IMAGES, keys=True)
    torch.testing.assert_close(teacher.scores(IMAGES), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, reference_scores(clip, IMAGES), atol=1e-3)


def test_masks_with_prompt_denoising_threshold_and_valid_pixels(clip):
    # Class 3's prompt embeds like class 0's: where one of the two wins, each holds about half of the
    # probability (at most 0.495 here), below prompt denoising's 0.5, so image 1, labelled with both,
    # loses both; image 0, labelled with class 0 alone, keeps it (its peak probability is 1.0).
    model, text = clip
    twins = (model, torch.cat([text[:3], F.normalize(text[:1], dim=-1)]))
    labels = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.uint8)  # 0/1, as read from a file
    valid = torch.ones(2, H, W, dtype=torch.bool)
    valid[:, :, 70:] = False
    scores = reference_scores(twins, IMAGES)
    plain = teacher_of(twins, precision="fp32")(IMAGES, labels, valid=valid)
    assert torch.equal(plain, masks_from_scores(scores, labels.bool(), (H, W), None, valid))
    assert plain[:, :, 70:].eq(255).all() and plain[:, :, :70].ne(255).all()
    teacher = teacher_of(twins, precision="fp32", use_prompt_denoising=True, confidence_threshold=0.9)
    denoised = refine.prompt_denoising(scores, labels.bool())
    assert denoised.tolist() == [[True, True, True, False], [False, True, True, False]]
    expected = masks_from_scores(scores, denoised, (H, W), 0.9, valid)
    masks = teacher(IMAGES, labels, valid=valid)
    assert torch.equal(masks, expected)
    assert masks[:, :, :70].eq(255).any() and masks[:, :, :70].ne(255).any()  # the threshold bites
    assert torch.equal(teacher(IMAGES, labels), masks_from_scores(scores, denoised, (H, W), 0.9))


def test_precision_is_checked_resolved_once_and_used(clip):
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'bf16', 'fp16', 'fp32'\)"):
        teacher_of(clip, precision="fp8")
    teacher = teacher_of(clip, precision="bf16")
    choice = teacher.resolved_precision("cpu")
    assert choice == PrecisionChoice("bf16", "asked for")
    assert teacher.resolved_precision(torch.device("cpu")) is choice
    fp32 = teacher_of(clip, precision="fp32")
    low = teacher.scores(IMAGES)
    # bf16 autocast around the transformer only: the scores stay fp32, close to but not fp32's.
    assert low.dtype == torch.float32
    assert not torch.equal(low, fp32.scores(IMAGES))
    torch.testing.assert_close(low, fp32.scores(IMAGES), atol=0.05, rtol=0.0)
    assert not torch.equal(teacher_of(clip, precision="fp16").scores(IMAGES), low)  # fp16 is not bf16
    # A caller's autocast does not reach the teacher.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fp32.scores(IMAGES)
        masks_inside = fp32(IMAGES, torch.ones(2, 4, dtype=torch.bool))
    assert torch.equal(inside, fp32.scores(IMAGES))
    assert torch.equal(masks_inside, fp32(IMAGES, torch.ones(2, 4, dtype=torch.bool)))


def test_mean_and_std_are_made_once_per_device(clip):
    """The "meta" device stands in for a GPU: statistics cached for the CPU and reused there would show."""
    teacher = teacher_of(clip)
    meta = teacher._statistics(torch.device("meta"))
    cpu = teacher._statistics(torch.device("cpu"))
    assert [t.device.type for t in meta + cpu] == ["meta", "meta", "cpu", "cpu"]
    assert teacher._statistics(torch.device("cpu"))[0] is cpu[0]  # made once
    torch.testing.assert_close(cpu[0], MEAN * 255.0)
    torch.testing.assert_close(cpu[1], STD * 255.0)
    assert teacher._normalise(torch.zeros(1, 3, 2, 2, device="meta")).device.type == "meta"
