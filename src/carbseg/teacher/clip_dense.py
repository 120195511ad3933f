"""Dense CLIP features by the MaskCLIP value path, for open_clip ViT image towers.

MaskCLIP observes that CLIP's last block mixes patch tokens through query-key attention into a
global (CLS-centred) representation that no longer says *where* things are. Replacing that
attention by the identity -- each token keeps only its own value projection -- leaves features
that live in the same joint space as the text embeddings but stay local. So, for dense
features, the last block's query-key attention is never computed:

    x = x + out_proj(v_proj(ln_1(x)))          # value path (attention forced to the identity)
    x = x + mlp(ln_2(x))
    features = ln_post(x) @ proj               # joint image-text space

Any input size works: the learned positional embedding is interpolated bicubically to the
input's patch grid (cached per grid size, since the teacher sees the same few view sizes).

Later training-free work changes the same last block differently; each is a choice of
``variant`` (``teacher.dense``), everything before the last block and after it (``ln_post``,
``proj``) being shared. With per-head q, k, v = the last block's projections of ln_1(x) over all
tokens (CLS included, as in the authors' code), s = head_dim ** -0.5 and A(u, w) = softmax(s u w^T):

    sclip:      x + out_proj((A(q, q) + A(k, k)) v), then + mlp(ln_2(.))  (SCLIP, correlative
                self-attention; the two maps are summed, not renormalised: rows sum to 2)
    clearclip:  out_proj(A(q, q) v)                 (ClearCLIP: no residual, no feed-forward)
    naclip:     out_proj(softmax(s k k^T + Omega) v) (NACLIP: key-key similarity plus a Gaussian
                neighbourhood Omega[p, p'] = exp(-|p - p'|^2 / (2 sigma^2)) over patch-grid
                positions, 0 in the CLS row and column; no residual, no feed-forward)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from carbseg.errors import UserError

#: The dense variants of the last block (``teacher.dense``); ``maskclip`` is the paper's teacher.
DENSE_VARIANTS = ("maskclip", "sclip", "clearclip", "naclip")
#: NACLIP's Gaussian neighbourhood width in patches (the authors' default).
NACLIP_SIGMA = 5.0


class DenseCLIP(nn.Module):
    """Wraps an open_clip ``VisionTransformer`` (``model.visual``); its weights are shared, not copied.

    Inputs are CLIP-normalised images (B, 3, H, W); H and W are cut down to multiples of the patch
    size (the last partial row/column of pixels is not seen, as in a strided convolution).
    variant: the last block's dense form, one of ``DENSE_VARIANTS`` (module docstring);
    naclip_sigma: NACLIP's neighbourhood width in patches (used by ``naclip`` only).
    """

    def __init__(self, visual: nn.Module, variant: str = "maskclip", naclip_sigma: float = NACLIP_SIGMA):
        super().__init__()
        if variant not in DENSE_VARIANTS:
            raise UserError(f"teacher.dense = {variant!r} is not valid; choose one of {', '.join(DENSE_VARIANTS)}")
        if not naclip_sigma > 0:
            raise UserError(f"teacher.naclip_sigma must be positive, got {naclip_sigma}")
        self._check_supported(visual)
        self.visual = visual
        self.variant = variant
        self.naclip_sigma = float(naclip_sigma)
        self.patch_size = tuple(visual.patch_size)
        self.native_grid = tuple(visual.grid_size)
        conv = visual.conv1
        self._conv1_is_patchwise = (tuple(conv.kernel_size) == tuple(conv.stride) == self.patch_size
                                    and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1)
                                    and conv.groups == 1 and conv.padding_mode == "zeros")
        # trunk_block needs open_clip's standard self-attention blocks; any other block runs its own forward.
        self._standard_trunk = all(_is_standard_block(b) for b in visual.transformer.resblocks[:-1])
        self._pos_cache: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}
        self._omega_cache: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}

    @staticmethod
    def _check_supported(visual: nn.Module) -> None:
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None or not hasattr(visual, "conv1"):
            raise UserError("the dense CLIP teacher needs an open_clip ViT image tower (e.g. ViT-B-16); "
                            "ResNet and timm towers are not supported")
        last = blocks[-1]
        if not isinstance(getattr(last, "attn", None), nn.MultiheadAttention):
            raise UserError("the dense CLIP teacher supports open_clip ViTs with standard attention blocks; "
                            "this model uses custom attention (choose e.g. ViT-B-16, ViT-B-32, ViT-L-14)")
        if getattr(visual, "attn_pool", None) is not None:
            raise UserError("the dense CLIP teacher does not support attentional pooling towers (CoCa)")

    @property
    def embed_dim(self) -> int:
        return int(self.visual.proj.shape[1])

    # ------------------------------------------------------------------ positional embedding
    def positional_embedding(self, grid: tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor:
        """(1 + gh*gw, width) positional embedding for a ``grid`` of patches; exact at the native grid."""
        key = (grid[0], grid[1], dtype, torch.device(device))
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        pos = self.visual.positional_embedding
        if tuple(grid) == self.native_grid:
            out = pos
        else:
            cls_pos, patch_pos = pos[:1], pos[1:]
            gh0, gw0 = self.native_grid
            width = patch_pos.shape[-1]
            # Interpolated in fp32 at least and cast once, below: a model stored in bf16 gets its
            # positions rounded once, not twice.
            work = torch.promote_types(pos.dtype, torch.float32)
            grid_pos = patch_pos.to(work).reshape(1, gh0, gw0, width).permute(0, 3, 1, 2)
            grid_pos = F.interpolate(grid_pos, size=tuple(grid), mode="bicubic", align_corners=False)
            patch_pos = grid_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)
            out = torch.cat([cls_pos.to(work), patch_pos], dim=0)
        out = out.detach().to(device=device, dtype=dtype)
        self._pos_cache[key] = out
        return out

    # ------------------------------------------------------------------ shared trunk
    def grid_of(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size[0], width // self.patch_size[1]

    def patch_embedding(self, crop: torch.Tensor) -> torch.Tensor:
        """``conv1`` of the crop (whole patches only) as one matrix product, (B, gh*gw, width).

        conv1's kernel equals its stride and it has no padding, so it is a linear map of each
        non-overlapping patch: the same products (to float rounding) as one GEMM over the
        patches. Convolution kernels handle this shape badly on CPUs: under bf16 autocast the
        3-channel 16x16/16 convolution took 18 s for two 1024x512 images where the GEMM takes
        1 s, and in fp32 it is ~2x slower than the GEMM (benchmarks/RESULTS.md, teacher section)."""
        conv = self.visual.conv1
        if not self._conv1_is_patchwise:
            return conv(crop).flatten(2).transpose(1, 2)
        b, c, h, w = crop.shape
        ph, pw = self.patch_size
        gh, gw = h // ph, w // pw
        patches = crop.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
        return F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)

    def _tokens_before_last_block(self, images: torch.Tensor,
                                  reference: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens (B, 1 + gh*gw, width) entering the last block, and the patch grid.

        ``reference=True`` runs open_clip's own modules as they are (conv1, each block's forward:
        what ``encode_image`` and the benchmark's baseline use); the default computes the same
        function faster (``patch_embedding``, ``trunk_block``), equal to it to float rounding
        (tests/test_teacher_dense.py).
        """
        v = self.visual
        grid = self.grid_of(images.shape[-2], images.shape[-1])
        if grid[0] < 1 or grid[1] < 1:
            raise UserError(f"image {images.shape[-1]}x{images.shape[-2]} is smaller than one CLIP patch "
                            f"({self.patch_size[1]}x{self.patch_size[0]})")
        crop = images[..., : grid[0] * self.patch_size[0], : grid[1] * self.patch_size[1]]
        x = v.conv1(crop).flatten(2).transpose(1, 2) if reference else self.patch_embedding(crop)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding(grid, x.dtype, x.device)
        x = v.ln_pre(x)
        for block in v.transformer.resblocks[:-1]:
            x = block(x) if reference or not self._standard_trunk else self.trunk_block(block, x)
        return x, grid

    # ------------------------------------------------------------------ outputs
    def value_path(self, x: torch.Tensor) -> torch.Tensor:
        """The last block with its attention forced to the identity (no query-key product at all)."""
        block = self.visual.transformer.resblocks[-1]
        attn = block.attn
        d = attn.embed_dim
        w_v = attn.in_proj_weight[2 * d:]
        b_v = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
        v = F.linear(block.ln_1(x), w_v, b_v)
        x = x + block.ls_1(attn.out_proj(v))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def last_block_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of the last block, ``W_k ln_1(x) + b_k`` (B, N, width), used only by key smoothing: carbseg's
        rule, which differs from MaskCLIP's released one (docs/teacher.md, "Key smoothing")."""
        block = self.visual.transformer.resblocks[-1]
        attn = block.attn
        d = attn.embed_dim
        b_k = attn.in_proj_bias[d: 2 * d] if attn.in_proj_bias is not None else None
        return F.linear(block.ln_1(x), attn.in_proj_weight[d: 2 * d], b_k)

    def _heads(self, x: torch.Tensor,
               block: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k, v (B, heads, N, head_dim) of ``block`` (default: the last), from ln_1(x)."""
        block = self.visual.transformer.resblocks[-1] if block is None else block
        attn = block.attn
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        b, n, _ = qkv.shape
        qkv = qkv.view(b, n, 3, attn.num_heads, attn.embed_dim // attn.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _merge_heads(self, out: torch.Tensor, block: nn.Module | None = None) -> torch.Tensor:
        """(B, heads, N, head_dim) -> out_proj of ``block`` (default: the last) on the concatenated heads."""
        block = self.visual.transformer.resblocks[-1] if block is None else block
        b, h, n, d = out.shape
        return block.attn.out_proj(out.transpose(1, 2).reshape(b, n, h * d))

    def trunk_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One block before the last, as open_clip's forward computes it (x + ls_1(attention(ln_1(x))),
        then + ls_2(mlp(ln_2(.)))), with its multi-head attention written out on the (B, N, width)
        tokens and run by ``scaled_dot_product_attention``.

        Why not ``nn.MultiheadAttention`` itself: on a CPU its inference fast path materialises every
        (heads, N, N) attention map, and its other path transposes a batch_first input so that, for a
        batch above 1, the in-projection runs as a batched matmul with the weight broadcast; each was
        40-45% of the fp32 trunk at 1024x512 (2,049 tokens), against a flash kernel and plain GEMMs here
        (benchmarks/RESULTS.md, teacher section)."""
        q, k, v = self._heads(x, block)
        x = x + block.ls_1(self._merge_heads(F.scaled_dot_product_attention(q, k, v), block))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def neighbourhood(self, grid: tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor:
        """NACLIP's Omega, (1 + gh*gw, 1 + gh*gw): a Gaussian of the patches' grid distance, added to the
        attention logits; the CLS token (index 0) has no grid position and gets 0. Cached per grid."""
        key = (grid[0], grid[1], dtype, torch.device(device))
        cached = self._omega_cache.get(key)
        if cached is not None:
            return cached
        ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
        pos = torch.stack([ys.flatten(), xs.flatten()], dim=1)  # (gh*gw, 2), row-major like the tokens
        gauss = torch.exp(-torch.cdist(pos, pos).square() / (2.0 * self.naclip_sigma ** 2))
        omega = F.pad(gauss, (1, 0, 1, 0)).to(device=device, dtype=dtype)
        self._omega_cache[key] = omega
        return omega

    def attention_block(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The last block as changed by SCLIP, ClearCLIP or NACLIP (``self.variant``), on all tokens (B, N, width).

        Attention runs through ``scaled_dot_product_attention`` (its default scale is head_dim ** -0.5,
        the block's own); the attention maps are never materialised where the backend can avoid it.
        """
        block = self.visual.transformer.resblocks[-1]
        q, k, v = self._heads(x)
        sdpa = F.scaled_dot_product_attention
        if self.variant == "sclip":
            # Correlative self-attention: (softmax(q q^T) + softmax(k k^T)) v = both products summed.
            x = x + block.ls_1(self._merge_heads(sdpa(q, q, v) + sdpa(k, k, v)))
            return x + block.ls_2(block.mlp(block.ln_2(x)))
        if self.variant == "clearclip":
            return block.ls_1(self._merge_heads(sdpa(q, q, v)))
        if self.variant == "naclip":
            omega = self.neighbourhood(grid, q.dtype, q.device)
            return block.ls_1(self._merge_heads(sdpa(k, k, v, attn_mask=omega)))
        raise ValueError(f"attention_block does not implement variant = {self.variant!r}")

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and visual projection into the joint image-text space."""
        x = self.visual.ln_post(x)
        return x @ self.visual.proj.to(x.dtype)

    def dense_features(self, images: torch.Tensor, with_keys: bool = False):
        """Patch features (B, D, gh, gw) in the joint space (not normalised); optionally last-block keys."""
        x, grid = self._tokens_before_last_block(images)
        patches = x[:, 1:]  # the value path is per token: the CLS token is not needed
        if self.variant == "maskclip":
            feats = self.project(self.value_path(patches))
        else:  # attention mixes tokens: the CLS token takes part, its output is dropped
            feats = self.project(self.attention_block(x, grid)[:, 1:])
        feats = feats.transpose(1, 2).reshape(x.shape[0], -1, grid[0], grid[1])
        if not with_keys:
            return feats
        keys = self.last_block_keys(patches).transpose(1, 2).reshape(x.shape[0], -1, grid[0], grid[1])
        return feats, keys

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The standard CLS embedding (full attention in every block), at any input size; open_clip's
        own modules, so at the native size it is ``encode_image`` of open_clip exactly."""
        x, _ = self._tokens_before_last_block(images, reference=True)
        x = self.visual.transformer.resblocks[-1](x)
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj.to(pooled.dtype)


def _is_standard_block(block: nn.Module) -> bool:
    """open_clip's ``ResidualAttentionBlock`` as a ViT image tower builds it: self-attention with one
    packed in-projection, no cross-attention norm, the layers ``trunk_block`` reads."""
    attn = getattr(block, "attn", None)
    return (type(block).__name__ == "ResidualAttentionBlock" and isinstance(attn, nn.MultiheadAttention)
            and attn._qkv_same_embed_dim and attn.in_proj_weight is not None
            and attn.bias_k is None and attn.bias_v is None and not attn.add_zero_attn
            and not hasattr(block, "ln_1_kv")
            and all(hasattr(block, name) for name in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")))
