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


# ---------------------------------------------------------------- every weight counts
# open_clip's tiny tower above has two blocks (so "the last block" is also "block 1" and "the blocks before
# it" is "block 0"), zero attention and LayerNorm biases (nn.MultiheadAttention's and LayerNorm's
# initialisation) and a bias-free conv1: a path that read the wrong block or dropped a bias would still
# match. The tower below has three blocks, every parameter random, and a conv1 with a bias.
def random_clip(patch_size=16, seed: int = 0):
    torch.manual_seed(seed)
    cfg = {**TINY_VIT_CONFIG, "vision_cfg": {**TINY_VIT_CONFIG["vision_cfg"], "patch_size": patch_size, "layers": 3}}
    model = open_clip.model.CLIP(**cfg).eval()
    visual = model.visual
    conv = visual.conv1
    visual.conv1 = torch.nn.Conv2d(3, conv.out_channels, conv.kernel_size, stride=conv.stride, bias=True)
    with torch.no_grad():
        for p in visual.parameters():
            p.add_(torch.randn_like(p), alpha=0.2)
    return model


def reference_tokens(visual, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The tokens entering the last block, written out with open_clip's modules: conv1, CLS, positions
    interpolated bicubically (align_corners=False) from the native grid, ln_pre, each earlier block's forward."""
    ph, pw = visual.patch_size
    gh, gw = images.shape[-2] // ph, images.shape[-1] // pw
    x = visual.conv1(images[..., : gh * ph, : gw * pw]).flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    g0h, g0w = visual.grid_size
    grid_pos = pos[1:].reshape(1, g0h, g0w, -1).permute(0, 3, 1, 2)
    patch_pos = torch.nn.functional.interpolate(grid_pos, size=(gh, gw), mode="bicubic", align_corners=False)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
    x = x + torch.cat([pos[:1], patch_pos.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x, (gh, gw)


def by_hand_value_path(block, x: torch.Tensor) -> torch.Tensor:
    attn = block.attn
    d = attn.embed_dim
    bias = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
    h = x + attn.out_proj(torch.nn.functional.linear(block.ln_1(x), attn.in_proj_weight[2 * d:], bias))
    return h + block.mlp(block.ln_2(h))


def by_hand_keys(block, x: torch.Tensor) -> torch.Tensor:
    attn = block.attn
    d = attn.embed_dim
    keys = block.ln_1(x) @ attn.in_proj_weight[d: 2 * d].T
    return keys if attn.in_proj_bias is None else keys + attn.in_proj_bias[d: 2 * d]


@pytest.mark.parametrize("patch_size", [16, (16, 8)])  # open_clip accepts a (height, width) patch as well
@pytest.mark.parametrize("variant", ["maskclip", "sclip", "clearclip", "naclip"])
def test_three_blocks_and_nonzero_biases_match_the_written_out_tower(variant, patch_size):
    from test_teacher_dense_variants import reference_last_block

    model = random_clip(patch_size)
    visual = model.visual
    with torch.no_grad():
        assert visual.conv1.bias.abs().min() > 0 and visual.transformer.resblocks[-1].attn.in_proj_bias.abs().min() > 0
    dense = DenseCLIP(visual, variant=variant)
    images = torch.randn(2, 3, 100, 90)  # not whole patches, not the native grid
    with torch.no_grad():
        x, grid = reference_tokens(visual, images)
        tokens, dense_grid = dense._tokens_before_last_block(images)
        last = visual.transformer.resblocks[-1]
        out = by_hand_value_path(last, x) if variant == "maskclip" else reference_last_block(last, x, variant, grid)
        expected = visual.ln_post(out[:, 1:]) @ visual.proj
        feats, keys = dense.dense_features(images, with_keys=True)
        keys_by_hand = by_hand_keys(last, x[:, 1:])
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    assert dense_grid == grid == (100 // ph, 90 // pw)
    assert feats.shape == (2, 32, *grid) and keys.shape == (2, 64, *grid)
    # sums of many products of unit-scale terms: equal to float rounding, relative to each tensor's scale
    for ours, reference in [(tokens, x), (feats.flatten(2).transpose(1, 2), expected),
                            (keys.flatten(2).transpose(1, 2), keys_by_hand)]:
        torch.testing.assert_close(ours, reference, rtol=0, atol=2e-5 * float(reference.abs().max()))


def test_the_cls_output_of_three_random_blocks_equals_open_clip_encode_image():
    model = random_clip()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(DenseCLIP(model.visual).encode_image(images), model.encode_image(images),
                                   rtol=1e-5, atol=1e-5)


def test_attention_without_biases_follows_the_same_formulas():
    model = random_clip()
    last = model.visual.transformer.resblocks[-1]
    bias_free = torch.nn.MultiheadAttention(64, last.attn.num_heads, bias=False, batch_first=True)
    with torch.no_grad():
        bias_free.in_proj_weight.copy_(last.attn.in_proj_weight)
        bias_free.out_proj.weight.copy_(last.attn.out_proj.weight)
    last.attn = bias_free
    dense = DenseCLIP(model.visual)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(dense.value_path(x), by_hand_value_path(last, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dense.last_block_keys(x), by_hand_keys(last, x), rtol=1e-5, atol=1e-5)


def test_dense_features_never_run_conv1_as_a_convolution():
    """conv1 as one GEMM (patch_embedding): the convolution kernel is 18x slower under CPU bf16 autocast."""
    model = random_clip()
    calls = []
    model.visual.conv1.register_forward_hook(lambda *_: calls.append(1))
    dense = DenseCLIP(model.visual)
    with torch.no_grad():
        dense.dense_features(torch.randn(1, 3, 64, 64))
        assert calls == []
        dense._tokens_before_last_block(torch.randn(1, 3, 64, 64), reference=True)
    assert calls == [1]


def test_tokens_keep_the_autocast_dtype_as_open_clip_does():
    """Under bf16 autocast open_clip adds the CLS and position embeddings in the patch embedding's dtype:
    the tokens entering ln_pre are bf16 and, at the native grid, the same tensor as open_clip's own."""
    model = tiny_clip()
    seen = []
    model.visual.ln_pre.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode_image(images)
        DenseCLIP(model.visual)._tokens_before_last_block(images, reference=True)
    assert seen[0].dtype == torch.bfloat16
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)


def test_positional_embedding_values_dtype_and_cache_per_grid():
    model = random_clip()
    dense = DenseCLIP(model.visual)
    pos = model.visual.positional_embedding
    wide = dense.positional_embedding((8, 20), torch.float64, "cpu")
    patch = pos[1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(patch, size=(8, 20), mode="bicubic", align_corners=False)
    assert wide.dtype == torch.float64 and wide.shape == (1 + 8 * 20, 64)
    torch.testing.assert_close(wide[1:].float(), expected.permute(0, 2, 3, 1).reshape(160, 64), rtol=0, atol=1e-6)
    torch.testing.assert_close(wide[0].float(), pos[0], rtol=0, atol=0)
    # one entry per grid: (20, 20) after (8, 20) is its own interpolation
    assert dense.positional_embedding((20, 20), torch.float64, "cpu").shape == (401, 64)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float64])
def test_positions_are_interpolated_in_at_least_fp32_and_rounded_once(stored):
    """A bf16 model: bicubic in fp32, one cast to the asked dtype; an fp64 model keeps fp64 throughout."""
    model = random_clip().to(stored)
    dense = DenseCLIP(model.visual)
    work = torch.float64 if stored == torch.float64 else torch.float32
    pos = model.visual.positional_embedding.to(work)
    patch = pos[1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(patch, size=(8, 20), mode="bicubic", align_corners=False)
    expected = torch.cat([pos[:1], expected.permute(0, 2, 3, 1).reshape(160, 64)])
    torch.testing.assert_close(dense.positional_embedding((8, 20), work, "cpu"), expected, rtol=0, atol=0)


def _stub_tower(**parts) -> torch.nn.Module:
    tower = torch.nn.Module()
    for name, part in parts.items():
        setattr(tower, name, part)
    return tower


def test_unsupported_towers_are_refused_with_what_to_choose():
    import re

    from carbseg.errors import UserError

    needs_vit = "^" + re.escape("the dense CLIP teacher needs an open_clip ViT image tower (e.g. ViT-B-16); "
                                "ResNet and timm towers are not supported") + "$"
    with pytest.raises(UserError, match=needs_vit):
        DenseCLIP(_stub_tower(conv1=torch.nn.Conv2d(3, 8, 16, 16)))  # no transformer (a ResNet-like tower)
    no_conv = random_clip().visual
    del no_conv.conv1
    with pytest.raises(UserError, match=needs_vit):
        DenseCLIP(no_conv)
    custom = random_clip().visual  # blocks 0 and 1 standard, the last one with its own attention
    custom.transformer.resblocks[-1].attn = torch.nn.Identity()
    with pytest.raises(UserError, match="^" + re.escape(
            "the dense CLIP teacher supports open_clip ViTs with standard attention blocks; "
            "this model uses custom attention (choose e.g. ViT-B-16, ViT-B-32, ViT-L-14)") + "$"):
        DenseCLIP(custom)
    pooled = random_clip().visual
    pooled.attn_pool = torch.nn.Identity()
    with pytest.raises(UserError, match="^" + re.escape(
            "the dense CLIP teacher does not support attentional pooling towers (CoCa)") + "$"):
        DenseCLIP(pooled)
    DenseCLIP(random_clip().visual, variant="naclip", naclip_sigma=0.5)  # any positive width
    without_pool_attribute = random_clip().visual  # a tower (or open_clip version) that never had one
    del without_pool_attribute.attn_pool
    DenseCLIP(without_pool_attribute)


def test_an_image_smaller_than_one_patch_in_either_direction_is_a_user_error():
    import re

    from carbseg.errors import UserError

    dense = DenseCLIP(random_clip((16, 8)).visual)
    with pytest.raises(UserError, match="^" + re.escape("image 64x15 is smaller than one CLIP patch (8x16)") + "$"):
        dense.dense_features(torch.randn(1, 3, 15, 64))
    with pytest.raises(UserError, match="^" + re.escape("image 7x64 is smaller than one CLIP patch (8x16)") + "$"):
        dense.dense_features(torch.randn(1, 3, 64, 7))
    with torch.no_grad():
        assert dense.dense_features(torch.randn(1, 3, 16, 8)).shape == (1, 32, 1, 1)  # exactly one patch


def test_attention_block_refuses_the_value_path_variant():
    dense = DenseCLIP(random_clip().visual)
    with pytest.raises(ValueError, match="attention_block does not implement variant = 'maskclip'"):
        dense.attention_block(torch.randn(1, 5, 64), (2, 2))


def test_naclip_neighbourhood_is_cached_per_grid():
    from test_teacher_dense_variants import reference_omega

    dense = DenseCLIP(random_clip().visual, variant="naclip", naclip_sigma=2.0)
    for grid in [(2, 3), (3, 3), (3, 4), (2, 3)]:
        torch.testing.assert_close(dense.neighbourhood(grid, torch.float64, "cpu"), reference_omega(*grid, 2.0))


@pytest.mark.parametrize("change", ["bias_kv", "cross_attention_norm", "wrapped_last_trunk_block"])
def test_blocks_trunk_block_cannot_compute_run_their_own_forward(change):
    model = random_clip()
    blocks = model.visual.transformer.resblocks
    if change == "bias_kv":  # nn.MultiheadAttention's extra key/value rows: not in trunk_block's formula
        blocks[1].attn = torch.nn.MultiheadAttention(64, blocks[1].attn.num_heads, add_bias_kv=True, batch_first=True)
    elif change == "cross_attention_norm":  # open_clip's cross-attention block
        blocks[1].ln_1_kv = torch.nn.LayerNorm(64)
    else:
        blocks[1] = _WrappedBlock(blocks[1])
    dense = DenseCLIP(model.visual)
    assert not dense._standard_trunk
    images = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        ours, reference = dense._tokens_before_last_block(images)[0], reference_tokens(model.visual, images)[0]
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-5 * float(reference.abs().max()))


def test_cached_positions_and_neighbourhood_live_on_the_asked_device():
    """The "meta" device stands in for a GPU: a cache built on the CPU and never moved would show here."""
    dense = DenseCLIP(random_clip().visual, variant="naclip")
    for grid in [(14, 14), (8, 20)]:  # the native grid (no interpolation) and an interpolated one
        assert dense.positional_embedding(grid, torch.float32, "meta").device.type == "meta"
    assert dense.neighbourhood((2, 3), torch.float32, "meta").device.type == "meta"
