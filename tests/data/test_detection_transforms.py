"""Augmentation keeps boxes on their pixels; sizes follow DETR's rules; normalization and output formats."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from coco_test_files import unnormalize

from detr_lab.boxes import cxcywh_to_xyxy
from detr_lab.config import AugmentConfig
from detr_lab.data.transforms import (
    DetectionTransform,
    RandomSizeCrop,
    ShorterSideResize,
    build_eval_transform,
    build_train_transform,
    shorter_side_size,
)

RED, GREEN = (255, 0, 0), (0, 255, 0)


def _two_rectangles() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """120 x 160 black image; a red rectangle (label 0) and a green one (label 1), boxes = their pixels."""
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    image[20:60, 30:90] = RED  # rows 20..59, columns 30..89 -> xyxy [30, 20, 90, 60]
    image[70:110, 100:150] = GREEN  # -> xyxy [100, 70, 150, 110]
    boxes = np.array([[30, 20, 90, 60], [100, 70, 150, 110]], dtype=np.float32)
    return image, boxes, np.array([0, 1])


def _pixel_extent(rgb: np.ndarray, color: tuple[int, int, int]) -> list[float] | None:
    """xyxy extent of the pixels closer to `color` than to black (None if there are none)."""
    channel = int(np.argmax(color))
    others = [c for c in range(3) if c != channel]
    mask = (rgb[..., channel] > 127.5) & (rgb[..., others] < 127.5).all(-1)
    if not mask.any():
        return None
    rows, cols = np.nonzero(mask)
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def _check_boxes_match_pixels(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, tol: float):
    rgb = unnormalize(image)
    height, width = rgb.shape[:2]
    absolute = cxcywh_to_xyxy(boxes) * torch.tensor([width, height, width, height])
    for label, color in ((0, RED), (1, GREEN)):
        extent = _pixel_extent(rgb, color)
        kept = (labels == label).nonzero().flatten().tolist()
        if extent is None or min(extent[2] - extent[0], extent[3] - extent[1]) < tol:
            # Cropped away (or to a sliver): the box must be gone, or be a sliver too.
            assert not kept or (absolute[kept[0], 2:] - absolute[kept[0], :2]).min() <= tol + 1
            continue
        assert len(kept) == 1, f"label {label}: pixels visible at {extent} but {len(kept)} boxes"
        np.testing.assert_allclose(absolute[kept[0]].numpy(), extent, atol=tol)


def test_shorter_side_rule_matches_detr():
    assert shorter_side_size(480, 640, 800, 1333) == (800, 1066)  # 800 * 640 / 480 = 1066.7
    assert shorter_side_size(640, 480, 800, 1333) == (1066, 800)
    # 1000 / 100 * 800 > 1333, so the shorter side becomes round(1333 * 100 / 1000) = 133
    assert shorter_side_size(100, 1000, 800, 1333) == (133, 1330)
    assert shorter_side_size(800, 1000, 800, 1333) == (800, 1000)  # already there
    assert shorter_side_size(100, 1000, 800, None) == (800, 8000)


def test_flip_moves_boxes_with_pixels():
    image, boxes, labels = _two_rectangles()
    out_image, out_boxes, out_labels = DetectionTransform([A.HorizontalFlip(p=1.0)])(image, boxes, labels)
    # Mirrored in a 160-wide image: x -> 160 - x.
    expected = torch.tensor([[70, 20, 130, 60], [10, 70, 60, 110]], dtype=torch.float32)
    torch.testing.assert_close(cxcywh_to_xyxy(out_boxes) * torch.tensor([160, 120, 160, 120]), expected)
    _check_boxes_match_pixels(out_image, out_boxes, out_labels, tol=0.5)


def test_resize_keeps_boxes_on_pixels():
    image, boxes, labels = _two_rectangles()
    transform = DetectionTransform([ShorterSideResize([90])])
    out_image, out_boxes, out_labels = transform(image, boxes, labels)
    assert out_image.shape == (3, 90, 120)
    _check_boxes_match_pixels(out_image, out_boxes, out_labels, tol=1.0)


@pytest.mark.parametrize("seed", range(12))
def test_crop_keeps_boxes_on_pixels_and_drops_cropped_away(seed):
    image, boxes, labels = _two_rectangles()
    transform = DetectionTransform([RandomSizeCrop(70, 70)], seed=seed)
    out_image, out_boxes, out_labels = transform(image, boxes, labels)
    assert out_image.shape == (3, 70, 70)
    _check_boxes_match_pixels(out_image, out_boxes, out_labels, tol=0.01)


def test_crop_sometimes_drops_a_box():
    """Over fixed seeds, 70 x 70 crops of the 160 x 120 image must lose one rectangle at least once."""
    image, boxes, labels = _two_rectangles()
    kept = [len(DetectionTransform([RandomSizeCrop(70, 70)], seed=seed)(image, boxes, labels)[2])
            for seed in range(12)]
    assert min(kept) < 2


def test_crop_sizes_within_bounds():
    transform = DetectionTransform([RandomSizeCrop(30, 50)], seed=0)
    image = np.zeros((100, 40, 3), dtype=np.uint8)
    for _ in range(20):
        out, _, _ = transform(image, np.zeros((0, 4)), np.zeros(0))
        height, width = out.shape[1:]
        assert 30 <= height <= 50 and 30 <= width <= 40


@pytest.mark.parametrize("seed", range(8))
def test_full_training_pipeline_keeps_boxes_on_pixels(seed):
    aug = AugmentConfig(train_scales=[64, 80, 96], max_size=160, hflip_prob=0.5, crop_prob=0.7,
                        crop_resize_scales=[100, 110], crop_min_size=60, crop_max_size=90)
    image, boxes, labels = _two_rectangles()
    out_image, out_boxes, out_labels = build_train_transform(aug, seed=seed)(image, boxes, labels)
    assert min(out_image.shape[1:]) in (64, 80, 96) or max(out_image.shape[1:]) <= 160
    assert ((out_boxes >= 0) & (out_boxes <= 1)).all()
    _check_boxes_match_pixels(out_image, out_boxes, out_labels, tol=2.0)


def test_training_scales_and_flip_frequency():
    aug = AugmentConfig(train_scales=[48, 64], max_size=1000, hflip_prob=0.5, crop_prob=0.0)
    transform = build_train_transform(aug, seed=0)
    image, boxes, labels = _two_rectangles()
    shorter_sides, flips = set(), 0
    for _ in range(60):
        out_image, out_boxes, _ = transform(image, boxes, labels)
        shorter_sides.add(min(out_image.shape[1:]))
        flips += bool(out_boxes[0, 0] > 0.5)  # red box centre moves right of the middle when flipped
    assert shorter_sides == {48, 64}
    assert 15 <= flips <= 45


def test_same_seed_same_augmentation():
    aug = AugmentConfig(train_scales=[48, 64, 80], crop_resize_scales=[90, 100], crop_min_size=40,
                        crop_max_size=80)
    image, boxes, labels = _two_rectangles()
    first, second = build_train_transform(aug, seed=3), build_train_transform(aug, seed=3)
    for _ in range(5):
        a, b = first(image, boxes, labels), second(image, boxes, labels)
        assert a[0].shape == b[0].shape
        torch.testing.assert_close(a[1], b[1])


def test_eval_transform_sizes():
    aug = AugmentConfig(eval_size=60, eval_max_size=100)
    image, boxes, labels = _two_rectangles()
    out_image, out_boxes, out_labels = build_eval_transform(aug)(image, boxes, labels)
    assert out_image.shape == (3, 60, 80)
    _check_boxes_match_pixels(out_image, out_boxes, out_labels, tol=1.0)
    wide = np.zeros((20, 200, 3), dtype=np.uint8)  # 200 / 20 * 60 > 100: capped at 100 wide
    assert build_eval_transform(aug)(wide, np.zeros((0, 4)), np.zeros(0))[0].shape == (3, 10, 100)


def test_normalization_and_output_types():
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    image[:] = (255, 128, 0)
    out_image, out_boxes, out_labels = DetectionTransform([])(image, np.array([[1, 1, 3, 4]]), np.array([7]))
    assert out_image.dtype == torch.float32 and out_image.shape == (3, 4, 5)
    expected = [(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    torch.testing.assert_close(out_image[:, 0, 0], torch.tensor(expected), atol=1e-5, rtol=0)
    # xyxy [1, 1, 3, 4] in 5 x 4 -> cx 2 / 5, cy 2.5 / 4, w 2 / 5, h 3 / 4
    torch.testing.assert_close(out_boxes, torch.tensor([[0.4, 0.625, 0.4, 0.75]]))
    assert out_labels.dtype == torch.int64 and out_labels.tolist() == [7]


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="scales"):
        ShorterSideResize([])
    with pytest.raises(ValueError, match="min_size"):
        RandomSizeCrop(50, 40)
    with pytest.raises(ValueError, match="uint8"):
        DetectionTransform([])(np.zeros((4, 4, 3), dtype=np.float32), np.zeros((0, 4)), np.zeros(0))
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        DetectionTransform([])(np.zeros((4, 4, 3), dtype=np.uint8), np.ones((2, 4)), np.zeros(1))


# (h, w) shapes that made the DETR rule give a side of 0 or a longer side above the cap.
ELONGATED = [(20, 20000), (20000, 20), (1, 700), (700, 2), (3, 2000), (2000, 3), (3, 700), (1, 1), (2, 5000)]


def test_resize_sides_at_least_one_and_long_side_capped_over_many_shapes():
    rng = np.random.default_rng(0)
    shapes = ELONGATED + [tuple(int(v) for v in rng.integers(1, 3000, size=2)) for _ in range(400)]
    for height, width in shapes:
        for size, max_size in ((800, 1333), (64, 128), (64, 96), (1, 1), (32, None), (300, 200)):
            out_h, out_w = shorter_side_size(height, width, size, max_size)
            assert out_h >= 1 and out_w >= 1, (height, width, size, max_size)
            if max_size is not None:
                assert max(out_h, out_w) <= max_size, (height, width, size, max_size, out_h, out_w)
            # the longer side stays the longer (or equal) one
            assert (out_h >= out_w) == (height >= width) or out_h == out_w, (height, width, out_h, out_w)


def test_resize_of_the_reported_shapes():
    assert shorter_side_size(3, 700, 64, 128) == (1, 128)  # was (1, 233): above the cap
    assert shorter_side_size(20, 20000, 64, 96) == (1, 96)  # was (0, 0...): cv2.resize asserted
    assert shorter_side_size(20000, 20, 800, 1333) == (1000, 1)  # 1333 * 20 / 20000 rounds to 1


def test_invalid_sizes_raise():
    with pytest.raises(ValueError, match="image size must be positive"):
        shorter_side_size(0, 10, 64, 128)


@pytest.mark.parametrize("height, width", [(20, 20000), (700, 2), (1, 700), (2000, 3)])
def test_elongated_images_go_through_train_and_eval_pipelines(height, width):
    aug = AugmentConfig(train_scales=[48, 64], max_size=96, crop_prob=0.5, crop_resize_scales=[60, 70],
                        crop_min_size=20, crop_max_size=50, eval_size=64, eval_max_size=96)
    image = np.full((height, width, 3), 80, dtype=np.uint8)
    boxes = np.array([[0, 0, width, height]], dtype=np.float32)
    for transform in (build_train_transform(aug, seed=0), build_eval_transform(aug)):
        for _ in range(4):
            out_image, out_boxes, _ = transform(image, boxes, np.array([0]))
            assert min(out_image.shape[1:]) >= 1 and max(out_image.shape[1:]) <= 96
            assert ((out_boxes >= 0) & (out_boxes <= 1)).all()
