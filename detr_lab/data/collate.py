"""Batching images of different sizes: zero padding at the bottom and right, plus a padding mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pad_images(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack `[3, H_i, W_i]` images into `[B, 3, H, W]` (H, W the largest), zero-padded bottom/right.

    Returns:
        images: float `[B, 3, H, W]`.
        padding_mask: bool `[B, H, W]`, True = padding (outside image i's `H_i x W_i`).
    """
    if len(images) == 0:
        raise ValueError("pad_images: got an empty list of images")
    for i, image in enumerate(images):
        if image.dim() != 3:
            raise ValueError(f"pad_images: image {i} must be [C, H, W], got shape {list(image.shape)}")
        if image.shape[0] != images[0].shape[0]:
            raise ValueError(
                f"pad_images: image {i} has {image.shape[0]} channels, image 0 has {images[0].shape[0]}"
            )
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], height, width))
    padding_mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for i, image in enumerate(images):
        h, w = image.shape[1:]
        batch[i, :, :h, :w] = image
        padding_mask[i, :h, :w] = False
    return batch, padding_mask


def collate_detection(
    batch: Sequence[tuple[Tensor, dict[str, Tensor]]],
) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """DataLoader `collate_fn`: list of (image `[3, H_i, W_i]`, target) -> (images, padding_mask, targets).

    images float `[B, 3, H, W]` zero-padded bottom/right; padding_mask bool `[B, H, W]` True = padding;
    targets the list of B target dicts unchanged (boxes normalized cxcywh of each unpadded image).
    """
    images, padding_mask = pad_images([image for image, _ in batch])
    return images, padding_mask, [target for _, target in batch]
