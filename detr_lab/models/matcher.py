"""Hungarian matching of predicted queries to ground-truth objects (one-to-one, per image), with its
table of matching costs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detr_lab.boxes import cxcywh_to_xyxy, generalized_box_iou
from detr_lab.errors import InputError
from detr_lab.models.classification import Classification, classification_strategy


class NonFiniteCostError(ValueError):
    """A matching cost is NaN or infinite: NaN / inf in the predictions or the target boxes (the message
    says which)."""


@dataclass
class CostInputs:
    """What every matching cost receives: the batch's predictions flattened over images, logits
    `[N, C]` and boxes `[N, 4]` normalized cxcywh (float32), the batch's targets, labels int64 `[M]` and
    boxes `[M, 4]` normalized cxcywh, and the classification strategy."""

    logits: Tensor
    boxes: Tensor
    target_labels: Tensor
    target_boxes: Tensor
    classification: Classification



def class_cost(ctx: CostInputs) -> Tensor:
    """The classification strategy's cost of each target's class (`-p` for softmax, the focal
    difference for sigmoid; see `detr_lab.models.classification`)."""
    return ctx.classification.match_cost(ctx.logits, ctx.target_labels)


def bbox_cost(ctx: CostInputs) -> Tensor:
    """L1 distance of normalized cxcywh boxes."""
    return torch.cdist(ctx.boxes, ctx.target_boxes, p=1)


def giou_cost(ctx: CostInputs) -> Tensor:
    """Negative generalized IoU (no box check: non-finite costs are caught on the host, see `_match`)."""
    return -generalized_box_iou(cxcywh_to_xyxy(ctx.boxes), cxcywh_to_xyxy(ctx.target_boxes), check=False)


# Matching-cost table: name -> cost function of `CostInputs` giving `[N, M]` (N predictions of the
# batch, M targets of the batch). The config gives each cost's weight (`loss.cost_class`,
# `loss.cost_bbox`, `loss.cost_giou`; further costs in `loss.extra_costs`). A new cost is one function
# plus one line here.
MATCHING_COSTS: dict[str, Callable[[CostInputs], Tensor]] = {
    "class": class_cost,
    "bbox": bbox_cost,
    "giou": giou_cost,
}


class HungarianMatcher(nn.Module):
    """Minimum-cost bipartite matching between queries and targets.

    cost = sum over the weighted costs of `MATCHING_COSTS`: by default cost_bbox * L1(boxes) +
    cost_class * class_cost + cost_giou * (-GIoU), as the official DETR / Deformable DETR matchers.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the "class", "bbox" and "giou" costs.
        classification: a strategy of `detr_lab.models.classification` or its name ("softmax": last
            logit = "no object"; "sigmoid": focal, with `focal_alpha` / `focal_gamma`).
        extra_costs: further costs of `MATCHING_COSTS` by name -> weight.
    Raises:
        ValueError: an unknown classification or cost name, or every weight 0.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        *,
        classification: str | Classification = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        extra_costs: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(classification, str):
            classification = classification_strategy(
                classification, focal_alpha=focal_alpha, focal_gamma=focal_gamma
            )
        extra = dict(extra_costs or {})
        unknown = [name for name in extra if name not in MATCHING_COSTS or name in ("class", "bbox", "giou")]
        if unknown:
            known = [name for name in MATCHING_COSTS if name not in ("class", "bbox", "giou")]
            raise InputError(
                f"'loss.extra_costs' names {unknown}: not an extra cost of the table (class, bbox and giou "
                f"have 'loss.cost_*'); extra costs: {known or 'none yet'}"
            )
        negative = [name for name, weight in extra.items() if not weight >= 0]
        if negative:
            raise InputError(f"'loss.extra_costs' weights must be >= 0 (and finite); {negative} are not")
        weights = {"class": cost_class, "bbox": cost_bbox, "giou": cost_giou, **extra}
        if all(weight == 0 for weight in weights.values()):
            raise ValueError("all matching costs are 0; at least one must be positive")
        self.costs = {name: weight for name, weight in weights.items() if weight != 0}
        self.classification = classification

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
            ValueError: a wrong batch size; `NonFiniteCostError` (a ValueError) for a non-finite cost
                (NaN / inf predictions or targets).
        All costs are computed in float32 with autocast disabled, whatever the outputs' dtype. The cost
        matrix goes to the host once, where it is checked and solved: the only device-to-host
        synchronization of a call.
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

        inputs = CostInputs(flat_logits, flat_boxes, target_labels, target_boxes, self.classification)
        # Summed in the official order (bbox, class, giou) so that float32 rounding matches it.
        order = sorted(self.costs, key=lambda name: ("bbox", "class", "giou").index(name)
                       if name in ("bbox", "class", "giou") else 3)
        cost = sum(self.costs[name] * MATCHING_COSTS[name](inputs) for name in order)
        cost = cost.view(batch, num_queries, -1).cpu().numpy()  # (B, Q, M), on the host from here on

        indices = []
        ends = np.cumsum(sizes)
        for image, (start, end) in enumerate(zip(ends - np.asarray(sizes), ends, strict=True)):
            block = cost[image, :, start:end]  # (Q, N_i)
            if not np.isfinite(block).all():
                raise NonFiniteCostError(self._non_finite_message(targets, boxes, image))
            rows, cols = linear_sum_assignment(block)
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices

    @staticmethod
    def _non_finite_message(targets: list[dict], boxes: Tensor, image: int) -> str:
        # The error path only: these checks read the values on the host.
        for index, target in enumerate(targets):
            if not torch.isfinite(target["boxes"]).all():
                return f"HungarianMatcher: non-finite values in targets[{index}]['boxes']"
        bad = (~torch.isfinite(boxes)).flatten(1).any(1).nonzero().flatten().tolist()
        if bad:
            return (f"HungarianMatcher: non-finite values in outputs['pred_boxes'] for image(s) {bad} "
                    "of the batch")
        return (f"HungarianMatcher: non-finite matching cost for image {image} of the batch "
                "(NaN or inf in pred_logits, pred_boxes or the target boxes)")
