"""The detection confusion matrix with a background row and column, at one IoU and one score threshold.

    matrix = ConfusionMatrix(num_classes=3)
    matrix.add_image(gt_boxes, gt_labels, det_boxes, det_labels, det_scores)   # per image
    matrix.counts      # int64 [K + 1, K + 1]: rows ground truth, columns prediction, index K background

The usual definition for detectors (as in Ultralytics' and supervision's matrices):
- detections scoring below `score_threshold` are dropped;
- ground-truth and detected boxes are paired one to one regardless of class, greedily by descending
  IoU, among pairs with IoU >= `iou_threshold` (ties keep the earlier detection, then the earlier
  ground-truth box);
- a pair counts at (its ground-truth class, its predicted class): the diagonal holds the correct
  detections, off-diagonal cells the class confusions;
- a ground-truth box left unpaired counts at (its class, background): a miss;
- a detection left unpaired counts at (background, its class): a false positive.
The (background, background) cell stays 0. Crowd annotations are left out of the ground truth.
Neither torchmetrics (classification matrices only) nor supervision (which would add OpenCV) is used.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

from detr_lab.errors import InputError

__all__ = ["ConfusionMatrix", "match_one_to_one"]


def match_one_to_one(iou: torch.Tensor, iou_threshold: float) -> list[tuple[int, int]]:
    """Greedy one-to-one pairs `(gt index, detection index)` of an IoU matrix `[G, D]`: pairs with IoU at
    least `iou_threshold`, taken by descending IoU (stable: row-major order breaks ties)."""
    rows, cols = torch.nonzero(iou >= iou_threshold, as_tuple=True)
    if rows.numel() == 0:
        return []
    values = iou[rows, cols]
    order = torch.sort(-values, stable=True).indices
    used_gt: set[int] = set()
    used_det: set[int] = set()
    pairs = []
    for index in order.tolist():
        gt, det = int(rows[index]), int(cols[index])
        if gt in used_gt or det in used_det:
            continue
        used_gt.add(gt)
        used_det.add(det)
        pairs.append((gt, det))
    return pairs


class ConfusionMatrix:
    """Counts of ground truth x prediction over images, with background as the last row and column.

    Args:
        num_classes: K; class indices are `0..K-1`, index K is background.
        iou_threshold: the least IoU of a pair (in (0, 1]).
        score_threshold: the least score of a detection that is counted (in [0, 1]).
    Raises:
        InputError: a threshold out of range.
    """

    def __init__(self, num_classes: int, *, iou_threshold: float = 0.5, score_threshold: float = 0.3):
        if not 0.0 < iou_threshold <= 1.0:
            raise InputError(f"confusion matrix IoU threshold {iou_threshold} is not in (0, 1]")
        if not 0.0 <= score_threshold <= 1.0:
            raise InputError(f"confusion matrix score threshold {score_threshold} is not in [0, 1]")
        self.num_classes = int(num_classes)
        self.iou_threshold = float(iou_threshold)
        self.score_threshold = float(score_threshold)
        self.counts = np.zeros((self.num_classes + 1, self.num_classes + 1), dtype=np.int64)

    def add_image(
        self,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        det_boxes: torch.Tensor,
        det_labels: torch.Tensor,
        det_scores: torch.Tensor,
    ) -> None:
        """Count one image.

        Args:
            gt_boxes: float `[G, 4]` absolute (x1, y1, x2, y2); gt_labels: int `[G]` class indices.
            det_boxes: float `[D, 4]` absolute (x1, y1, x2, y2), same pixels as the ground truth;
            det_labels: int `[D]` class indices; det_scores: float `[D]`.
        Raises:
            InputError: a class index outside `[0, num_classes)`.
        """
        keep = det_scores >= self.score_threshold
        det_boxes, det_labels = det_boxes[keep].reshape(-1, 4).float(), det_labels[keep].long()
        gt_boxes, gt_labels = gt_boxes.reshape(-1, 4).float(), gt_labels.long()
        for name, labels in (("ground-truth", gt_labels), ("detection", det_labels)):
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise InputError(f"confusion matrix: a {name} class index is outside [0, {self.num_classes})")
        background = self.num_classes
        iou = box_iou(gt_boxes, det_boxes) if len(gt_boxes) and len(det_boxes) else torch.zeros(0, 0)
        pairs = match_one_to_one(iou, self.iou_threshold)
        paired_gt = {gt for gt, _ in pairs}
        paired_det = {det for _, det in pairs}
        for gt, det in pairs:
            self.counts[int(gt_labels[gt]), int(det_labels[det])] += 1
        for gt in range(len(gt_labels)):
            if gt not in paired_gt:
                self.counts[int(gt_labels[gt]), background] += 1
        for det in range(len(det_labels)):
            if det not in paired_det:
                self.counts[background, int(det_labels[det])] += 1
