"""The backbone contract: images and their padding mask in, feature levels with strides and channels out.

Every backbone (`ResNetBackbone`, `TimmBackbone`, `ViTBackbone`, or a wrapper such as the traced
runner of `detr_lab.models.optimize`) is a `Backbone`: it lists the channels and strides of the levels
it returns and computes their feature maps; the shared `forward` checks the inputs, pads the batch
to the size multiple the backbone needs and resizes the padding mask to every level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeatureLevel(NamedTuple):
    """One backbone output: `features` float `[B, C, h, w]` and `mask` bool `[B, h, w]` (True = padding)."""

    features: Tensor
    mask: Tensor


def downsample_mask(padding_mask: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of bool `[B, H, W]` (True = padding) to `[B, *size]`, as DETR."""
    return F.interpolate(padding_mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def valid_extent(padding_mask: Tensor) -> Tensor:
    """bool `[B, H, W]` (True = padding, bottom/right) -> int64 `[B, 2]`: each image's unpadded (width,
    height) in pixels of this map, the valid pixels of its first row and first column. The one
    valid-extent reader: the ViT's patch grids, the encoder's valid ratios and the two-stage proposals
    all use it."""
    valid = ~padding_mask
    return torch.stack((valid[:, 0, :].sum(1), valid[:, :, 0].sum(1)), dim=-1)


def pad_to_multiple(images: Tensor, padding_mask: Tensor, multiple: int) -> tuple[Tensor, Tensor]:
    """Zero-pad images `[B, C, H, W]` bottom/right to sides divisible by `multiple`; the added pixels
    are padding (True) in the returned mask `[B, H', W']`. Unchanged inputs when already divisible."""
    if multiple == 1:  # any size is a multiple of 1: no copy, also not in a traced graph
        return images, padding_mask
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    # a traced graph (ONNX export) always pads (maybe by zero): the branch would freeze the example's size
    if not pad_h and not pad_w and not torch.jit.is_tracing():
        return images, padding_mask
    images = F.pad(images, (0, pad_w, 0, pad_h))
    padding_mask = F.pad(padding_mask, (0, pad_w, 0, pad_h), value=True)
    return images, padding_mask


def freeze_stages(
    stem: nn.Module, stages: Sequence[nn.Module], frozen_stages: int, freeze_stem: bool
) -> None:
    """Stop the gradients of the stem and the first `frozen_stages` stages (none with 0), or of the stem
    alone with `freeze_stem` (RT-DETR's and D-FINE's `freeze_at: 0`)."""
    frozen = [stem, *stages[:frozen_stages]] if frozen_stages > 0 else []
    if freeze_stem and not frozen:
        frozen = [stem]
    for module in frozen:
        module.requires_grad_(False)


class Backbone(nn.Module):
    """Base of every backbone: `(images, padding_mask) -> list[FeatureLevel]`, shallowest level first.

    A subclass sets `num_channels` and `strides` (one entry per returned level, strides in input
    pixels) and implements `feature_maps`; it may set `size_multiple` when its input sides must be
    divisible by some number (a patch or window size): `forward` then zero-pads the batch bottom/right
    and marks the added pixels as padding before calling `feature_maps`.
    """

    num_channels: list[int]
    strides: list[int]
    size_multiple: int = 1

    def feature_maps(self, images: Tensor, padding_mask: Tensor | None = None) -> list[Tensor]:
        """Feature maps `[B, C_l, H_l, W_l]` of the returned levels, shallowest first.

        Args:
            images: float `[B, 3, H, W]`, normalized, zero-padded bottom/right, sides divisible by
                `size_multiple`.
            padding_mask: bool `[B, H, W]`, True = padding; None means no padding. Convolutional
                backbones ignore it; attention backbones keep padding out of their attention.
        """
        raise NotImplementedError

    def forward(self, images: Tensor, padding_mask: Tensor) -> list[FeatureLevel]:
        """Features of every returned level with its padding mask.

        Args:
            images: float `[B, 3, H, W]`, normalized, zero-padded bottom/right.
            padding_mask: bool `[B, H, W]`, True = padding.
        Returns:
            one `FeatureLevel` per level, shallowest first: features `[B, num_channels[l], H_l, W_l]`
            (H_l about H / strides[l]) and the padding mask resized to `[B, H_l, W_l]` (True = padding).
        Raises:
            ValueError: images not `[B, 3, H, W]` or a padding mask of another batch or size.
        """
        if images.dim() != 4 or padding_mask.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(
                f"images must be [B, 3, H, W] and padding_mask [B, H, W]; got {tuple(images.shape)} "
                f"and {tuple(padding_mask.shape)}"
            )
        images, padding_mask = pad_to_multiple(images, padding_mask, self.size_multiple)
        maps = self.feature_maps(images, padding_mask)
        return [FeatureLevel(x, downsample_mask(padding_mask, x.shape[-2:])) for x in maps]
