"""ViTDet's simple feature pyramid as a neck (Li et al. 2022, "Exploring Plain Vision Transformer
Backbones for Object Detection", Sec. 3 and Fig. 2; detectron2's `SimpleFeaturePyramid`).

A plain ViT gives one map at its patch stride (16). The pyramid builds every encoder level from that
map alone: stride 8 by a 2x2 stride-2 transposed convolution, 4 by two of them (LayerNorm and GELU
between), 16 as it is, 32 by 2x2 stride-2 max pooling; each branch ends in a 1x1 and a 3x3
convolution, each followed by a channel LayerNorm (no conv bias). Stride 64, as ViTDet's extra "p6",
subsamples the stride-32 output (max pooling with kernel 1, stride 2). The levels are then projected
to width d as by the projection neck (`projection.py`). Deformable DETR-style detectors take strides
8/16/32/64; the backbone pads images to the deepest stride so that every level is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from detr_lab.models.backbones.base import FeatureLevel, downsample_mask
from detr_lab.models.necks.projection import InputProjections, group_norm_projection

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


class SimplePyramidNeck(InputProjections):
    """The pyramid over the backbone's deepest map, then one projection per level.

    Args:
        pyramid: the `SimpleFeaturePyramid`.
        projections: one module per pyramid level, `[B, channels, H_l, W_l]` -> `[B, d, H_l, W_l]`.
        input_stride: the stride of the backbone map the pyramid reads.

    Attributes: `pyramid`, `input_proj` (the projections, as the projection neck names them).
    """

    def __init__(
        self, pyramid: SimpleFeaturePyramid, projections: Sequence[nn.Module], *, input_stride: int
    ) -> None:
        super().__init__(projections, num_backbone_levels=len(projections))
        self.pyramid = pyramid
        # Trained at the backbone's rate, as when the pyramid was part of the ViT backbone.
        self.pyramid.backbone_rate = True
        self.input_stride = input_stride

    def forward(
        self, levels: Sequence[FeatureLevel], padding_mask: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Backbone levels (the deepest is used) -> features `[B, d, H_l, W_l]` and masks bool
        `[B, H_l, W_l]` (True = padding) per pyramid level, shallowest first.

        The masks resize `padding_mask` padded bottom/right (True) to the size the backbone padded the
        images to (its map's size times its stride), as the backbone resizes it for its own level.
        """
        deepest = levels[-1]
        maps = self.pyramid(deepest.features)
        height, width = (side * self.input_stride for side in deepest.features.shape[-2:])
        pad_h, pad_w = height - padding_mask.shape[-2], width - padding_mask.shape[-1]
        padded = F.pad(padding_mask, (0, pad_w, 0, pad_h), value=True)  # (B, h * stride, w * stride)
        masks = [downsample_mask(padded, x.shape[-2:]) for x in maps]
        return [proj(x) for proj, x in zip(self.input_proj, maps, strict=True)], masks


def build(
    *,
    in_channels: Sequence[int],
    strides: Sequence[int],
    level_strides: Sequence[int],
    hidden_dim: int,
    group_norm: bool,
    channels: int = 256,
    **_,
) -> SimplePyramidNeck:
    """The pyramid at `level_strides` (each the backbone stride times 1/4, 1/2, 1, 2, or 4 right after 2)
    over the backbone's deepest level (`in_channels[-1]` channels at `strides[-1]`), `channels` wide
    (`model.neck.options.channels`), then GroupNorm (multi-scale inputs) or 1x1 projections to d.

    Raises:
        ValueError: a level stride the pyramid cannot build.
    """
    vit_stride = int(strides[-1])
    level_strides = [int(s) for s in level_strides]
    scales = [vit_stride / s for s in level_strides]
    extra_pool = len(level_strides) > 1 and scales[-1] == 0.25 and scales[-2] == 0.5
    branch_scales = scales[:-1] if extra_pool else scales
    if (
        not level_strides
        or any(s not in BRANCH_SCALES for s in branch_scales)
        or level_strides != sorted(set(level_strides))
    ):
        raise ValueError(
            f"simple-pyramid strides must increase and each be the backbone's stride ({vit_stride}) times "
            f"1/4, 1/2, 1, 2 (or 4 right after 2); got {tuple(level_strides)}"
        )
    pyramid = SimpleFeaturePyramid(in_channels[-1], channels, branch_scales, extra_pool=extra_pool)
    if group_norm:
        projections = [group_norm_projection(channels, hidden_dim) for _ in level_strides]
    else:
        projections = [nn.Conv2d(channels, hidden_dim, kernel_size=1) for _ in level_strides]
    return SimplePyramidNeck(pyramid, projections, input_stride=vit_stride)
