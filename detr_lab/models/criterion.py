"""The DETR set loss: Hungarian matching, then classification and box losses on the matched pairs.

Each loss term is a small method with one signature,

    term(outputs, targets, indices, num_boxes, *, log) -> dict of named values

(`log`: also return the logging-only metrics of the final layer, e.g. `class_error`). The terms
that run are chosen by name (`terms`, from `loss.terms` in the config). `forward` applies them to the
final layer and to every auxiliary decoder layer (suffix `_0`, `_1`, ..., shallowest first) and to
two-stage encoder proposals (suffix `_enc`); `layer_losses` applies them to one set of predictions
with the matcher's indices or with given ones (e.g. denoising groups, whose targets are known). The
criterion owns the loss weights (`weight_dict`) and `total_loss`. Follows `SetCriterion` of the
official DETR and Deformable DETR code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from detr_lab.boxes import cxcywh_to_xyxy, generalized_box_iou
from detr_lab.models.matcher import HungarianMatcher

Indices = list[tuple[Tensor, Tensor]]

# Weighted values each term returns (the others are logged only). The names are those of
# `detr_lab.config.LOSS_TERMS`, which validates `loss.terms`.
WEIGHTED_VALUES = {"labels": ("loss_ce",), "boxes": ("loss_bbox", "loss_giou"), "cardinality": ()}
DEFAULT_TERMS = ("labels", "cardinality", "boxes")


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
        terms: the loss terms to compute, by name: "labels" (`loss_ce`, and `class_error` for the
            final layer), "boxes" (`loss_bbox`, `loss_giou`), "cardinality" (`cardinality_error`).

    Values (unweighted): `loss_ce`, `loss_bbox` (L1 of normalized cxcywh), `loss_giou` (1 - GIoU),
    both box terms summed over matched pairs and divided by the average number of target boxes;
    `class_error` (final layer only) and `cardinality_error` are logged, never weighted.

    Raises:
        ValueError: an unknown classification or term name (the message names it), or no terms.
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
        terms: Sequence[str] = DEFAULT_TERMS,
    ) -> None:
        super().__init__()
        if classification not in ("softmax", "sigmoid"):
            raise ValueError(f"classification must be 'softmax' or 'sigmoid', got {classification!r}")
        available = {
            "labels": self.loss_labels,
            "cardinality": self.loss_cardinality,
            "boxes": self.loss_boxes,
        }
        unknown = [name for name in terms if name not in available]
        if unknown or not terms or len(set(terms)) != len(terms):
            raise ValueError(
                f"loss terms must be distinct names from {sorted(available)} (at least one), "
                f"got {list(terms)!r}"
            )
        self.loss_terms = {name: available[name] for name in terms}
        self.num_classes = num_classes
        self.matcher = matcher
        self.classification = classification
        self.eos_coef = eos_coef
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = eos_coef
        self.register_buffer("class_weights", class_weights, persistent=False)

        weights = {"loss_ce": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        produced = {value for name in self.loss_terms for value in WEIGHTED_VALUES[name]}
        base = {value: weight for value, weight in weights.items() if value in produced}
        self.weight_dict: dict[str, float] = dict(base)
        suffixes = [f"_{i}" for i in range(num_aux_layers)] + (["_enc"] if two_stage else [])
        for suffix in suffixes:
            self.weight_dict.update({name + suffix: weight for name, weight in base.items()})

    # ------------------------------------------------------------------------------------- terms
    @staticmethod
    def matched_query_index(indices: Indices) -> tuple[Tensor, Tensor]:
        """(batch index, query index) of every matched prediction, each int64 `[K]`."""
        batch = torch.cat([torch.full_like(queries, image) for image, (queries, _) in enumerate(indices)])
        queries = torch.cat([queries for queries, _ in indices])
        return batch, queries

    def loss_labels(
        self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float, *, log: bool
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
        self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float, *, log: bool
    ) -> dict:
        """`cardinality_error`: mean |predicted objects - target objects| per image (logging only).

        A prediction counts as an object when its best logit is not the last one. Every layer logs
        it (`log` is not consulted), as the official code.
        """
        logits = outputs["pred_logits"]
        target_counts = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        predicted_counts = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted_counts.float(), target_counts.float())}

    def loss_boxes(
        self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float, *, log: bool
    ) -> dict:
        """`loss_bbox` (L1) and `loss_giou` (1 - GIoU) of the matched boxes, normalized cxcywh."""
        matched = self.matched_query_index(indices)
        pred_boxes = outputs["pred_boxes"][matched]  # (K, 4)
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        target_boxes = target_boxes.to(pred_boxes)
        loss_bbox = F.l1_loss(pred_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    # ----------------------------------------------------------------------------------- forward
    def layer_losses(
        self,
        outputs: dict,
        targets: list[dict],
        num_boxes: float,
        *,
        log: bool,
        indices: Indices | None = None,
    ) -> dict[str, Tensor]:
        """Every configured term for one set of predictions (unsuffixed names).

        Args:
            outputs: `pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]` normalized cxcywh.
            targets: B dicts with `labels` int64 `[N_i]`, `boxes` `[N_i, 4]` normalized cxcywh.
            num_boxes: the normalizer of the box terms (see `average_num_boxes`).
            log: also return the final layer's logging-only values (`class_error`).
            indices: B pairs (query indices int64 `[K_i]`, target indices int64 `[K_i]`) that
                replace the Hungarian matching, e.g. for denoising queries built from known targets;
                None runs the matcher.
        """
        if indices is None:
            indices = self.matcher(outputs, targets)
        elif len(indices) != len(targets):
            raise ValueError(
                f"indices must hold one (query, target) pair per image: got {len(indices)} "
                f"for {len(targets)} targets"
            )
        losses: dict[str, Tensor] = {}
        for term in self.loss_terms.values():
            losses.update(term(outputs, targets, indices, num_boxes, log=log))
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
