"""Box formats and overlaps.

Inside the model boxes are normalized cxcywh in [0, 1]; at the edges (datasets, predictions written
for users) they are absolute xyxy pixels. All functions take `[..., 4]` tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """`[..., 4]` (cx, cy, w, h) -> `[..., 4]` (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """`[..., 4]` (x0, y0, x1, y1) -> `[..., 4]` (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of `[..., 4]` xyxy boxes."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of xyxy boxes `[N, 4]` x `[M, 4]` -> (`[N, M]`, `[N, M]`)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, *, check: bool = True) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes `[N, 4]` x `[M, 4]` -> `[N, M]`.

    Raises ValueError for boxes with x1 < x0 or y1 < y0, which would give meaningless values. The check
    reads the boxes on the host (a device-to-host synchronization); `check=False` skips it where the
    boxes are valid by construction (cxcywh with non-negative sizes, e.g. the training step's matcher and
    box loss, whose non-finite values the training-health check catches).
    """
    if check and not bool((boxes1[:, 2:] >= boxes1[:, :2]).all() & (boxes2[:, 2:] >= boxes2[:, :2]).all()):
        raise ValueError(
            "generalized_box_iou: boxes must be xyxy with x1 >= x0 and y1 >= y0 (got inverted or NaN boxes)"
        )
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    enclosing = (bottom_right - top_left).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / enclosing
