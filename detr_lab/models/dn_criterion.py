"""Set loss of anchor-box detectors (DINO): proposals with their classes, and denoising terms.

Follows `SetCriterion.forward` of the official IDEA-Research/DINO code (models/dino/dino.py):

- the final and every auxiliary decoder layer are matched and scored as in Deformable DETR (sigmoid
  focal loss, L1 and GIoU), with the logged `loss_xy` / `loss_hw` (the L1 split into centre and size);
- the selected encoder proposals (`enc_outputs`) are matched to the targets with their real classes
  (suffix `_enc`; the official code calls them `interm`);
- denoising predictions (`dn_outputs`) are scored without matching: positive query of object j in group
  g <-> target j, normalized by (target boxes x groups); suffix `_dn` (final layer) and `_dn_i`
  (auxiliary layers). When the model was built with denoising but the batch carries none (evaluation,
  or no `dn_outputs` because no image had objects), those terms are zero, as the official code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from detr_lab.models.criterion import DEFAULT_TERMS, WEIGHTED_VALUES, Indices, SetCriterion, average_num_boxes
from detr_lab.models.matcher import HungarianMatcher
from detr_lab.models.queries.denoising import DenoisingLayout

# Values each term gives a denoising layer (zeros of these when a batch has no denoising part).
DN_VALUES = {
    "labels": ("loss_ce",),
    "boxes": ("loss_bbox", "loss_giou", "loss_xy", "loss_hw"),
    "cardinality": ("cardinality_error",),
}


class DenoisingCriterion(SetCriterion):
    """`SetCriterion` (sigmoid focal) for `AnchorDetector` outputs.

    Args:
        num_classes, matcher, class_weight, bbox_weight, giou_weight, num_aux_layers, focal_alpha,
        focal_gamma: see `SetCriterion`.
        proposals: the model returns `enc_outputs` (mixed query selection): weight `_enc` terms.
        denoising: the model has denoising: weight (and always return) the `_dn` terms.

    Terms are unweighted; `weight_dict` gives `loss_ce`, `loss_bbox`, `loss_giou` and their `_i`, `_enc`,
    `_dn`, `_dn_i` variants the same weights (DINO's recipe: 1, 5, 2).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        *,
        class_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        num_aux_layers: int = 5,
        proposals: bool = True,
        denoising: bool = True,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        terms: Sequence[str] = DEFAULT_TERMS,
    ) -> None:
        super().__init__(
            num_classes,
            matcher,
            class_weight=class_weight,
            bbox_weight=bbox_weight,
            giou_weight=giou_weight,
            num_aux_layers=num_aux_layers,
            two_stage=proposals,
            classification="sigmoid",
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            terms=terms,
        )
        self.num_aux_layers = num_aux_layers
        self.denoising = denoising
        if denoising:
            weights = {"loss_ce": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
            produced = {value for name in self.loss_terms for value in WEIGHTED_VALUES[name]}
            base = {value: weight for value, weight in weights.items() if value in produced}
            for suffix in ["_dn"] + [f"_dn_{i}" for i in range(num_aux_layers)]:
                self.weight_dict.update({name + suffix: weight for name, weight in base.items()})

    def loss_boxes(
        self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float, *, log: bool
    ) -> dict:
        """`SetCriterion.loss_boxes` plus the logged (no gradient) `loss_xy` and `loss_hw`."""
        losses = super().loss_boxes(outputs, targets, indices, num_boxes, log=log)
        with torch.no_grad():
            matched = self.matched_query_index(indices)
            pred = outputs["pred_boxes"][matched]
            target = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)]).to(pred)
            l1 = F.l1_loss(pred, target, reduction="none")
            losses["loss_xy"] = l1[:, :2].sum() / num_boxes
            losses["loss_hw"] = l1[:, 2:].sum() / num_boxes
        return losses

    def denoising_losses(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict[str, Tensor]:
        """`_dn` / `_dn_i` terms of `outputs["dn_outputs"]` (zeros when absent)."""
        dn_outputs, layout = outputs.get("dn_outputs"), outputs.get("dn_meta")
        layers = ["_dn"] + [f"_dn_{i}" for i in range(len(outputs.get("aux_outputs") or []))]
        if dn_outputs is None or layout is None:
            zero = outputs["pred_logits"].new_zeros(())
            names = [value for term in self.loss_terms for value in DN_VALUES[term]]
            return {name + suffix: zero for suffix in layers for name in names}
        if not isinstance(layout, DenoisingLayout):
            raise TypeError(f"dn_meta must be a DenoisingLayout, got {type(layout).__name__}")
        device = dn_outputs["pred_logits"].device
        indices = [layout.positive_indices(len(t["labels"]), device) for t in targets]
        normalizer = num_boxes * layout.groups
        per_layer = [dn_outputs] + list(dn_outputs.get("aux_outputs") or [])
        losses: dict[str, Tensor] = {}
        for suffix, layer_outputs in zip(layers, per_layer, strict=True):
            terms = self.layer_losses(layer_outputs, targets, normalizer, log=False, indices=indices)
            losses.update({name + suffix: value for name, value in terms.items()})
        return losses

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """Unweighted terms: final layer (with `class_error`), `_i` per auxiliary layer, `_enc` for the
        selected proposals, `_dn` / `_dn_i` for denoising (when built with it).

        Args:
            outputs: `AnchorDetector` outputs: `pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]`
                (normalized cxcywh), `aux_outputs`, optional `enc_outputs`, `dn_outputs`, `dn_meta`.
            targets: B dicts with `labels` int64 `[N_i]` and `boxes` `[N_i, 4]` normalized cxcywh.
        """
        num_boxes = average_num_boxes(targets, outputs["pred_logits"].device)
        losses = self.layer_losses(outputs, targets, num_boxes, log=True)
        for layer, aux in enumerate(outputs.get("aux_outputs") or []):
            terms = self.layer_losses(aux, targets, num_boxes, log=False)
            losses.update({f"{name}_{layer}": value for name, value in terms.items()})
        if "enc_outputs" in outputs:
            terms = self.layer_losses(outputs["enc_outputs"], targets, num_boxes, log=False)
            losses.update({f"{name}_enc": value for name, value in terms.items()})
        if self.denoising or "dn_outputs" in outputs:
            losses.update(self.denoising_losses(outputs, targets, num_boxes))
        return losses
