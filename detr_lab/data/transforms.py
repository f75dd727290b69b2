"""Bounding-box-aware augmentation on albumentations, following the DETR training recipe.

Training (`build_train_transform`):
    horizontal flip (p = hflip_prob), then either (p = 1 - crop_prob)
        multi-scale resize: shorter side to one of `train_scales`, longer side capped at `max_size`
    or (p = crop_prob)
        resize to one of `crop_resize_scales` (same rule) -> random crop of h, w each uniform in
        [crop_min_size, min(side, crop_max_size)] -> the multi-scale resize;
    then ImageNet normalization. Boxes are cropped with the image; boxes with no area left are dropped.
Evaluation (`build_eval_transform`): shorter side to `eval_size`, longer side capped at `eval_max_size`.

Every pipeline is a `DetectionTransform`: `(image uint8 [H, W, 3], boxes [N, 4] absolute xyxy pixels,
labels int64 [N]) -> (image float32 [3, H', W'], boxes float32 [N', 4] normalized cxcywh in [0, 1],
labels int64 [N'])`.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.core.transforms_interface import DualTransform
from torch import Tensor

from detr_lab.boxes import xyxy_to_cxcywh
from detr_lab.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# After a crop, a box narrower or shorter than this many pixels has no area left and is dropped.
MIN_BOX_SIDE = 0.01


def shorter_side_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (h, w) when the shorter side goes to `size` and the longer side stays <= `max_size`.

    DETR's rule (official `datasets/transforms.py`, `get_size_with_aspect_ratio`): if the longer side
    would exceed `max_size`, the shorter side becomes round(max_size * short / long) instead; the longer
    side is then truncated to an integer. Two guarantees are added for very elongated images, where the
    rule alone gives a side of 0 (20000 x 20) or a longer side above the cap ((3, 700) -> (1, 233) with
    max_size 128): every side is at least 1 pixel, and the longer side never exceeds `max_size`
    (aspect ratio is then not kept exactly). Ordinary images get exactly DETR's sizes.

    Raises:
        ValueError: a side, `size` or `max_size` that is not a positive integer.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got (h, w) = ({height}, {width})")
    if size < 1 or (max_size is not None and max_size < 1):
        raise ValueError(f"size and max_size must be positive, got size={size}, max_size={max_size}")
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size and (max_size is None or long <= max_size):
        return height, width
    size = max(1, size)
    new_long = int(size * long / short)
    if max_size is not None:
        new_long = min(new_long, max_size)
    new_long = max(size, new_long)
    if width < height:
        return new_long, size
    return size, new_long


def _check_sizes(name: str, values: Sequence[int]) -> list[int]:
    values = [int(v) for v in values]
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{name} must be a non-empty list of positive sizes, got {values}")
    return values


class ShorterSideResize(DualTransform):
    """Resize so the shorter side is one of `scales` (drawn uniformly), the longer side <= `max_size`.

    Boxes are stored normalized inside albumentations, so a resize leaves them unchanged.
    """

    def __init__(
        self,
        scales: Sequence[int],
        max_size: int | None = None,
        interpolation: int = cv2.INTER_LINEAR,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.scales = _check_sizes("scales", scales)
        if max_size is not None and max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size}")
        self.max_size = max_size
        self.interpolation = interpolation

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        size = self.py_random.choice(self.scales)
        return {"target_shape": shorter_side_size(height, width, size, self.max_size)}

    def apply(self, img: np.ndarray, target_shape: tuple[int, int], **params: Any) -> np.ndarray:
        if img.shape[:2] == tuple(target_shape):
            return img
        return cv2.resize(img, (target_shape[1], target_shape[0]), interpolation=self.interpolation)

    def apply_to_mask(self, mask: np.ndarray, target_shape: tuple[int, int], **params: Any) -> np.ndarray:
        if mask.shape[:2] == tuple(target_shape):
            return mask
        return cv2.resize(mask, (target_shape[1], target_shape[0]), interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes

    def apply_to_keypoints(
        self, keypoints: np.ndarray, target_shape: tuple[int, int], shape: tuple[int, ...], **params: Any
    ) -> np.ndarray:
        scaled = keypoints.astype(np.float32, copy=True)
        scaled[:, 0] *= target_shape[1] / shape[1]
        scaled[:, 1] *= target_shape[0] / shape[0]
        return scaled

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scales", "max_size", "interpolation")


class RandomSizeCrop(BaseCrop):
    """Crop a random window of h, w each uniform in [min_size, min(side, max_size)] at a uniform position.

    Where a side is shorter than `min_size`, the whole side is kept.
    """

    def __init__(self, min_size: int, max_size: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        if min_size <= 0 or max_size < min_size:
            raise ValueError(f"need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def _side(self, length: int) -> int:
        high = min(length, self.max_size)
        return self.py_random.randint(min(self.min_size, high), high)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        crop_height, crop_width = self._side(height), self._side(width)
        top = self.py_random.randint(0, height - crop_height)
        left = self.py_random.randint(0, width - crop_width)
        return {"crop_coords": (left, top, left + crop_width, top + crop_height)}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_size", "max_size")


class DetectionTransform:
    """Geometric albumentations transforms + normalization, on (image, xyxy boxes, labels).

    Call: `(image uint8 [H, W, 3], boxes [N, 4] absolute xyxy pixels, labels int [N])` ->
    `(image float32 [3, H', W'] normalized with mean/std, boxes float32 [N', 4] normalized cxcywh
    in [0, 1] of the output image, labels int64 [N'])`. Boxes cropped away are dropped with their labels.

    All random draws come from one generator pair shared by the nested transforms, so that
    `set_random_seed` makes the whole pipeline reproducible without correlating its steps.
    """

    def __init__(
        self,
        geometric: Sequence[A.BasicTransform | A.BaseCompose],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int | None = None,
    ) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (R, G, B), got mean={list(mean)}, std={list(std)}")
        with warnings.catch_warnings():
            # Without geometric transforms albumentations warns that no transform processes the boxes;
            # they then pass through unchanged, which is what is wanted.
            warnings.filterwarnings("ignore", message="Got processor for bboxes, but no transform")
            self.pipeline = A.Compose(
                [*geometric, A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0, p=1.0)],
                bbox_params=A.BboxParams(
                    format="pascal_voc",
                    label_fields=["labels"],
                    min_width=MIN_BOX_SIDE,
                    min_height=MIN_BOX_SIDE,
                    clip=True,
                ),
            )
        self.set_random_seed(seed)

    def set_random_seed(self, seed: int | None) -> None:
        """Reseed every random draw of the pipeline (None: fresh OS entropy)."""
        self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
    ) -> tuple[Tensor, Tensor, Tensor]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
        out = self.pipeline(image=image, bboxes=boxes, labels=labels)
        result = out["image"]  # [H', W', 3] float32
        height, width = result.shape[:2]
        xyxy = torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4))
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        normalized = xyxy_to_cxcywh((xyxy / scale).clamp(0.0, 1.0))
        image_tensor = torch.from_numpy(np.ascontiguousarray(result.transpose(2, 0, 1)))  # [3, H', W']
        labels_out = torch.as_tensor(np.asarray(out["labels"], dtype=np.int64).reshape(-1))
        return image_tensor, normalized, labels_out


def build_train_transform(aug: AugmentConfig, seed: int | None = None) -> DetectionTransform:
    """The DETR training pipeline from `aug` (see the module docstring)."""
    multi_scale = ShorterSideResize(aug.train_scales, aug.max_size)
    crop_branch = A.Sequential(
        [
            ShorterSideResize(aug.crop_resize_scales, aug.max_size),
            RandomSizeCrop(aug.crop_min_size, aug.crop_max_size),
            ShorterSideResize(aug.train_scales, aug.max_size),
        ],
        p=aug.crop_prob,
    )
    scale_or_crop = A.OneOf([A.Sequential([multi_scale], p=1.0 - aug.crop_prob), crop_branch], p=1.0)
    return DetectionTransform(
        [A.HorizontalFlip(p=aug.hflip_prob), scale_or_crop], mean=aug.mean, std=aug.std, seed=seed
    )


def build_eval_transform(aug: AugmentConfig) -> DetectionTransform:
    """Evaluation: shorter side to `eval_size`, longer side <= `eval_max_size`, then normalization."""
    resize = ShorterSideResize([aug.eval_size], aug.eval_max_size)
    return DetectionTransform([resize], mean=aug.mean, std=aug.std)
