"""Bounding-box-aware augmentation on albumentations: DETR's recipe, or RT-DETR's (`augment.policy`).

DETR (`policy: detr`, the default). Training (`build_train_transform`):
    horizontal flip (p = hflip_prob), then either (p = 1 - crop_prob)
        multi-scale resize: shorter side to one of `train_scales`, longer side capped at `max_size`
    or (p = crop_prob)
        resize to one of `crop_resize_scales` (same rule) -> random crop of h, w each uniform in
        [crop_min_size, min(side, crop_max_size)] -> the multi-scale resize;
    then ImageNet normalization. Boxes are cropped with the image; boxes with no area left are dropped.
Evaluation (`build_eval_transform`): shorter side to `eval_size`, longer side capped at `eval_max_size`.

RT-DETR (`policy: rtdetr`; lyuwenyu/RT-DETR rtdetrv2_pytorch, configs/rtdetrv2/include/dataloader.yml,
whose ops are torchvision.transforms.v2's). Training, in the official order:
    RandomPhotometricDistort (each colour operation p = photometric_prob) -> RandomZoomOut (fill 0,
    canvas side in [1, zoom_out_max] x the image's, p = zoom_out_prob) -> RandomIoUCrop (SSD's
    minimum-IoU crop, p = iou_crop_prob) -> horizontal flip (p = hflip_prob) -> resize to
    square_size x square_size (aspect ratio not kept); boxes narrower or shorter than 1 pixel are
    dropped (the official SanitizeBoundingBoxes(min_size=1) after the crop and after the resize);
    then mean / std (the official recipe: mean 0, std 1, i.e. pixels / 255). From epoch `stop_epoch`
    on (`StopEpochTransform`) the distortion, zoom-out and IoU crop are left out (the official
    `policy: {name: stop_epoch, ops: [RandomPhotometricDistort, RandomZoomOut, RandomIoUCrop]}`);
    before epoch `start_epoch` as well (DEIM's four-stage policy, whose first stage leaves them out).
    The multi-scale part (a side from `square_scales` per batch) is the collate's:
    `detr_lab.data.collate.SquareMultiScaleCollate`.
Evaluation: resize to square_size x square_size, then mean / std. Boxes are normalized to the
resized image, so a prediction maps back to the original image by x * orig_w, y * orig_h
(`detr_lab.models.postprocess.PostProcess`).

DEIM's mosaic (`augment.mosaic`, either policy; `detr_lab.data.mosaic`): within its epochs a sample
may become a mosaic of four images with a random affine, then the policy's ops without the zoom-out and
IoU crop (the official rule: `Mosaic` and `RandomZoomOut` / `RandomIoUCrop` never meet in one sample).

Every pipeline is a `DetectionTransform` (RT-DETR's training one a `StopEpochTransform` of two, one with
a mosaic a `MosaicTransform`; all called alike): `(image uint8 [H, W, 3], boxes [N, 4] absolute xyxy pixels,
labels int64 [N]) -> (image float32 [3, H', W'], boxes float32 [N', 4] normalized cxcywh in [0, 1],
labels int64 [N'])`.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from typing import Any

import albumentations as A
import albumentations.augmentations.pixel.functional as fpixel
import cv2
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.core.transforms_interface import DualTransform, ImageOnlyTransform
from PIL import Image
from torch import Tensor

from detr_lab.boxes import xyxy_to_cxcywh
from detr_lab.config import AugmentConfig
from detr_lab.data.mosaic import MosaicTransform, mosaic_affine

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# After a crop, a box narrower or shorter than this many pixels has no area left and is dropped.
MIN_BOX_SIDE = 0.01
# The rtdetr policy's: the official SanitizeBoundingBoxes(min_size=1) drops boxes under 1 pixel.
RTDETR_MIN_BOX_SIDE = 1.0


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


# --------------------------------------------------------------------------------- RT-DETR's ops
# The official pipeline runs torchvision.transforms.v2 on PIL images; these are the same operations
# with the same parameters and draws as albumentations transforms (albumentations has no equivalent
# of SSD's photometric distortion order, zoom-out or minimum-IoU crop).


class RandomPhotometricDistort(ImageOnlyTransform):
    """SSD's photometric distortion, as torchvision.transforms.v2.RandomPhotometricDistort (defaults).

    Each operation is drawn independently with probability `p`: brightness factor uniform in
    `brightness`, contrast in `contrast`, saturation in `saturation`, hue shift in `hue` (fraction of
    the hue circle), and a random permutation of the channels. Order: brightness, contrast (before or
    after the next two, each with probability 1/2), saturation, hue, channel permutation. The colour
    operations are albumentations' torchvision-compatible ones (those of `A.ColorJitter`) on uint8
    `[H, W, 3]` RGB images, hue on float HSV: within a grey level of torchvision's tensor kernels
    (the official pipeline's PIL kernels round hue through uint8 HSV and differ by a few levels).
    """

    def __init__(
        self,
        brightness: tuple[float, float] = (0.875, 1.125),
        contrast: tuple[float, float] = (0.5, 1.5),
        saturation: tuple[float, float] = (0.5, 1.5),
        hue: tuple[float, float] = (-0.05, 0.05),
        p: float = 0.5,
    ) -> None:
        super().__init__(p=1.0)  # `p` is per operation, as torchvision's; the transform always runs
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if not -0.5 <= hue[0] <= hue[1] <= 0.5:
            raise ValueError(f"hue must satisfy -0.5 <= min <= max <= 0.5, got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.distort_prob = float(p)

    def _maybe(self, low: float, high: float) -> float | None:
        return self.py_random.uniform(low, high) if self.py_random.random() < self.distort_prob else None

    def get_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "brightness_factor": self._maybe(*self.brightness),
            "contrast_factor": self._maybe(*self.contrast),
            "saturation_factor": self._maybe(*self.saturation),
            "hue_factor": self._maybe(*self.hue),
            "contrast_before": self.py_random.random() < 0.5,
        }
        permute = self.py_random.random() < self.distort_prob
        params["channel_permutation"] = self.py_random.sample(range(3), 3) if permute else None
        return params

    def apply(
        self,
        img: np.ndarray,
        brightness_factor: float | None = None,
        contrast_factor: float | None = None,
        saturation_factor: float | None = None,
        hue_factor: float | None = None,
        contrast_before: bool = True,
        channel_permutation: Sequence[int] | None = None,
        **params: Any,
    ) -> np.ndarray:
        if brightness_factor is not None:
            img = fpixel.adjust_brightness_torchvision(img, brightness_factor)
        if contrast_factor is not None and contrast_before:
            img = fpixel.adjust_contrast_torchvision(img, contrast_factor)
        if saturation_factor is not None:
            img = fpixel.adjust_saturation_torchvision(img, saturation_factor)
        if hue_factor is not None:  # on float HSV: OpenCV's uint8 HSV (hue in 180 steps) is coarser
            shifted = fpixel.adjust_hue_torchvision(img.astype(np.float32) / 255.0, hue_factor)
            img = np.clip(np.rint(shifted * 255.0), 0, 255).astype(np.uint8)
        if contrast_factor is not None and not contrast_before:
            img = fpixel.adjust_contrast_torchvision(img, contrast_factor)
        if channel_permutation is not None:
            img = np.ascontiguousarray(img[..., list(channel_permutation)])
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast", "saturation", "hue")


class RandomZoomOut(DualTransform):
    """SSD's zoom-out, as torchvision.transforms.v2.RandomZoomOut: place the image on a `fill` canvas.

    With probability `p`: r uniform in `side_range`, canvas (int(h * r), int(w * r)), the image at
    (left, top) = (int((canvas_w - w) * u), int((canvas_h - h) * v)), u, v uniform in [0, 1). Boxes
    move with the image (their pixel size is unchanged).
    """

    def __init__(self, fill: int = 0, side_range: tuple[float, float] = (1.0, 4.0), p: float = 0.5) -> None:
        super().__init__(p=p)
        if not 1.0 <= side_range[0] <= side_range[1]:
            raise ValueError(f"side_range must satisfy 1 <= min <= max, got {side_range}")
        self.fill = fill
        self.side_range = (float(side_range[0]), float(side_range[1]))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        r = self.side_range[0] + self.py_random.random() * (self.side_range[1] - self.side_range[0])
        canvas_height, canvas_width = int(height * r), int(width * r)
        left = int((canvas_width - width) * self.py_random.random())
        top = int((canvas_height - height) * self.py_random.random())
        return {"canvas_shape": (canvas_height, canvas_width), "offset": (left, top)}

    def apply(
        self, img: np.ndarray, canvas_shape: tuple[int, int], offset: tuple[int, int], **params: Any
    ) -> np.ndarray:
        canvas = np.full((*canvas_shape, *img.shape[2:]), self.fill, dtype=img.dtype)
        left, top = offset
        canvas[top : top + img.shape[0], left : left + img.shape[1]] = img
        return canvas

    def apply_to_bboxes(
        self, bboxes: np.ndarray, canvas_shape: tuple[int, int], offset: tuple[int, int], **params: Any
    ) -> np.ndarray:
        # albumentations' boxes: normalized xyxy (+ label columns), relative to the current image.
        height, width = params["shape"][:2]
        canvas_height, canvas_width = canvas_shape
        moved = bboxes.copy()
        moved[:, [0, 2]] = (bboxes[:, [0, 2]] * width + offset[0]) / canvas_width
        moved[:, [1, 3]] = (bboxes[:, [1, 3]] * height + offset[1]) / canvas_height
        return moved

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("fill", "side_range")


IOU_CROP_OPTIONS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # torchvision's default sampler_options


class RandomIoUCrop(BaseCrop):
    """SSD's minimum-IoU crop, as torchvision.transforms.v2.RandomIoUCrop with RT-DETR's `p`.

    With probability `p`: draw a minimum IoU from `sampler_options` (>= 1: leave the image as it is);
    then up to `trials` times draw a window with sides int(w * s_w), int(h * s_h), s uniform in
    [min_scale, max_scale], aspect w / h in [min_aspect_ratio, max_aspect_ratio], at a uniform
    position, and accept it when some box has its centre strictly inside and such a box has IoU >=
    the minimum with the window; after `trials` failures draw a new minimum. The image is cropped to
    the window; boxes whose centre is outside it are dropped, the others clipped to it. An image
    without boxes is left as it is (torchvision's loop ends there too, on the "leave" option).
    """

    def __init__(
        self,
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        min_aspect_ratio: float = 0.5,
        max_aspect_ratio: float = 2.0,
        sampler_options: Sequence[float] = IOU_CROP_OPTIONS,
        trials: int = 40,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if not 0.0 < min_scale <= max_scale <= 1.0:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
        if not any(option >= 1.0 for option in sampler_options) or trials < 1:
            raise ValueError("sampler_options needs a value >= 1 (leave as is) and trials must be >= 1, got "
                             f"{list(sampler_options)}, {trials}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.min_aspect_ratio, self.max_aspect_ratio = float(min_aspect_ratio), float(max_aspect_ratio)
        self.sampler_options = [float(option) for option in sampler_options]
        self.trials = int(trials)

    def _window(self, boxes: np.ndarray, height: int, width: int) -> tuple[int, int, int, int] | None:
        """(left, top, right, bottom) of an accepted window, or None to leave the image as it is."""
        if len(boxes) == 0:
            return None
        centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        while True:
            min_iou = self.py_random.choice(self.sampler_options)
            if min_iou >= 1.0:
                return None
            for _ in range(self.trials):
                scale_w = self.min_scale + (self.max_scale - self.min_scale) * self.py_random.random()
                scale_h = self.min_scale + (self.max_scale - self.min_scale) * self.py_random.random()
                new_w, new_h = int(width * scale_w), int(height * scale_h)
                if new_w < 1 or new_h < 1:
                    continue
                if not self.min_aspect_ratio <= new_w / new_h <= self.max_aspect_ratio:
                    continue
                left = int((width - new_w) * self.py_random.random())
                top = int((height - new_h) * self.py_random.random())
                right, bottom = left + new_w, top + new_h
                inside = (left < centre_x) & (centre_x < right) & (top < centre_y) & (centre_y < bottom)
                if not inside.any():
                    continue
                overlap_w = np.minimum(boxes[inside, 2], right) - np.maximum(boxes[inside, 0], left)
                overlap_h = np.minimum(boxes[inside, 3], bottom) - np.maximum(boxes[inside, 1], top)
                overlap = overlap_w.clip(0) * overlap_h.clip(0)
                iou = overlap / (areas[inside] + new_w * new_h - overlap)
                if iou.max() < min_iou:
                    continue
                return left, top, right, bottom

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        boxes = np.asarray(data.get("bboxes", np.zeros((0, 4))), dtype=np.float64)
        boxes = boxes[:, :4] if boxes.size else np.zeros((0, 4))  # normalized xyxy (+ label columns)
        pixels = boxes * np.array([width, height, width, height], dtype=np.float64)
        window = self._window(pixels, height, width)
        if window is None:
            return {"crop_coords": (0, 0, width, height), "cropped": False}
        return {"crop_coords": window, "cropped": True}

    def apply_to_bboxes(
        self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int], cropped: bool = False,
        **params: Any,
    ) -> np.ndarray:
        if cropped and len(bboxes):
            height, width = params["shape"][:2]
            left, top, right, bottom = crop_coords
            centre_x = (bboxes[:, 0] + bboxes[:, 2]) / 2 * width
            centre_y = (bboxes[:, 1] + bboxes[:, 3]) / 2 * height
            inside = (left < centre_x) & (centre_x < right) & (top < centre_y) & (centre_y < bottom)
            bboxes = bboxes[inside]
        return super().apply_to_bboxes(bboxes, crop_coords, **params)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_scale", "max_scale", "min_aspect_ratio", "max_aspect_ratio", "sampler_options", "trials")


class SquareResize(DualTransform):
    """Resize to `size` x `size` (aspect ratio not kept), as torchvision.transforms.v2.Resize([size,
    size]) on a PIL image in the official pipeline: PIL's bilinear filter (which antialiases when
    shrinking). Boxes are normalized inside albumentations, so they are unchanged."""

    def __init__(self, size: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size = int(size)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        if img.shape[:2] == (self.size, self.size):
            return img
        return np.asarray(Image.fromarray(img).resize((self.size, self.size), Image.BILINEAR))

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size",)


class DetectionTransform:
    """Geometric albumentations transforms + normalization, on (image, xyxy boxes, labels).

    Call: `(image uint8 [H, W, 3], boxes [N, 4] absolute xyxy pixels, labels int [N])` ->
    `(image float32 [3, H', W'] normalized with mean/std, boxes float32 [N', 4] normalized cxcywh
    in [0, 1] of the output image, labels int64 [N'])`. Boxes cropped away are dropped with their labels,
    and so are boxes narrower or shorter than `min_box_side` pixels after any step (clipped to the
    image first).

    All random draws come from one generator pair shared by the nested transforms, so that
    `set_random_seed` makes the whole pipeline reproducible without correlating its steps.
    """

    def __init__(
        self,
        geometric: Sequence[A.BasicTransform | A.BaseCompose],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int | None = None,
        min_box_side: float = MIN_BOX_SIDE,
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
                    min_width=min_box_side,
                    min_height=min_box_side,
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


class StopEpochTransform:
    """Two pipelines switched by the epoch: `augmenting` in [`start_epoch`, `stop_epoch`), else `final`.

    RT-DETR's `stop_epoch` policy (the official `Compose` skips the listed ops when the dataset's
    epoch >= the policy's epoch); `start_epoch` is DEIM's first stage (its `Compose` also skips them
    while the epoch is below the first of its three policy epochs). The dataset tells the epoch of
    each sample read with an `(epoch, index)` key through `set_epoch`
    (`detr_lab.data.coco.CocoDetectionDataset`); the epoch travels with the sample key, so DataLoader
    workers (persistent or not) and resumed runs see the epoch of the sampler, which Lightning sets
    from `trainer.current_epoch`. Epoch None (a sample read by plain index), or both bounds None:
    `augmenting`.
    Call and `set_random_seed` as `DetectionTransform` (both pipelines get the same seed).
    """

    def __init__(
        self, augmenting: DetectionTransform, final: DetectionTransform, stop_epoch: int | None,
        start_epoch: int | None = None,
    ) -> None:
        for name, value in (("stop_epoch", stop_epoch), ("start_epoch", start_epoch)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        self.augmenting, self.final, self.stop_epoch = augmenting, final, stop_epoch
        self.start_epoch = start_epoch
        self.epoch: int | None = None

    def set_epoch(self, epoch: int | None) -> None:
        """The training epoch of the next samples (0-based; None: unknown)."""
        self.epoch = epoch

    @property
    def stopped(self) -> bool:
        """True when the next sample goes through `final` (epoch >= stop_epoch)."""
        return self.stop_epoch is not None and self.epoch is not None and self.epoch >= self.stop_epoch

    @property
    def not_started(self) -> bool:
        """True when the next sample's epoch is below `start_epoch` (it goes through `final`)."""
        return self.start_epoch is not None and self.epoch is not None and self.epoch < self.start_epoch

    def set_random_seed(self, seed: int | None) -> None:
        self.augmenting.set_random_seed(seed)
        self.final.set_random_seed(seed)

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
    ) -> tuple[Tensor, Tensor, Tensor]:
        return (self.final if self.stopped or self.not_started else self.augmenting)(image, boxes, labels)


def eval_resized_size(height: int, width: int, aug: AugmentConfig) -> tuple[int, int]:
    """(h, w) of an image of (height, width) after the evaluation transform of `aug.policy`."""
    if aug.policy == "rtdetr":
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got (h, w) = ({height}, {width})")
        return aug.square_size, aug.square_size
    return shorter_side_size(height, width, aug.eval_size, aug.eval_max_size)


def build_train_transform(
    aug: AugmentConfig, seed: int | None = None
) -> DetectionTransform | StopEpochTransform | MosaicTransform:
    """The training pipeline of `aug.policy` (see the module docstring): a `DetectionTransform` for
    detr, a `StopEpochTransform` for rtdetr; with `aug.mosaic.prob` > 0 a `MosaicTransform` around it."""
    base = _rtdetr_train_transform(aug, seed) if aug.policy == "rtdetr" else _detr_train_transform(aug, seed)
    if aug.mosaic.prob == 0:
        return base
    return _with_mosaic(base, aug, seed)


def _detr_geometric(aug: AugmentConfig) -> list[A.BasicTransform | A.BaseCompose]:
    """DETR's flip, then multi-scale resize or resized crop (see the module docstring)."""
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
    return [A.HorizontalFlip(p=aug.hflip_prob), scale_or_crop]


def _detr_train_transform(aug: AugmentConfig, seed: int | None) -> DetectionTransform:
    return DetectionTransform(_detr_geometric(aug), mean=aug.mean, std=aug.std, seed=seed)


def _rtdetr_train_transform(aug: AugmentConfig, seed: int | None) -> StopEpochTransform:
    """RT-DETR's training ops (official order and parameters); the first three stop at `stop_epoch`."""

    def pipeline(with_stopping_ops: bool) -> DetectionTransform:
        stopping: list[A.BasicTransform] = [
            RandomPhotometricDistort(p=aug.photometric_prob),
            RandomZoomOut(fill=0, side_range=(1.0, aug.zoom_out_max), p=aug.zoom_out_prob),
            RandomIoUCrop(p=aug.iou_crop_prob),
        ]
        ops = [*(stopping if with_stopping_ops else []), A.HorizontalFlip(p=aug.hflip_prob),
               SquareResize(aug.square_size)]
        return DetectionTransform(
            ops, mean=aug.mean, std=aug.std, seed=seed, min_box_side=RTDETR_MIN_BOX_SIDE
        )

    return StopEpochTransform(pipeline(True), pipeline(False), aug.stop_epoch, aug.start_epoch)


def _with_mosaic(base: DetectionTransform | StopEpochTransform, aug: AugmentConfig,
                 seed: int | None) -> MosaicTransform:
    """DEIM's mosaic around `base`. A mosaic sample: the affine, then for rtdetr the distortion, flip
    and square resize (zoom-out and IoU crop left out, the official rule), for detr DETR's ops. The
    window is the mosaic's own, within [start_epoch, stop_epoch) of the rtdetr policy."""
    m = aug.mosaic
    affine = mosaic_affine(m.degrees, m.translate, m.scale, m.fill)
    if aug.policy == "rtdetr":
        ops = [affine, RandomPhotometricDistort(p=aug.photometric_prob), A.HorizontalFlip(p=aug.hflip_prob),
               SquareResize(aug.square_size)]
        mosaic = DetectionTransform(ops, mean=aug.mean, std=aug.std, seed=seed,
                                    min_box_side=RTDETR_MIN_BOX_SIDE)
    else:
        mosaic = DetectionTransform([affine, *_detr_geometric(aug)], mean=aug.mean, std=aug.std, seed=seed)
    start = max(m.start_epoch, aug.start_epoch or 0)
    stops = [epoch for epoch in (m.stop_epoch, aug.stop_epoch) if epoch is not None]
    return MosaicTransform(base, mosaic, prob=m.prob, start_epoch=start, stop_epoch=min(stops, default=None),
                           output_size=m.output_size, fill=m.fill)


def build_eval_transform(aug: AugmentConfig) -> DetectionTransform:
    """Evaluation: detr: shorter side to `eval_size`, longer side <= `eval_max_size`; rtdetr: resize to
    `square_size` x `square_size`; then normalization (see the module docstring)."""
    if aug.policy == "rtdetr":
        return DetectionTransform([SquareResize(aug.square_size)], mean=aug.mean, std=aug.std)
    resize = ShorterSideResize([aug.eval_size], aug.eval_max_size)
    return DetectionTransform([resize], mean=aug.mean, std=aug.std)
