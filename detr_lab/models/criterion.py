"""The DETR set loss: Hungarian matching, then classification and box losses on the matched pairs.

Each loss term is a small method with one signature, `(outputs, targets, indices, num_boxes) ->
dict of named terms`; `forward` applies them to the final layer and to every auxiliary decoder layer
(suffix `_0`, `_1`, ..., shallowest first) and to two-stage encoder proposals (suffix `_enc`). The
criterion owns the loss weights (`weight_dict`) and `total_loss`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from detr_lab.boxes import cxcywh_to_xyxy, generalized_box_iou
from detr_lab.models.matcher import HungarianMatcher

Indices = list[tuple[Tensor, Tensor]]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (Lin et al. 2017) of logits and 0/1 targets of the same shape."""
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def average_num_boxes(targets: list[dict], device: torch.device) -> float:
    """Target boxes per process (averaged across processes when distributed), at least 1."""
    num_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        world_size = dist.get_world_size()
    return torch.clamp(num_boxes / world_size, min=1).item()


class SetCriterion(nn.Module):
    """Set-prediction loss of DETR (softmax) and Deformable DETR (sigmoid focal).

    Args:
        num_classes: real classes; with softmax, "no object" is logit `num_classes`.
        matcher: the `HungarianMatcher`.
        class_weight, bbox_weight, giou_weight: weights of `loss_ce`, `loss_bbox`, `loss_giou`.
        eos_coef: softmax: cross-entropy weight of the "no object" class.
        num_aux_layers: auxiliary decoder layers whose terms (suffixed `_0`..) enter `weight_dict`.
        two_stage: add the encoder-proposal terms (suffix `_enc`) to `weight_dict`.
        classification: "softmax" or "sigmoid" (focal loss with `focal_alpha`, `focal_gamma`).

    Terms (unweighted): `loss_ce`, `loss_bbox` (L1 of normalized cxcywh), `loss_giou` (1 - GIoU),
    both box terms summed over matched pairs and divided by the average number of target boxes;
    `class_error` (final layer only) and `cardinality_error` are logged, never weighted.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        *,
        class_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        eos_coef: float = 0.1,
        num_aux_layers: int = 5,
        two_stage: bool = False,
        classification: str = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if classification not in ("softmax", "sigmoid"):
            raise ValueError(f"classification must be 'softmax' or 'sigmoid', got {classification!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.classification = classification
        self.eos_coef = eos_coef
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = eos_coef
        self.register_buffer("class_weights", class_weights, persistent=False)

        base = {"loss_ce": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        self.weight_dict: dict[str, float] = dict(base)
        suffixes = [f"_{i}" for i in range(num_aux_layers)] + (["_enc"] if two_stage else [])
        for suffix in suffixes:
            self.weight_dict.update({name + suffix: weight for name, weight in base.items()})
        self.loss_terms = {
            "labels": self.loss_labels,
            "cardinality": self.loss_cardinality,
            "boxes": self.loss_boxes,
        }

    # ------------------------------------------------------------------------------------- terms
    @staticmethod
    def matched_query_index(indices: Indices) -> tuple[Tensor, Tensor]:
        """(batch index, query index) of every matched prediction, each int64 `[K]`."""
        batch = torch.cat([torch.full_like(queries, image) for image, (queries, _) in enumerate(indices)])
        queries = torch.cat([queries for queries, _ in indices])
        return batch, queries

    def loss_labels(
        self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float, *, log: bool = True
    ) -> dict[str, Tensor]:
        """`loss_ce` over all queries (unmatched ones target "no object"); `class_error` (%) if `log`."""
        logits = outputs["pred_logits"]  # (B, Q, C)
        matched = self.matched_query_index(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        matched_labels = matched_labels.to(logits.device)
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[matched] = matched_labels

        if self.classification == "softmax":
            loss_ce = F.cross_entropy(
                logits.transpose(1, 2), target_classes, self.class_weights.to(logits.dtype)
            )
        else:
            # One-hot over num_classes + 1 columns, then drop the "no object" column: unmatched
            # queries are all-negative. Summed and divided by the box count, as Deformable DETR.
            one_hot = torch.zeros(
                (*logits.shape[:2], self.num_classes + 1), dtype=logits.dtype, device=logits.device
            )
            one_hot.scatter_(2, target_classes.unsqueeze(-1), 1)
            focal = sigmoid_focal_loss(
                logits, one_hot[..., :-1], alpha=self.focal_alpha, gamma=self.focal_gamma
            )
            loss_ce = focal.mean(1).sum() / num_boxes * logits.shape[1]
        losses = {"loss_ce": loss_ce}
        if log:
            with torch.no_grad():
                if matched_labels.numel() == 0:
                    accuracy = logits.new_zeros(())
                else:
                    correct = (logits[matched].argmax(-1) == matched_labels).float().sum()
                    accuracy = correct * 100.0 / matched_labels.numel()
                losses["class_error"] = 100 - accuracy
        return losses

    @torch.no_grad()
    def loss_cardinality(
        self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float
    ) -> dict:
        """`cardinality_error`: mean |predicted objects - target objects| per image (logging only).

        A prediction counts as an object when its best logit is not the last one.
        """
        logits = outputs["pred_logits"]
        target_counts = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        predicted_counts = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted_counts.float(), target_counts.float())}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float) -> dict:
        """`loss_bbox` (L1) and `loss_giou` (1 - GIoU) of the matched boxes, normalized cxcywh."""
        matched = self.matched_query_index(indices)
        pred_boxes = outputs["pred_boxes"][matched]  # (K, 4)
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        target_boxes = target_boxes.to(pred_boxes)
        loss_bbox = F.l1_loss(pred_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    # ----------------------------------------------------------------------------------- forward
    def layer_losses(self, outputs: dict, targets: list[dict], num_boxes: float, *, log: bool) -> dict:
        indices = self.matcher(outputs, targets)
        losses: dict[str, Tensor] = {}
        for name, term in self.loss_terms.items():
            kwargs = {"log": log} if name == "labels" else {}
            losses.update(term(outputs, targets, indices, num_boxes, **kwargs))
        return losses

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """Unweighted loss terms of every decoder layer (and of two-stage proposals).

        Args:
            outputs: the model's dict: `pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]`
                (normalized cxcywh), optional `aux_outputs` (list of such dicts) and `enc_outputs`.
            targets: B dicts with `labels` int64 `[N_i]` and `boxes` `[N_i, 4]` normalized cxcywh
                (N_i may be 0).
        Returns:
            `loss_ce`, `loss_bbox`, `loss_giou`, `class_error`, `cardinality_error`, the same
            without `class_error` suffixed `_i` per auxiliary layer and `_enc` for proposals.
        """
        num_boxes = average_num_boxes(targets, outputs["pred_logits"].device)
        losses = self.layer_losses(outputs, targets, num_boxes, log=True)
        for layer, aux in enumerate(outputs.get("aux_outputs") or []):
            layer_terms = self.layer_losses(aux, targets, num_boxes, log=False)
            losses.update({f"{name}_{layer}": value for name, value in layer_terms.items()})
        if "enc_outputs" in outputs:
            # Proposals are class-agnostic: every target becomes class 0.
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc_terms = self.layer_losses(outputs["enc_outputs"], binary, num_boxes, log=False)
            losses.update({f"{name}_enc": value for name, value in enc_terms.items()})
        return losses

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum over the terms of `weight_dict` present in `losses` (a scalar tensor)."""
        terms = [losses[name] * weight for name, weight in self.weight_dict.items() if name in losses]
        if not terms:
            raise ValueError(
                f"none of the weighted loss terms {sorted(self.weight_dict)} is in the losses given"
            )
        return torch.stack(terms).sum()
