"""Model outputs -> per-image detections in the original image's pixels."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detr_lab.boxes import cxcywh_to_xyxy
from detr_lab.models.classification import Classification, classification_strategy


class PostProcess(nn.Module):
    """Scores, class indices and absolute xyxy boxes per image.

    Args:
        classification: a strategy of `detr_lab.models.classification` or its name. "softmax": softmax
            over classes, drop "no object" (the last logit), keep each query's best class (one detection
            per query). "sigmoid": per-class sigmoid scores, keep the `num_top` best (query, class)
            pairs over the image, best first (the official Deformable DETR / DINO post-processing).
        num_top: detections kept per image with sigmoid classification.
    Raises:
        ValueError: an unknown classification name.
    """

    def __init__(self, classification: str | Classification = "softmax", *, num_top: int = 100) -> None:
        super().__init__()
        if isinstance(classification, str):
            classification = classification_strategy(classification)
        self.classification = classification
        self.num_top = num_top

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Detections per image.

        Args:
            outputs: `pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]` normalized cxcywh.
            orig_sizes: int `[B, 2]` (h, w) of the original images.
        Returns:
            B dicts: `scores` float `[K]`, `labels` int64 `[K]` (class indices), `boxes` float `[K, 4]`
            absolute xyxy pixels of the original image (K = Q for softmax, min(num_top, Q*C) for sigmoid).
        Raises:
            ValueError: `orig_sizes` not `[B, 2]`.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if orig_sizes.dim() != 2 or orig_sizes.shape != (logits.shape[0], 2):
            raise ValueError(
                f"orig_sizes must be [B, 2] (h, w) with B = {logits.shape[0]}, got {tuple(orig_sizes.shape)}"
            )
        scores, labels, boxes = self.classification.detections(logits, boxes, self.num_top)
        height, width = orig_sizes.unbind(1)
        scale = torch.stack((width, height, width, height), dim=1).to(boxes)  # (B, 4)
        pixel_boxes = cxcywh_to_xyxy(boxes) * scale[:, None, :]
        return [
            {"scores": s, "labels": lab, "boxes": b}
            for s, lab, b in zip(scores, labels, pixel_boxes, strict=True)
        ]
