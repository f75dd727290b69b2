"""Loss terms of the set criterion: one function each, with one signature, and the table that names them.

    term(inputs: TermInputs) -> dict of named values

A term gets one prediction group's predictions with the targets, the (query, target) pairs of
the matching and the box normalizer, and returns its values unweighted. The table `LOSS_TERMS`
gives each term's weighted values with their default weights (a string names the `LossConfig`
key that holds the weight), the values it returns on every group (zeros of these stand in when a
declared group is absent, e.g. denoising at evaluation), and the group kinds it applies to. The
config selects terms by name (`loss.terms`); a new term is one function plus one table line.

The formulas follow `SetCriterion` of the official DETR / Deformable DETR code (labels, boxes,
cardinality) and DINO's logged L1 split (box_parts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from detr_lab.boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou
from detr_lab.models.classification import Classification

Indices = list[tuple[Tensor, Tensor]]
GROUP_KINDS = ("main", "aux", "enc", "dn")


@dataclass
class TermInputs:
    """What every loss term receives for one prediction group.

    predictions: `pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]` normalized cxcywh;
    targets: B dicts with `labels` int64 `[N_i]` and `boxes` `[N_i, 4]` normalized cxcywh (class-
    agnostic groups: all labels 0); indices: per image (query indices, target indices) int64 `[K_i]`;
    num_boxes: the normalizer of summed terms; log: also return the logging-only values of the final
    layer; classification: the strategy of the class logits; num_classes: real classes.
    """

    predictions: dict
    targets: list[dict]
    indices: Indices
    num_boxes: float
    classification: Classification
    num_classes: int
    log: bool = False
    options: dict = field(default_factory=dict)  # the term's own options (`loss.term_options.<term>`)

    def matched_queries(self) -> tuple[Tensor, Tensor]:
        """(batch index, query index) of every matched prediction, each int64 `[K]`."""
        batch = torch.cat(
            [torch.full_like(queries, image) for image, (queries, _) in enumerate(self.indices)]
        )
        return batch, torch.cat([queries for queries, _ in self.indices])

    def matched_targets(self, key: str) -> Tensor:
        """`targets[i][key]` of every matched target, in the order of `matched_queries`: `[K, ...]`."""
        return torch.cat([t[key][j] for t, (_, j) in zip(self.targets, self.indices, strict=True)])


def labels_term(inputs: TermInputs) -> dict[str, Tensor]:
    """`loss_ce` over all queries (unmatched ones target "no object" / all-negative), computed by the
    classification strategy; with `log`, `class_error` (% of matched queries whose best logit is wrong)."""
    logits = inputs.predictions["pred_logits"]  # (B, Q, C)
    matched = inputs.matched_queries()
    matched_labels = inputs.matched_targets("labels").to(logits.device)
    target_classes = torch.full(logits.shape[:2], inputs.num_classes, dtype=torch.int64, device=logits.device)
    target_classes[matched] = matched_labels
    losses = {"loss_ce": inputs.classification.loss(logits, target_classes, inputs.num_boxes)}
    if inputs.log:
        with torch.no_grad():
            if matched_labels.numel() == 0:
                accuracy = logits.new_zeros(())
            else:
                correct = (logits[matched].argmax(-1) == matched_labels).float().sum()
                accuracy = correct * 100.0 / matched_labels.numel()
            losses["class_error"] = 100 - accuracy
    return losses


def boxes_term(inputs: TermInputs) -> dict[str, Tensor]:
    """`loss_bbox` (L1) and `loss_giou` (1 - GIoU) of the matched boxes (normalized cxcywh), summed
    over the pairs and divided by `num_boxes`."""
    pred = inputs.predictions["pred_boxes"][inputs.matched_queries()]  # (K, 4)
    target = inputs.matched_targets("boxes").to(pred)
    loss_bbox = F.l1_loss(pred, target, reduction="none").sum() / inputs.num_boxes
    giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target)))
    return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / inputs.num_boxes}


def varifocal_term(inputs: TermInputs) -> dict[str, Tensor]:
    """`loss_vfl`, the varifocal loss (Zhang et al. 2021) as RT-DETR computes it (`loss_labels_vfl`):
    binary cross-entropy of every (query, class) logit against a soft target, the IoU of a matched
    query's box with its target (detached) for its target class, 0 elsewhere; weighted by
    `alpha * sigmoid(logit)^gamma` where the target is 0 and by the target where it is not; mean over
    queries, summed, times Q / num_boxes. Sigmoid classification only (logits `[B, Q, C]`).
    Options: `alpha` (0.75), `gamma` (2.0)."""
    logits = inputs.predictions["pred_logits"]  # (B, Q, C)
    matched = inputs.matched_queries()
    pred_boxes = inputs.predictions["pred_boxes"][matched]
    target_boxes = inputs.matched_targets("boxes").to(pred_boxes)
    ious = torch.diag(box_iou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(target_boxes))[0]).detach()
    target_classes = torch.full(logits.shape[:2], inputs.num_classes, dtype=torch.int64, device=logits.device)
    target_classes[matched] = inputs.matched_targets("labels").to(logits.device)
    one_hot = F.one_hot(target_classes, inputs.num_classes + 1)[..., :-1].to(logits.dtype)  # (B, Q, C)
    score = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
    score[matched] = ious.to(logits.dtype)
    target = score[..., None] * one_hot
    alpha, gamma = inputs.options.get("alpha", 0.75), inputs.options.get("gamma", 2.0)
    weight = alpha * logits.sigmoid().detach().pow(gamma) * (1 - one_hot) + target
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
    return {"loss_vfl": loss.mean(1).sum() * logits.shape[1] / inputs.num_boxes}


@torch.no_grad()
def box_parts_term(inputs: TermInputs) -> dict[str, Tensor]:
    """Logged only: the L1 of the matched boxes split into centre (`loss_xy`) and size (`loss_hw`),
    each divided by `num_boxes` (DINO's logged values)."""
    pred = inputs.predictions["pred_boxes"][inputs.matched_queries()]
    l1 = F.l1_loss(pred, inputs.matched_targets("boxes").to(pred), reduction="none")
    return {"loss_xy": l1[:, :2].sum() / inputs.num_boxes, "loss_hw": l1[:, 2:].sum() / inputs.num_boxes}


@torch.no_grad()
def cardinality_term(inputs: TermInputs) -> dict[str, Tensor]:
    """Logged only: `cardinality_error`, the mean |predicted objects - target objects| per image. A
    prediction counts as an object when its best logit is not the last one (as the official code,
    also for sigmoid heads)."""
    logits = inputs.predictions["pred_logits"]
    target_counts = torch.as_tensor([len(t["labels"]) for t in inputs.targets], device=logits.device)
    predicted_counts = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
    return {"cardinality_error": F.l1_loss(predicted_counts.float(), target_counts.float())}


@dataclass(frozen=True)
class LossTerm:
    """One entry of `LOSS_TERMS`.

    fn: the term's function. weights: weighted value -> its weight, a number (the default; `loss.weights`
    overrides it) or the name of the `LossConfig` key that holds it. values: what the term returns on
    every group it applies to (`log` may add logging-only values on the final layer). groups: the
    group kinds it applies to (of `GROUP_KINDS`). sigmoid_only: the term reads per-class sigmoid
    logits. Its own options come from `loss.term_options.<name>` (`TermInputs.options`).
    """

    fn: Callable[[TermInputs], dict[str, Tensor]]
    values: tuple[str, ...]
    weights: dict[str, float | str] = field(default_factory=dict)
    groups: tuple[str, ...] = GROUP_KINDS
    sigmoid_only: bool = False  # needs independent per-class logits (`model.classification: sigmoid`)


LOSS_TERMS: dict[str, LossTerm] = {
    "labels": LossTerm(labels_term, ("loss_ce",), {"loss_ce": "class_weight"}),
    "boxes": LossTerm(
        boxes_term, ("loss_bbox", "loss_giou"), {"loss_bbox": "bbox_weight", "loss_giou": "giou_weight"}
    ),
    "box_parts": LossTerm(box_parts_term, ("loss_xy", "loss_hw")),
    "vfl": LossTerm(varifocal_term, ("loss_vfl",), {"loss_vfl": 1.0}, sigmoid_only=True),
    "cardinality": LossTerm(cardinality_term, ("cardinality_error",)),
}
DEFAULT_TERMS = ("labels", "cardinality", "boxes")
