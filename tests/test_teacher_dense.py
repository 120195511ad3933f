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


def test_fast_trunk_equals_open_clips_modules():
    model = tiny_clip(quick_gelu=True)
    dense = DenseCLIP(model.visual)
    assert dense._standard_trunk
    images = torch.randn(2, 3, 224, 160)  # batch 2 (nn.MultiheadAttention's slow case), interpolated positions
    with torch.no_grad():
        fast, grid = dense._tokens_before_last_block(images)
        reference, reference_grid = dense._tokens_before_last_block(images, reference=True)
    assert grid == reference_grid == (14, 10)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


class _WrappedBlock(torch.nn.Module):
    """A block trunk_block does not know: it must run its own forward."""

    def __init__(self, block):
        super().__init__()
        self.inner = block
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_a_block_that_is_not_open_clips_standard_one_runs_its_own_forward():
    model = tiny_clip()
    with torch.no_grad():
        expected, _ = DenseCLIP(model.visual)._tokens_before_last_block(torch.zeros(1, 3, 64, 64), reference=True)
    wrapped = _WrappedBlock(model.visual.transformer.resblocks[0])
    model.visual.transformer.resblocks[0] = wrapped
    dense = DenseCLIP(model.visual)
    assert not dense._standard_trunk
    with torch.no_grad():
        ours, _ = dense._tokens_before_last_block(torch.zeros(1, 3, 64, 64))
    assert wrapped.calls == 1
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


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
    blocks = model.visual.transformer.resblocks
    module_calls = []
    for i, block in enumerate(blocks):
        block.attn.register_forward_hook(lambda *_, i=i: module_calls.append(i))
    attention_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *args, **kwargs):
        attention_calls.append(q.shape[-2])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    dense.dense_features(torch.randn(1, 3, 64, 96))
    # one query-key attention per block before the last (1 + 4 * 6 tokens), none in the last block
    assert attention_calls == [25] * (len(blocks) - 1) and len(blocks) >= 2
    assert module_calls == []  # the trunk's attention is trunk_block's; the last block's never ran
    # the reference trunk runs the modules themselves: every block before the last, once
    dense._tokens_before_last_block(torch.randn(1, 3, 64, 96), reference=True)
    assert module_calls == list(range(len(blocks) - 1))
