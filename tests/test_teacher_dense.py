"""MaskCLIP value path: equivalence with the model's own last block, CLS output, positional embedding."""

from __future__ import annotations

import open_clip
import pytest
import torch

from carbseg.teacher.clip_dense import DenseCLIP
from carbseg.teacher.tiny import TINY_VIT_CONFIG


def tiny_clip(patch_size: int = 16, seed: int = 0, quick_gelu: bool = False):
    torch.manual_seed(seed)
    cfg = {**TINY_VIT_CONFIG, "vision_cfg": {**TINY_VIT_CONFIG["vision_cfg"], "patch_size": patch_size}}
    return open_clip.model.CLIP(**cfg, quick_gelu=quick_gelu).eval()


class IdentityAttention(torch.nn.Module):
    """Stands in for nn.MultiheadAttention with the attention matrix forced to the identity."""

    def __init__(self, mha: torch.nn.MultiheadAttention):
        super().__init__()
        self.mha = mha

    def forward(self, q, k, v, need_weights=False, attn_mask=None):
        d = self.mha.embed_dim
        # softmax(QK^T) == I  ->  every token attends only to itself: out = out_proj(v_proj(x)).
        values = torch.nn.functional.linear(v, self.mha.in_proj_weight[2 * d:], self.mha.in_proj_bias[2 * d:])
        return self.mha.out_proj(values), None


@pytest.mark.parametrize("patch_size", [16, 32])
def test_value_path_equals_last_block_with_identity_attention(patch_size):
    model = tiny_clip(patch_size)
    dense = DenseCLIP(model.visual)
    images = torch.randn(2, 3, 224, 160)  # not the native size: exercises interpolation too
    x, grid = dense._tokens_before_last_block(images)
    block = model.visual.transformer.resblocks[-1]
    original = block.attn
    block.attn = IdentityAttention(original)
    try:
        reference = block(x)  # the model's own block code, attention forced to identity
    finally:
        block.attn = original
    ours = dense.value_path(x[:, 1:])
    torch.testing.assert_close(ours, reference[:, 1:], rtol=1e-5, atol=1e-5)
    # and written out: x + out_proj(v_proj(ln_1(x))), then + mlp(ln_2(.))
    d = block.attn.embed_dim
    h = x + block.attn.out_proj(torch.nn.functional.linear(block.ln_1(x), block.attn.in_proj_weight[2 * d:],
                                                           block.attn.in_proj_bias[2 * d:]))
    by_hand = h + block.mlp(block.ln_2(h))
    torch.testing.assert_close(ours, by_hand[:, 1:], rtol=1e-5, atol=1e-5)
    feats = dense.dense_features(images)
    assert feats.shape == (2, 32, 224 // patch_size, 160 // patch_size)
    torch.testing.assert_close(feats.flatten(2).transpose(1, 2), model.visual.ln_post(by_hand[:, 1:]) @ model.visual.proj,
                               rtol=1e-5, atol=1e-5)


def test_cls_output_at_224_equals_open_clip_encode_image():
    model = tiny_clip(quick_gelu=True)
    dense = DenseCLIP(model.visual)
    images = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dense.encode_image(images), model.encode_image(images), rtol=0, atol=0)


@pytest.mark.parametrize("patch_size", [16, 32])
def test_patch_embedding_as_one_matrix_product_equals_conv1(patch_size):
    model = tiny_clip(patch_size)
    model.visual.conv1.weight.data.normal_()  # not the init: every weight counts
    dense = DenseCLIP(model.visual)
    assert dense._conv1_is_patchwise
    crop = torch.randn(2, 3, 7 * patch_size, 5 * patch_size)
    with torch.no_grad():
        expected = model.visual.conv1(crop).flatten(2).transpose(1, 2)
        ours = dense.patch_embedding(crop)
    assert ours.shape == (2, 35, 64)
    # sums of 3 * p * p products of unit-scale terms (values up to ~100): equal to float rounding
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_fast_trunk_equals_open_clips_modules_and_restores_the_fast_path_switch():
    model = tiny_clip(quick_gelu=True)
    dense = DenseCLIP(model.visual)
    images = torch.randn(2, 3, 224, 160)  # interpolated positions
    before = torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        fast, grid = dense._tokens_before_last_block(images)
        reference, reference_grid = dense._tokens_before_last_block(images, reference=True)
    assert grid == reference_grid == (14, 10)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled() == before
    # an error inside the blocks still restores the process-wide switch
    block = model.visual.transformer.resblocks[0]
    original = block.forward
    block.forward = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            dense._tokens_before_last_block(images)
    finally:
        block.forward = original
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_a_convolution_that_is_not_patchwise_is_run_as_a_convolution():
    model = tiny_clip()
    conv = model.visual.conv1
    model.visual.conv1 = torch.nn.Conv2d(3, conv.out_channels, 16, stride=16, padding=1, bias=False)
    dense = DenseCLIP(model.visual)
    assert not dense._conv1_is_patchwise
    crop = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(dense.patch_embedding(crop),
                                   model.visual.conv1(crop).flatten(2).transpose(1, 2), rtol=0, atol=0)


def test_positional_embedding_identity_at_native_grid_and_cached_per_grid():
    model = tiny_clip()
    dense = DenseCLIP(model.visual)
    native = dense.positional_embedding((14, 14), torch.float32, "cpu")
    assert torch.equal(native, model.visual.positional_embedding)
    wide = dense.positional_embedding((8, 20), torch.float32, "cpu")
    assert wide.shape == (1 + 8 * 20, 64)
    assert torch.equal(wide[0], model.visual.positional_embedding[0])  # CLS position untouched
    assert dense.positional_embedding((8, 20), torch.float32, "cpu") is wide  # cached
    # Interpolating to the native grid size with bicubic is the identity as well.
    patch = model.visual.positional_embedding[1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    same = torch.nn.functional.interpolate(patch, size=(14, 14), mode="bicubic", align_corners=False)
    torch.testing.assert_close(same, patch)


def test_no_query_key_attention_is_computed_for_dense_features(monkeypatch):
    model = tiny_clip()
    dense = DenseCLIP(model.visual)
    calls = []
    for i, block in enumerate(model.visual.transformer.resblocks):
        block.attn.register_forward_hook(lambda *_, i=i: calls.append(i))
    dense.dense_features(torch.randn(1, 3, 64, 96))
    assert calls == [0]  # the first block's attention ran, the last block's never did
