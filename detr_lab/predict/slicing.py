"""Sliced inference for large images with small objects (SAHI-style), on the `sahi` package's slicing
and merging functions (part of the `export` extra).

    windows = slice_windows(height, width, slice_size=640, overlap=0.2)   # [[x1, y1, x2, y2], ...]
    keep = merge_detections(boxes, scores, labels, method="nms", match_threshold=0.5)

An image is cut into overlapping square windows (`sahi.slicing.get_slice_bboxes`; the last row and
column are shifted inwards so every window has the full size when the image is larger than it), each
window is detected on its own (upscaled by the evaluation transform like any image), its boxes are
moved back into image pixels, the whole image's detections are added (large objects), and the union
is merged class by class (`sahi.postprocess.combine`): "nms" keeps the best box of each overlapping
group, "nmm" (greedy non-maximum merging) replaces it by the smallest box enclosing the group, with
the best score. Overlap is measured as intersection over the smaller box ("IOS"), so that the part
of an object cut by a window border merges with the whole object seen by the next window.
"""

from __future__ import annotations

import numpy as np
import torch

from detr_lab.errors import InputError
from detr_lab.export.dependencies import require

MERGE_METHODS = ("nms", "nmm")
MATCH_METRICS = ("IOS", "IOU")


def check_slicing(slice_size: int, overlap: float, method: str = "nms", match_metric: str = "IOS") -> None:
    """Raise `InputError` naming the bad value (slice size < 32, overlap outside [0, 0.9], unknown method
    or metric)."""
    if slice_size < 32:
        raise InputError(f"slice size must be >= 32 pixels, got {slice_size}")
    if not 0.0 <= overlap <= 0.9:
        raise InputError(f"slice overlap must be in [0, 0.9], got {overlap}")
    if method not in MERGE_METHODS:
        raise InputError(f"slice merge method must be one of {MERGE_METHODS}, got {method!r}")
    if match_metric not in MATCH_METRICS:
        raise InputError(f"slice match metric must be one of {MATCH_METRICS}, got {match_metric!r}")


def slice_windows(height: int, width: int, slice_size: int, overlap: float) -> list[list[int]]:
    """Windows `[x1, y1, x2, y2]` (pixels, x2/y2 exclusive) covering an `height` x `width` image, each
    `slice_size` square (smaller only where the image is), neighbours overlapping by `overlap` of a side.

    Raises:
        MissingExtraError: sahi is not installed. InputError: a bad size or overlap.
    """
    check_slicing(slice_size, overlap)
    slicing = require("sahi.slicing")
    return [[int(v) for v in window] for window in slicing.get_slice_bboxes(
        image_height=height, image_width=width, slice_height=slice_size, slice_width=slice_size,
        auto_slice_resolution=False, overlap_height_ratio=overlap, overlap_width_ratio=overlap,
    )]


def merge_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    method: str = "nms",
    match_metric: str = "IOS",
    match_threshold: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Merge detections of overlapping windows class by class.

    Args:
        boxes: float `[N, 4]` absolute (x1, y1, x2, y2) pixels of one image; scores `[N]`; labels int `[N]`.
        method: "nms" (keep the best of each group) or "nmm" (its enclosing box, the best score).
        match_metric, match_threshold: boxes of one class whose overlap ("IOS": intersection over the
            smaller area; "IOU") reaches the threshold form a group.
    Returns:
        `boxes` `[K, 4]`, `scores` `[K]`, `labels` `[K]`, best first.
    Raises:
        MissingExtraError: sahi is not installed. InputError: a bad method or metric.
    """
    check_slicing(32, 0.0, method, match_metric)
    combine = require("sahi.postprocess.combine")
    if boxes.shape[0] == 0:
        return {"boxes": boxes.reshape(0, 4), "scores": scores.reshape(0), "labels": labels.reshape(0)}
    table = np.concatenate(
        [boxes.numpy().astype(np.float32), scores.numpy()[:, None].astype(np.float32),
         labels.numpy()[:, None].astype(np.float32)], axis=1,
    )
    if method == "nms":
        keep = [int(i) for i in combine.batched_nms(table, match_metric, match_threshold)]
        merged_boxes, merged_scores = boxes[keep], scores[keep]
    else:
        groups = combine.batched_greedy_nmm(table, match_metric, match_threshold)
        keep = list(groups)
        merged_boxes = torch.stack([
            torch.cat((boxes[[k, *members], :2].min(0).values, boxes[[k, *members], 2:].max(0).values))
            for k, members in groups.items()
        ])
        merged_scores = scores[keep]
    order = torch.argsort(merged_scores, descending=True)
    return {"boxes": merged_boxes[order], "scores": merged_scores[order], "labels": labels[keep][order]}
