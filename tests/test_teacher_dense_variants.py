"""SCLIP, ClearCLIP and NACLIP last blocks against an independent, written-out computation of their equations.

The reference below works head by head with explicit softmaxes and builds NACLIP's neighbourhood with
Python loops over grid positions; the implementation uses fused attention and a vectorised Omega.
"""

from __future__ import annotations

import copy
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from carbseg.config import TeacherConfig, load_config
from carbseg.errors import UserError
from carbseg.teacher.clip_dense import DENSE_VARIANTS, DenseCLIP
from carbseg.teacher.tiny import TINY_VIT_CONFIG
from test_cli_pseudo_masks import NAMES, _args, folder_data  # noqa: F401 -- the fixture

VARIANTS = ("sclip", "clearclip", "naclip")


def tiny_clip(patch_size: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    cfg = {**TINY_VIT_CONFIG, "vision_cfg": {**TINY_VIT_CONFIG["vision_cfg"], "patch_size": patch_size}}
    return open_clip.model.CLIP(**cfg).eval()


def reference_omega(gh: int, gw: int, sigma: float) -> torch.Tensor:
    """NACLIP's Omega by its definition: exp(-squared grid distance / (2 sigma^2)); 0 for the CLS token."""
    n = gh * gw
    omega = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for p in range(n):
        for r in range(n):
            dist2 = (p // gw - r // gw) ** 2 + (p % gw - r % gw) ** 2
            omega[1 + p, 1 + r] = math.exp(-dist2 / (2 * sigma ** 2))
    return omega


def reference_last_block(block, x: torch.Tensor, variant: str, grid: tuple[int, int], sigma: float = 5.0):
    """The variant's last block written out from the papers' equations (all tokens, CLS first)."""
    attn = block.attn
    d, heads = attn.embed_dim, attn.num_heads
    hd = d // heads
    h = block.ln_1(x)
    q = h @ attn.in_proj_weight[:d].T + attn.in_proj_bias[:d]
    k = h @ attn.in_proj_weight[d: 2 * d].T + attn.in_proj_bias[d: 2 * d]
    v = h @ attn.in_proj_weight[2 * d:].T + attn.in_proj_bias[2 * d:]
    omega = reference_omega(*grid, sigma).to(x.dtype)
    outs = []
    for i in range(heads):
        cols = slice(i * hd, (i + 1) * hd)
        qi, ki, vi = q[..., cols], k[..., cols], v[..., cols]
        if variant == "sclip":
            a = torch.softmax(qi @ qi.transpose(1, 2) / math.sqrt(hd), -1) + \
                torch.softmax(ki @ ki.transpose(1, 2) / math.sqrt(hd), -1)
        elif variant == "clearclip":
            a = torch.softmax(qi @ qi.transpose(1, 2) / math.sqrt(hd), -1)
        else:
            a = torch.softmax(ki @ ki.transpose(1, 2) / math.sqrt(hd) + omega, -1)
        outs.append(a @ vi)
    out = torch.cat(outs, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias
    if variant == "sclip":  # residual and feed-forward kept
        x = x + out
        return x + block.mlp(block.ln_2(x))
    return out  # ClearCLIP and NACLIP: residual and feed-forward removed


@pytest.mark.parametrize("patch_size", [16, 32])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_features_equal_the_written_out_equations(variant, patch_size):
    model = tiny_clip(patch_size)
    dense = DenseCLIP(model.visual, variant=variant)
    images = torch.randn(2, 3, 224, 160)  # not the native grid: interpolated positions, a 2-D neighbourhood
    with torch.no_grad():
        x, grid = dense._tokens_before_last_block(images)
        ref = reference_last_block(model.visual.transformer.resblocks[-1], x, variant, grid)
        expected = model.visual.ln_post(ref[:, 1:]) @ model.visual.proj
        feats = dense.dense_features(images)
    assert feats.shape == (2, 32, 224 // patch_size, 160 // patch_size)
    torch.testing.assert_close(feats.flatten(2).transpose(1, 2), expected, rtol=1e-5, atol=1e-5)
    # The variants really differ from MaskCLIP's value path (and from each other) on random weights.
    with torch.no_grad():
        maskclip = DenseCLIP(model.visual).dense_features(images)
    assert (feats - maskclip).abs().max() > 1e-2


def test_naclip_neighbourhood_hand_computed_on_a_2x3_grid():
    dense = DenseCLIP(tiny_clip().visual, variant="naclip", naclip_sigma=5.0)
    omega = dense.neighbourhood((2, 3), torch.float64, "cpu")
    assert omega.shape == (7, 7)
    assert omega[0].abs().sum() == 0 and omega[:, 0].abs().sum() == 0  # CLS: no grid position
    # Patch (0, 0) to (0,0) (0,1) (0,2) (1,0) (1,1) (1,2): squared distances 0 1 4 1 2 5, 2 sigma^2 = 50.
    expected = torch.tensor([1.0, math.exp(-1 / 50), math.exp(-4 / 50), math.exp(-1 / 50), math.exp(-2 / 50),
                             math.exp(-5 / 50)], dtype=torch.float64)
    torch.testing.assert_close(omega[1, 1:], expected)
    torch.testing.assert_close(omega, omega.T)
    torch.testing.assert_close(DenseCLIP(tiny_clip().visual, variant="naclip", naclip_sigma=2.0)
                               .neighbourhood((5, 7), torch.float64, "cpu"), reference_omega(5, 7, 2.0))
    assert dense.neighbourhood((2, 3), torch.float64, "cpu") is omega  # cached per grid


def test_naclip_with_zero_keys_is_pure_neighbourhood_attention():
    """Special case (NACLIP's "neighbourhood only" ablation): W_k = 0, b_k = 0 -> attention = softmax(Omega)."""
    model = tiny_clip()
    attn = model.visual.transformer.resblocks[-1].attn
    d = attn.embed_dim
    with torch.no_grad():
        attn.in_proj_weight[d: 2 * d] = 0
        attn.in_proj_bias[d: 2 * d] = 0
    dense = DenseCLIP(model.visual, variant="naclip", naclip_sigma=1.5)
    x = torch.randn(1, 1 + 12, 64)
    with torch.no_grad():
        out = dense.attention_block(x, (3, 4))
        v = F.linear(model.visual.transformer.resblocks[-1].ln_1(x), attn.in_proj_weight[2 * d:],
                     attn.in_proj_bias[2 * d:])
        expected = attn.out_proj(torch.softmax(reference_omega(3, 4, 1.5).float(), -1) @ v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The CLS token has no neighbourhood: it attends uniformly to all 13 tokens.
    torch.testing.assert_close(out[:, 0], attn.out_proj(v.mean(dim=1)), rtol=1e-5, atol=1e-5)


def test_constant_values_show_sclip_sums_two_attention_maps_unnormalised():
    """Special case W_v = 0: every row-stochastic attention returns b_v. ClearCLIP and NACLIP then give
    out_proj(b_v) at every token; SCLIP's two maps are summed (rows sum to 2), so x + out_proj(2 b_v) + FFN."""
    model = tiny_clip()
    block = model.visual.transformer.resblocks[-1]
    d = block.attn.embed_dim
    with torch.no_grad():
        block.attn.in_proj_weight[2 * d:] = 0
        b_v = block.attn.in_proj_bias[2 * d:].clone()
        x = torch.randn(2, 1 + 20, 64)
        for variant in ("clearclip", "naclip"):
            out = DenseCLIP(model.visual, variant=variant).attention_block(x, (4, 5))
            torch.testing.assert_close(out, block.attn.out_proj(b_v).expand_as(out), rtol=1e-5, atol=1e-5)
        out = DenseCLIP(model.visual, variant="sclip").attention_block(x, (4, 5))
        h = x + block.attn.out_proj(2 * b_v)
        torch.testing.assert_close(out, h + block.mlp(block.ln_2(h)), rtol=1e-5, atol=1e-5)


def test_sclip_with_tied_query_and_key_projections_doubles_clearclip_attention():
    """Special case W_q = W_k: SCLIP's attention is 2 softmax(q q^T), i.e. twice ClearCLIP's, inside a residual block."""
    model = tiny_clip()
    block = model.visual.transformer.resblocks[-1]
    d = block.attn.embed_dim
    with torch.no_grad():
        block.attn.in_proj_weight[:d] = block.attn.in_proj_weight[d: 2 * d]
        block.attn.in_proj_bias[:d] = block.attn.in_proj_bias[d: 2 * d]
        x = torch.randn(1, 1 + 15, 64)
        clear = DenseCLIP(model.visual, variant="clearclip").attention_block(x, (3, 5))
        bias = block.attn.out_proj.bias
        h = x + 2 * (clear - bias) + bias  # out_proj(2 A v) = 2 W (A v) + b
        sclip = DenseCLIP(model.visual, variant="sclip").attention_block(x, (3, 5))
    torch.testing.assert_close(sclip, h + block.mlp(block.ln_2(h)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_image_is_independent_of_its_batch(variant):
    dense = DenseCLIP(tiny_clip().visual, variant=variant)
    images = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        batched = dense.dense_features(images)
        single = torch.cat([dense.dense_features(images[i: i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_key_smoothing_keys_are_those_of_the_last_block_for_every_variant():
    model = tiny_clip()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        _, keys_mask = DenseCLIP(model.visual).dense_features(images, with_keys=True)
        feats, keys = DenseCLIP(model.visual, variant="naclip").dense_features(images, with_keys=True)
    assert torch.equal(keys, keys_mask) and feats.shape == (1, 32, 4, 6)


def test_bad_variant_or_sigma_is_a_user_error(tmp_path):
    visual = tiny_clip().visual
    with pytest.raises(UserError, match="maskclip, sclip, clearclip, naclip"):
        DenseCLIP(visual, variant="segclip")
    with pytest.raises(UserError, match="naclip_sigma"):
        DenseCLIP(visual, variant="naclip", naclip_sigma=0.0)
    assert DENSE_VARIANTS[0] == "maskclip" and TeacherConfig().dense == "maskclip"  # the paper's default
    config = tmp_path / "c.yaml"
    config.write_text("teacher:\n  dense: segclip\n")
    with pytest.raises(UserError, match="teacher.dense"):
        load_config(config)


def test_bf16_autocast_stays_close_to_fp32():
    dense = DenseCLIP(tiny_clip().visual, variant="naclip")
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        fp32 = dense.dense_features(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = dense.dense_features(images).float()
    assert F.cosine_similarity(fp32, bf16, dim=1).min() > 0.98


def test_the_model_itself_is_not_modified():
    model = tiny_clip()
    before = copy.deepcopy(model.state_dict())
    for variant in DENSE_VARIANTS:
        with torch.no_grad():
            DenseCLIP(model.visual, variant=variant).dense_features(torch.randn(1, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_dense_flag_reaches_the_teacher(folder_data):  # noqa: F811 -- the imported fixture
    """`carbseg pseudo-masks --dense naclip` writes the masks of build_teacher(dense=naclip), not MaskCLIP's."""
    import numpy as np
    from PIL import Image

    from carbseg.cli import main
    from carbseg.data.classes import ClassSet
    from carbseg.teacher.build import build_teacher

    tmp, labels = folder_data
    clip = ["--clip-model", str(tmp / "tiny.json"), "--clip-pretrained", str(tmp / "tiny.bin"),
            "--cache-dir", str(tmp / "cache"), "--precision", "fp32"]
    assert main(_args(tmp, tmp / "naclip", *clip, "--dense", "naclip", "--naclip-sigma", "2")) == 0
    assert main(_args(tmp, tmp / "maskclip", *clip)) == 0
    cfg = TeacherConfig(clip_model=str(tmp / "tiny.json"), clip_pretrained=str(tmp / "tiny.bin"),
                        cache_dir=str(tmp / "cache"), dense="naclip", naclip_sigma=2.0)
    teacher = build_teacher(cfg, ClassSet("folder", tuple(NAMES), tuple(NAMES), ((0, 0, 0),) * len(NAMES)), "cpu", precision="fp32")
    assert teacher.dense.variant == "naclip" and teacher.dense.naclip_sigma == 2.0
    differs = 0
    for image_id, present in labels.items():
        image = np.array(Image.open(tmp / "data" / "images" / "val" / f"{image_id}.png").convert("RGB"))
        multi_hot = torch.zeros(1, len(NAMES), dtype=torch.bool)
        multi_hot[0, present] = True
        expected = teacher(torch.from_numpy(image).permute(2, 0, 1)[None].float(), multi_hot)[0].numpy()
        written = np.asarray(Image.open(tmp / "naclip" / f"{image_id}.png"))
        assert np.array_equal(written, expected)
        differs += int(not np.array_equal(written, np.asarray(Image.open(tmp / "maskclip" / f"{image_id}.png"))))
    assert differs > 0
