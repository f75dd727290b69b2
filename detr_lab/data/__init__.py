"""Data pipeline: COCO- and YOLO-format datasets, DETR or RT-DETR augmentation (`augment.policy`) with
DEIM's mosaic and mixup as options, padding and multi-scale collates, synthetic shapes set; the dataset
doctor is `detr_lab.data.doctor`.

Boxes leave this package as normalized cxcywh, images padded with `padding_mask` True = padding.
May import `detr_lab.config` and the leaves (`files`, `errors`, `io`, `boxes`) only; the later
packages (checkpoints, visualize, engine, export, predict, benchmark) and the tools import it, models
never do.
`DetectionDataModule` (Lightning) lives in `detr_lab.data.datamodule` and is not re-exported, so
the rest loads without Lightning.
"""

from __future__ import annotations

from detr_lab.data.coco import CocoDetectionDataset, RawSample, read_categories, read_coco_json
from detr_lab.data.collate import collate_detection, pad_images
from detr_lab.data.errors import AnnotationWarning, CorruptImageError, DatasetError, MissingImageError
from detr_lab.data.images import load_rgb_image
from detr_lab.data.synthetic import (
    SYNTHETIC_CATEGORY_IDS,
    SYNTHETIC_CLASS_NAMES,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
)
from detr_lab.data.transforms import DetectionTransform, build_eval_transform, build_train_transform
from detr_lab.data.yolo import YoloDetectionDataset, yolo_split_to_coco

__all__ = [
    "AnnotationWarning",
    "CocoDetectionDataset",
    "CorruptImageError",
    "DatasetError",
    "DetectionTransform",
    "MissingImageError",
    "RawSample",
    "SYNTHETIC_CATEGORY_IDS",
    "SYNTHETIC_CLASS_NAMES",
    "YoloDetectionDataset",
    "build_eval_transform",
    "build_train_transform",
    "collate_detection",
    "ensure_synthetic_dataset",
    "generate_synthetic_dataset",
    "load_rgb_image",
    "pad_images",
    "read_categories",
    "read_coco_json",
    "yolo_split_to_coco",
]

