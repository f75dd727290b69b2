"""Loss terms of the set criterion: one function each, with one signature, and the table that names them.

    term(inputs: TermInputs) -> dict of named values

A term gets one prediction group's predictions with the targets, the (query, target) pairs of
the matching and the box normalizer, and returns its values unweighted. The table `LOSS_TERMS`
gives each term's weighted values with their default weights (a string names the `LossConfig`
key that holds the weight), the values it returns on every group (zeros of these stand in when a
declared group is absent, e.g. denoising at evaluation), and the group kinds it applies to. The
config selects terms by name (`loss.terms`); a new term is one function plus one table line.

The formulas follow `SetCriterion` of the official DETR / Deformable DETR code (labels, boxes,
cardinality), DINO's logged L1 split (box_parts), RT-DETR's varifocal loss (vfl), D-FINE's FGL and DDF
(fgl, ddf) and DEIM's matchability-aware loss (mal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from detr_lab.boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou
from detr_lab.models.classification import Classification
from detr_lab.models.distribution import box_to_distance

Indices = list[tuple[Tensor, Tensor]]
GROUP_KINDS = ("main", "aux", "pre", "enc", "dn")


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
    num_boxes: float | Tensor
    classification: Classification
    num_classes: int
    log: bool = False
    options: dict = field(default_factory=dict)  # the term's own options (`loss.term_options.<term>`)
    # What the criterion knows across groups: with union matching, `union_pairs` (matched pairs of the
    # union, this process) and `main_queries` (Q of the matching queries).
    context: dict = field(default_factory=dict)

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
    giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target), check=False))
    return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / inputs.num_boxes}


def iou_class_targets(inputs: TermInputs) -> tuple[Tensor, Tensor]:
    """What the IoU-aware classification losses (VFL, MAL) read: the one-hot target classes `[B, Q, C]`
    (all zero for unmatched queries) and each query's IoU with its matched target box `[B, Q]`
    (detached; 0 for unmatched queries), both in the logits' dtype."""
    logits = inputs.predictions["pred_logits"]  # (B, Q, C)
    matched = inputs.matched_queries()
    pred_boxes = inputs.predictions["pred_boxes"][matched]
    target_boxes = inputs.matched_targets("boxes").to(pred_boxes)
    ious = torch.diag(box_iou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(target_boxes))[0]).detach()
    target_classes = torch.full(logits.shape[:2], inputs.num_classes, dtype=torch.int64, device=logits.device)
    target_classes[matched] = inputs.matched_targets("labels").to(logits.device)
    # One-hot by scatter: `F.one_hot` reads the class range on the host first.
    one_hot = logits.new_zeros((*logits.shape[:2], inputs.num_classes + 1))
    one_hot = one_hot.scatter_(-1, target_classes[..., None], 1.0)[..., :-1]  # (B, Q, C)
    score = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
    score[matched] = ious.to(logits.dtype)
    return one_hot, score


def varifocal_term(inputs: TermInputs) -> dict[str, Tensor]:
    """`loss_vfl`, the varifocal loss (Zhang et al. 2021) as RT-DETR computes it (`loss_labels_vfl`):
    binary cross-entropy of every (query, class) logit against a soft target, the IoU of a matched
    query's box with its target (detached) for its target class, 0 elsewhere; weighted by
    `alpha * sigmoid(logit)^gamma` where the target is 0 and by the target where it is not; mean over
    queries, summed, times Q / num_boxes. Sigmoid classification only (logits `[B, Q, C]`).
    Options: `alpha` (0.75), `gamma` (2.0)."""
    logits = inputs.predictions["pred_logits"]  # (B, Q, C)
    one_hot, score = iou_class_targets(inputs)
    target = score[..., None] * one_hot
    alpha, gamma = inputs.options.get("alpha", 0.75), inputs.options.get("gamma", 2.0)
    weight = alpha * logits.sigmoid().detach().pow(gamma) * (1 - one_hot) + target
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
    return {"loss_vfl": loss.mean(1).sum() * logits.shape[1] / inputs.num_boxes}


def matchability_term(inputs: TermInputs) -> dict[str, Tensor]:
    """`loss_mal`, DEIM's matchability-aware loss (Huang et al. 2025, official `loss_labels_mal`):
    binary cross-entropy of every (query, class) logit against the soft target `IoU^gamma` (the IoU of
    a matched query's box with its target, detached, for the target class; 0 elsewhere), weighted by
    `alpha * sigmoid(logit)^gamma` where the class is not the target and by 1 where it is; mean over
    queries, summed, times Q / num_boxes. Sigmoid classification only.
    Options: `gamma` (official 1.5), `alpha` (official None: no factor on the negatives)."""
    logits = inputs.predictions["pred_logits"]  # (B, Q, C)
    one_hot, score = iou_class_targets(inputs)
    gamma, alpha = inputs.options.get("gamma", 1.5), inputs.options.get("alpha")
    target = (score[..., None] * one_hot).pow(gamma)
    negatives = logits.sigmoid().detach().pow(gamma) * (1 - one_hot)
    weight = (negatives if alpha is None else alpha * negatives) + one_hot
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
    return {"loss_mal": loss.mean(1).sum() * logits.shape[1] / inputs.num_boxes}


def fine_grained_localization_term(inputs: TermInputs) -> dict[str, Tensor]:
    """`loss_fgl`, D-FINE's fine-grained localization loss (official `loss_local`, FGL): for every
    matched query and edge, the cross-entropy of its edge distribution (`pred_corners`) against the two
    bins around the target offset (`box_to_distance` from the detached `ref_points`), weighted by their
    interpolation weights and by the IoU of the predicted box with its target (detached); summed over
    the pairs and divided by `num_boxes`.
    Options (filled from `model.distribution`): `reg_max`, `reg_scale`, `up`."""
    predictions, options = inputs.predictions, inputs.options
    reg_max = int(options["reg_max"])
    matched = inputs.matched_queries()
    target_boxes = inputs.matched_targets("boxes").to(predictions["pred_boxes"])
    corners = predictions["pred_corners"][matched].reshape(-1, reg_max + 1)  # (4K, reg_max + 1)
    reference = predictions["ref_points"][matched].detach()
    bins, weight_right, weight_left = box_to_distance(
        reference, cxcywh_to_xyxy(target_boxes), reg_max, options["reg_scale"], options["up"]
    )
    pred_boxes = predictions["pred_boxes"][matched]
    ious = torch.diag(box_iou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(target_boxes))[0])
    weight = ious.detach().repeat_interleave(4)  # (4K,)
    left = bins.long()
    loss = F.cross_entropy(corners, left, reduction="none") * weight_left + F.cross_entropy(
        corners, left + 1, reduction="none"
    ) * weight_right
    return {"loss_fgl": (loss * weight).sum() / inputs.num_boxes}


def decoupled_distillation_term(inputs: TermInputs) -> dict[str, Tensor]:
    """`loss_ddf`, D-FINE's decoupled distillation focal loss (GO-LSD, official `loss_local`): the
    final layer's edge distributions (`teacher_corners`, detached) teach an earlier layer's.

    Per query and edge, `T^2 * KL(softmax(teacher / T) || softmax(pred / T))` (T = 5), weighted by the
    IoU of the layer's box with its target for matched queries and by the teacher's highest class
    probability for the others (detached); the matched and unmatched means are averaged with weights
    `sqrt(count * 8 / B)` each. Zero for a group without a teacher (the final layer) or whose
    distributions equal the teacher's. Options: `temperature` (5).
    """
    predictions = inputs.predictions
    corners = predictions["pred_corners"]
    if "teacher_corners" not in predictions:
        return {"loss_ddf": corners.sum() * 0.0}
    batch, queries = corners.shape[:2]
    bins = corners.shape[-1] // 4
    pred = corners.reshape(-1, bins)
    teacher = predictions["teacher_corners"].reshape(-1, bins)
    # Decided on the device (no host read): distributions equal to the teacher's give exactly 0.
    same_as_teacher = (pred == teacher).all()
    matched = inputs.matched_queries()
    target_boxes = inputs.matched_targets("boxes").to(predictions["pred_boxes"])
    pred_boxes = predictions["pred_boxes"][matched]
    ious = torch.diag(box_iou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(target_boxes))[0])
    weight = predictions["teacher_logits"].detach().sigmoid().max(-1).values  # (B, Q)
    weight[matched] = ious.to(weight.dtype)
    weight = weight.detach().repeat_interleave(4, dim=-1).reshape(-1)  # (B * Q * 4,)
    mask = torch.zeros(batch, queries, dtype=torch.bool, device=corners.device)
    mask[matched] = True
    mask = mask.repeat_interleave(4, dim=-1).reshape(-1)
    # Matched queries are distinct, so the counts are known on the host; a stable sort puts the matched
    # entries first, each part in its original order (as boolean indexing would, without reading the mask).
    matched_count = 4 * matched[0].numel()
    order = torch.argsort((~mask).to(torch.uint8), stable=True)
    temperature = float(inputs.options.get("temperature", 5.0))
    divergence = F.kl_div(
        F.log_softmax(pred / temperature, dim=1),
        F.softmax(teacher.detach() / temperature, dim=1),
        reduction="none",
    ).sum(-1)
    loss = weight * temperature**2 * divergence  # (B * Q * 4,)
    # The balance of matched and unmatched (official: counted on the matching queries' union
    # matching, also for the denoising groups; 8 / B keeps it independent of the batch per device).
    scale = 8 / batch
    if "union_pairs" in inputs.context:
        positives = 4 * inputs.context["union_pairs"]
        negatives = 4 * batch * inputs.context["main_queries"] - positives
    else:
        positives, negatives = matched_count, mask.numel() - matched_count
    num_pos, num_neg = (positives * scale) ** 0.5, (negatives * scale) ** 0.5
    matched_mean = loss[order[:matched_count]].mean() if matched_count else loss.sum() * 0.0
    other_mean = loss[order[matched_count:]].mean() if matched_count < mask.numel() else loss.sum() * 0.0
    value = (matched_mean * num_pos + other_mean * num_neg) / (num_pos + num_neg)
    return {"loss_ddf": torch.where(same_as_teacher, pred.sum() * 0.0, value)}


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
    union: bool = False
    distribution: bool = False


LOSS_TERMS: dict[str, LossTerm] = {
    "labels": LossTerm(labels_term, ("loss_ce",), {"loss_ce": "class_weight"}),
    "boxes": LossTerm(
        boxes_term,
        ("loss_bbox", "loss_giou"),
        {"loss_bbox": "bbox_weight", "loss_giou": "giou_weight"},
        union=True,
    ),
    "box_parts": LossTerm(box_parts_term, ("loss_xy", "loss_hw")),
    "vfl": LossTerm(varifocal_term, ("loss_vfl",), {"loss_vfl": 1.0}, sigmoid_only=True),
    "mal": LossTerm(matchability_term, ("loss_mal",), {"loss_mal": 1.0}, sigmoid_only=True),
    "fgl": LossTerm(
        fine_grained_localization_term,
        ("loss_fgl",),
        {"loss_fgl": 0.15},
        groups=("main", "aux", "dn"),
        union=True,
        distribution=True,
    ),
    "ddf": LossTerm(
        decoupled_distillation_term,
        ("loss_ddf",),
        {"loss_ddf": 1.5},
        groups=("aux", "dn"),
        union=True,
        distribution=True,
    ),
    "cardinality": LossTerm(cardinality_term, ("cardinality_error",)),
}
DEFAULT_TERMS = ("labels", "cardinality", "boxes")
