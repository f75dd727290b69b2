"""Helpers for the data tests: write tiny COCO-format sets and images into a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def solid_image(width: int, height: int, color=(90, 90, 90)) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def write_coco_json(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def write_small_set(root: Path) -> tuple[Path, Path]:
    """Three images, non-contiguous and unsorted category ids (9, 1, 5), a crowd object, an empty image.

    image 1  a.jpg 64x48: box [8, 4, 16, 20] cat 5 (ann 10), box [40, 24, 20, 20] cat 9 (ann 11),
                          crowd box [0, 0, 10, 10] cat 5 (ann 12)
    image 2  b.png 32x32: no annotations
    image 3  c.jpg 40x30: box [2, 3, 10, 12] cat 1 (ann 13)
    """
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    solid_image(64, 48).save(images_dir / "a.jpg")
    solid_image(32, 32).save(images_dir / "b.png")
    solid_image(40, 30).save(images_dir / "c.jpg")
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.png", "width": 32, "height": 32},
        {"id": 3, "file_name": "c.jpg", "width": 40, "height": 30},
    ]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 5, "bbox": [8, 4, 16, 20], "iscrowd": 0, "area": 320},
        {"id": 11, "image_id": 1, "category_id": 9, "bbox": [40, 24, 20, 20], "iscrowd": 0, "area": 400},
        {"id": 12, "image_id": 1, "category_id": 5, "bbox": [0, 0, 10, 10], "iscrowd": 1, "area": 100},
        {"id": 13, "image_id": 3, "category_id": 1, "bbox": [2, 3, 10, 12], "iscrowd": 0, "area": 120},
    ]
    categories = [{"id": 9, "name": "nine"}, {"id": 1, "name": "one"}, {"id": 5, "name": "five"}]
    return images_dir, write_coco_json(root / "annotations.json", images, annotations, categories)


def unnormalize(image) -> np.ndarray:
    """Float `[3, H, W]` ImageNet-normalized tensor -> uint8-range float array `[H, W, 3]`."""
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    return ((image.numpy() * std + mean) * 255.0).transpose(1, 2, 0)
