"""A toy loss term for the extension-point test: the L1 difference of the matched boxes' areas.
One function; registered by one `LOSS_TERMS` line."""

from __future__ import annotations

from torch import Tensor

from detr_lab.models.loss_terms import TermInputs


def area_term(inputs: TermInputs) -> dict[str, Tensor]:
    """`loss_area`: sum over matched pairs of |w h - w' h'| (normalized cxcywh boxes) / num_boxes."""
    pred = inputs.predictions["pred_boxes"][inputs.matched_queries()]
    target = inputs.matched_targets("boxes").to(pred)
    difference = pred[:, 2] * pred[:, 3] - target[:, 2] * target[:, 3]
    return {"loss_area": difference.abs().sum() / inputs.num_boxes}
