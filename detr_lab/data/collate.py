"""Batching images of different sizes: zero padding at the bottom and right, plus a padding mask;
RT-DETR's batch multi-scale resize (`SquareMultiScaleCollate`), with DEIM's batch mixup optional."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from detr_lab.data.mixup import BatchMixup


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
    targets the list of B target dicts (boxes normalized cxcywh of each unpadded image), without the
    `epoch` that the dataset adds for epoch-dependent transforms and collates.
    """
    images, padding_mask = pad_images([image for image, _ in batch])
    return images, padding_mask, [{k: v for k, v in target.items() if k != "epoch"} for _, target in batch]


class SquareMultiScaleCollate:
    """Training collate of the rtdetr policy: `collate_detection`, then RT-DETR's batch multi-scale.

    As the official `BatchImageCollateFunction` (rtdetrv2_pytorch src/data/dataloader.py): while the
    batch's epoch is below `stop_epoch` (None: always), the whole batch `[B, 3, S, S]` is resized to
    `[B, 3, s, s]`, s drawn from `scales` (repeats weigh a size), with `F.interpolate`'s default
    nearest-neighbour mode, as the official code does. Boxes are normalized cxcywh of each image, so the
    resize leaves them unchanged; each target's `size` becomes (s, s). The images must all have one
    size (the rtdetr transforms resize every image to `square_size`): there is no padding to resize.

    The epoch is the targets' `epoch` (set by the dataset for samples read with `(epoch, index)` keys,
    see `CocoDetectionDataset`; removed here): it travels with the sample, so DataLoader workers,
    persistent or not, and resumed runs see the sampler's epoch. s is drawn from a generator seeded by
    (seed, epoch, the batch's image ids), so a resumed run draws the sizes of the uninterrupted one.
    Targets without `epoch` count as an epoch before `stop_epoch`.

    With `mixup` (DEIM's, `detr_lab.data.mixup.BatchMixup`) the batch is mixed first, as the official
    DEIM collate does before its resize; mixup draws from its own seeded stream, so the sizes drawn are
    the same with or without it.

    Returns `(images [B, 3, s, s], padding_mask [B, s, s] all False, targets)`.
    Raises:
        ValueError: images of different sizes, or targets of different epochs, in one batch.
    """

    def __init__(
        self, scales: Sequence[int], stop_epoch: int | None = None, seed: int = 0,
        mixup: BatchMixup | None = None,
    ) -> None:
        self.scales = [int(scale) for scale in scales]
        if any(scale < 1 for scale in self.scales):
            raise ValueError(f"scales must be positive sizes, got {self.scales}")
        self.stop_epoch = stop_epoch
        self.seed = int(seed)
        self.mixup = mixup

    def size_for(self, epoch: int | None, image_ids: Sequence[int]) -> int | None:
        """The side this batch is resized to, or None to keep it (no scales, or epoch >= stop_epoch)."""
        stopped = self.stop_epoch is not None and epoch is not None and epoch >= self.stop_epoch
        if not self.scales or stopped:
            return None
        entropy = [self.seed % 2**32, 0 if epoch is None else epoch + 1, *(i % 2**64 for i in image_ids)]
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        return self.scales[int(rng.integers(len(self.scales)))]

    def __call__(
        self, batch: Sequence[tuple[Tensor, dict[str, Tensor]]]
    ) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
        epochs = {int(target["epoch"]) for _, target in batch if "epoch" in target}
        if len(epochs) > 1:
            raise ValueError(f"SquareMultiScaleCollate: one batch holds samples of epochs {sorted(epochs)}")
        batch = [(image, {k: v for k, v in target.items() if k != "epoch"}) for image, target in batch]
        images, padding_mask, targets = collate_detection(batch)
        if padding_mask.any():
            sizes = sorted({tuple(image.shape[1:]) for image, _ in batch})
            raise ValueError(f"SquareMultiScaleCollate: a batch's images must have one size, got {sizes}")
        epoch = epochs.pop() if epochs else None
        size = self.size_for(epoch, [int(t["image_id"]) for t in targets])
        if self.mixup is not None:
            images, targets = self.mixup(images, targets, epoch)
        if size is None or images.shape[-2:] == (size, size):
            return images, padding_mask, targets
        images = F.interpolate(images, size=(size, size))  # nearest, as the official collate
        padding_mask = padding_mask.new_zeros((images.shape[0], size, size))
        for target in targets:
            target["size"] = torch.tensor([size, size], dtype=torch.int64)
        return images, padding_mask, targets
