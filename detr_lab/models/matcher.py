"""Hungarian matching of predicted queries to ground-truth objects (one-to-one, per image)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detr_lab.boxes import cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Minimum-cost bipartite matching between queries and targets.

    cost = cost_bbox * L1(boxes) + cost_class * class_cost + cost_giou * (-GIoU). The class cost is
    `-p(target class)` with softmax classification, or the focal-loss difference
    `alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))` with sigmoid classification.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs.
        classification: "softmax" (last logit = "no object") or "sigmoid" (focal).
        focal_alpha, focal_gamma: the focal class cost's parameters (sigmoid only).
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        *,
        classification: str = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if classification not in ("softmax", "sigmoid"):
            raise ValueError(f"classification must be 'softmax' or 'sigmoid', got {classification!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0; at least one must be positive")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.classification = classification
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def class_cost(self, logits: Tensor, target_labels: Tensor) -> Tensor:
        """logits `[N, C]`, target_labels int64 `[M]` -> cost `[N, M]`."""
        if self.classification == "softmax":
            return -logits.softmax(-1)[:, target_labels]
        prob = logits.sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        return positive[:, target_labels] - negative[:, target_labels]

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: `pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]` normalized cxcywh.
            targets: B dicts with `labels` int64 `[N_i]` (class indices) and `boxes` `[N_i, 4]`
                normalized cxcywh.
        Returns:
            per image `(query_indices, target_indices)`, int64 `[min(Q, N_i)]` each, query indices
            ascending.
        Raises:
            ValueError: a wrong batch size, or a non-finite cost (NaN/inf predictions or targets).
        All costs are computed in float32 with autocast disabled, whatever the outputs' dtype.
        """
        # Costs in float32 whatever the autocast state or the outputs' dtype: under bf16 / fp16 mixed
        # precision the focal cost's logs and the GIoU's areas lose the digits that order the matches.
        with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
            return self._match(outputs["pred_logits"].float(), outputs["pred_boxes"].float(), targets)

    def _match(self, logits: Tensor, boxes: Tensor, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        batch, num_queries = logits.shape[:2]
        if len(targets) != batch:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {batch} predictions")
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in range(batch)]

        # One cost matrix for the whole batch (queries of all images x targets of all images); each
        # image then solves its own block.
        flat_logits = logits.flatten(0, 1)  # (B*Q, C)
        flat_boxes = boxes.flatten(0, 1)  # (B*Q, 4)
        target_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes)  # (M, 4), float32 like boxes

        cost_bbox = torch.cdist(flat_boxes, target_boxes, p=1)
        cost_class = self.class_cost(flat_logits, target_labels)
        pred_xyxy, target_xyxy = cxcywh_to_xyxy(flat_boxes), cxcywh_to_xyxy(target_boxes)
        if not (torch.isfinite(pred_xyxy).all() and torch.isfinite(target_xyxy).all()):
            raise ValueError(self._non_finite_message(targets, boxes))
        cost_giou = -generalized_box_iou(pred_xyxy, target_xyxy)
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(batch, num_queries, -1).cpu()  # (B, Q, M)

        indices = []
        for image, block in enumerate(cost.split(sizes, dim=-1)):
            block = block[image]  # (Q, N_i)
            if not torch.isfinite(block).all():
                raise ValueError(
                    f"HungarianMatcher: non-finite matching cost for image {image} of the batch "
                    "(NaN or inf in pred_logits, pred_boxes or the target boxes)"
                )
            rows, cols = linear_sum_assignment(block.numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices

    @staticmethod
    def _non_finite_message(targets: list[dict], boxes: Tensor) -> str:
        for image, target in enumerate(targets):
            if not torch.isfinite(target["boxes"]).all():
                return f"HungarianMatcher: non-finite values in targets[{image}]['boxes']"
        bad = (~torch.isfinite(boxes)).flatten(1).any(1).nonzero().flatten().tolist()
        return f"HungarianMatcher: non-finite values in outputs['pred_boxes'] for image(s) {bad} of the batch"
