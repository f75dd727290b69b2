"""A plain timm ViT with ViTDet's simple feature pyramid (Li et al. 2022, "Exploring Plain Vision
Transformer Backbones for Object Detection", Sec. 3 and Fig. 2; detectron2's `SimpleFeaturePyramid`).

The ViT's last block gives one map at the patch stride (16). The pyramid builds every other level
from that map alone: stride 8 by a 2x2 stride-2 transposed convolution, 4 by two of them (LayerNorm
and GELU between), 16 as it is, 32 by 2x2 stride-2 max pooling; each branch ends in a 1x1 and a 3x3
convolution, each followed by a channel LayerNorm (no conv bias). Stride 64, as ViTDet's extra
"p6", subsamples the stride-32 output (max pooling with kernel 1, stride 2). Deformable DETR-style
detectors take strides 8/16/32/64.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from detr_lab.models.backbones.base import Backbone
from detr_lab.models.backbones.timm_models import create_timm_model

# Input stride / pyramid level stride -> how the branch resamples the ViT map before its convolutions.
BRANCH_SCALES = (4, 2, 1, 0.5)


def _upsample(in_channels: int, scale: int) -> tuple[list[nn.Module], int]:
    """Transposed-convolution layers for an upsampling `scale` of 2 or 4, and their output channels."""
    if scale == 2:
        return [nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)], in_channels // 2
    half = in_channels // 2
    layers = [
        nn.ConvTranspose2d(in_channels, half, kernel_size=2, stride=2),
        LayerNorm2d(half),
        nn.GELU(),
        nn.ConvTranspose2d(half, half // 2, kernel_size=2, stride=2),
    ]
    return layers, half // 2


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid over one feature map: `[B, C, h, w]` -> one `[B, out_channels, h*s, w*s]` per scale.

    Args:
        in_channels: C, the ViT width.
        out_channels: channels of every level.
        scales: resampling of each branch relative to the input map, from (4, 2, 1, 0.5), decreasing.
        extra_pool: append a level subsampling the last branch's output by 2 (kernel-1 max pooling,
            ViTDet's "p6").
    """

    def __init__(
        self, in_channels: int, out_channels: int, scales: Sequence[float], *, extra_pool: bool = False
    ) -> None:
        super().__init__()
        if not scales or any(s not in BRANCH_SCALES for s in scales) or list(scales) != sorted(scales)[::-1]:
            raise ValueError(f"pyramid scales must be decreasing values from {BRANCH_SCALES}, got {scales}")
        self.branches = nn.ModuleList()
        for scale in scales:
            if scale > 1:
                layers, channels = _upsample(in_channels, int(scale))
            elif scale == 1:
                layers, channels = [], in_channels
            else:
                layers, channels = [nn.MaxPool2d(kernel_size=2, stride=2)], in_channels
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            self.branches.append(nn.Sequential(*layers))
        self.extra_pool = extra_pool

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = [branch(x) for branch in self.branches]
        if self.extra_pool:
            levels.append(F.max_pool2d(levels[-1], kernel_size=1, stride=2))
        return levels


class ViTBackbone(Backbone):
    """A timm `VisionTransformer` (any input size: `dynamic_img_size=True`) with a simple feature pyramid.

    Args:
        name: a plain timm ViT, e.g. "vit_tiny_patch16_224", "vit_base_patch16_224".
        strides: pyramid levels to return, increasing, each the ViT's stride times 1/4, 1/2, 1, 2, or
            4 (the last only right after 2: pooled from that level); default 8/16/32/64 for patch 16.
        pyramid_channels: channels of every pyramid level.
        pretrained: timm's default weights (may download); weights_path: a local timm state dict of
            the ViT (never downloads). See `create_timm_model`.
        model_kwargs: further `timm.create_model` arguments (e.g. `drop_path_rate`, or small widths).

    Images are zero-padded bottom/right to a multiple of the patch size and of the deepest stride
    (padding in the mask). Patches made only of padding are kept out of the attention as keys
    (timm's `attn_mask`), so what those pixels hold does not reach the other tokens, and every image's
    position embeddings are resampled to its own patch grid: an image's ViT tokens are the same alone
    or in any padded batch. The pyramid reads the last block's tokens after the ViT's final norm.

    Attributes:
        vit: the timm model (no classifier); pyramid: the `SimpleFeaturePyramid`.
    Raises:
        ValueError: not a plain ViT, a stride the pyramid cannot build, or a weights problem.
    """

    def __init__(
        self,
        name: str,
        *,
        strides: Sequence[int] = (8, 16, 32, 64),
        pyramid_channels: int = 256,
        pretrained: bool = False,
        weights_path: str | os.PathLike | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        try:
            self.vit = create_timm_model(
                name,
                pretrained=pretrained,
                weights_path=weights_path,
                num_classes=0,
                dynamic_img_size=True,
                **(model_kwargs or {}),
            )
        except TypeError as err:
            if "dynamic_img_size" not in str(err):
                raise
            raise ValueError(f"'{name}' is not a plain timm VisionTransformer ({err})") from None
        if not isinstance(self.vit, VisionTransformer):
            raise ValueError(f"'{name}' is a {type(self.vit).__name__}, not a plain timm VisionTransformer")
        patch_h, patch_w = self.vit.patch_embed.patch_size
        if patch_h != patch_w:
            raise ValueError(f"'{name}' has non-square patches {patch_h}x{patch_w}")
        if not isinstance(self.vit.patch_drop, nn.Identity):
            raise ValueError(
                f"'{name}': patch dropout would drop tokens of the feature map; set patch_drop_rate 0"
            )
        last = self.vit.feature_info[-1]
        vit_stride, vit_channels = int(last["reduction"]), int(last["num_chs"])
        strides = [int(s) for s in strides]
        scales = [vit_stride / s for s in strides]
        extra_pool = len(strides) > 1 and scales[-1] == 0.25 and scales[-2] == 0.5
        branch_scales = scales[:-1] if extra_pool else scales
        if (
            not strides
            or any(s not in BRANCH_SCALES for s in branch_scales)
            or strides != sorted(set(strides))
        ):
            raise ValueError(
                f"ViT backbone strides must increase and each be the ViT's stride ({vit_stride}) times "
                f"1/4, 1/2, 1, 2 (or 4 right after 2); got {tuple(strides)}"
            )
        self.pyramid = SimpleFeaturePyramid(
            vit_channels, pyramid_channels, branch_scales, extra_pool=extra_pool
        )
        self.name = name
        self.patch_size = patch_h
        self.num_channels = [pyramid_channels] * len(strides)
        self.strides = strides
        self.size_multiple = max(patch_h, max(strides))

    def token_attention_mask(self, padding_mask: Tensor) -> Tensor:
        """Keys each token may attend to, for timm's `attn_mask`: bool `[B, 1, 1, N]` (True = allowed;
        the opposite polarity of `padding_mask`), N = prefix tokens + patches.

        A patch is a key unless all its pixels are padding; prefix tokens (class, registers) always are.
        `padding_mask`: bool `[B, H, W]`, True = padding, sides divisible by the patch size.
        """
        real = (~padding_mask)[:, None].float()  # (B, 1, H, W)
        patch_real = F.max_pool2d(real, self.patch_size).flatten(1) > 0  # (B, h * w)
        prefix = patch_real.new_ones(patch_real.shape[0], self.vit.num_prefix_tokens)
        return torch.cat([prefix, patch_real], dim=1)[:, None, None, :]  # (B, 1, 1, N)

    def patch_position_embeddings(self, grid: tuple[int, int], image_grids: list[tuple[int, int]]) -> Tensor:
        """Position embeddings of the patch tokens, each image's resampled to its own patch grid.

        The pretrained table is resampled (bicubic, as timm's `dynamic_img_size`) to every image's grid
        `image_grids[b]` (its real pixels' patches) and placed top-left in the batch grid `grid`
        (h, w); patches outside it (padding) get zeros. Returns `[B, h * w, C]`.
        """
        vit = self.vit
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens  # rows of the table for prefix tokens
        table = vit.pos_embed  # (1, prefix + G_h * G_w, C)
        embeddings = table.new_zeros(len(image_grids), *grid, table.shape[-1])  # (B, h, w, C)
        for size in set(image_grids):
            resampled = resample_abs_pos_embed(
                table, new_size=list(size), old_size=vit.patch_embed.grid_size, num_prefix_tokens=prefix
            )[:, prefix:]  # (1, h_b * w_b, C)
            rows = [b for b, image_grid in enumerate(image_grids) if image_grid == size]
            embeddings[rows, : size[0], : size[1]] = resampled.view(1, *size, -1)
        return embeddings.flatten(1, 2)

    def vit_map(self, images: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The ViT's last-block tokens after its final norm as a map `[B, C, H / patch, W / patch]`.

        timm's ViT forward (patch embedding, prefix tokens, blocks, final norm), except that every
        image's position embeddings are resampled to its own patch grid (`patch_position_embeddings`)
        rather than to the padded batch's, and that patches made only of padding are no attention keys
        (`token_attention_mask`): an image's real tokens are the same alone or in any padded batch.

        Args:
            images: float `[B, 3, H, W]`, sides divisible by the patch size.
            padding_mask: bool `[B, H, W]`, True = padding, bottom/right (None: none).
        """
        vit = self.vit
        patches = vit.patch_embed(images)  # (B, h, w, C)
        batch, h, w, channels = patches.shape
        if padding_mask is None:
            image_grids = [(h, w)] * batch
        else:
            real = ~padding_mask
            real_h = real.any(dim=2).sum(dim=1)  # (B,) rows holding a real pixel (padding is bottom/right)
            real_w = real.any(dim=1).sum(dim=1)
            to_patches = lambda n: (-(-n // self.patch_size)).clamp(min=1).tolist()  # ceil
            image_grids = list(zip(to_patches(real_h), to_patches(real_w), strict=True))
        tokens = patches.view(batch, h * w, channels) + self.patch_position_embeddings((h, w), image_grids)
        prefix = [t.expand(batch, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if prefix:
            prefix_tokens = torch.cat(prefix, dim=1)  # (B, num_prefix_tokens, C)
            if not vit.no_embed_class:
                prefix_tokens = prefix_tokens + vit.pos_embed[:, : vit.num_prefix_tokens]
            tokens = torch.cat([prefix_tokens, tokens], dim=1)  # (B, N, C)
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))
        attn_mask = None if padding_mask is None else self.token_attention_mask(padding_mask)
        for block in vit.blocks:
            x = block(x, attn_mask=attn_mask)
        x = vit.norm(x)[:, vit.num_prefix_tokens :]  # (B, h * w, C)
        return x.transpose(1, 2).reshape(batch, channels, h, w)

    def feature_maps(self, images: Tensor, padding_mask: Tensor | None = None) -> list[Tensor]:
        """Pyramid maps `[B, pyramid_channels, H / strides[l], W / strides[l]]`, shallowest first.

        Args:
            images: float `[B, 3, H, W]`, sides divisible by `size_multiple`.
            padding_mask: bool `[B, H, W]`, True = padding (None: none).
        """
        return self.pyramid(self.vit_map(images, padding_mask))
