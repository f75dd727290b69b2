"""Model outputs -> per-image detections in the original image's pixels."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detr_lab.boxes import cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Scores, class indices and absolute xyxy boxes per image.

    Args:
        classification: "softmax": softmax over classes, drop "no object" (the last logit), keep each
            query's best class (one detection per query). "sigmoid": per-class sigmoid scores, keep
            the `num_top` best (query, class) pairs over the image, best first.
        num_top: detections kept per image with sigmoid classification.
    """

    def __init__(self, classification: str = "softmax", *, num_top: int = 100) -> None:
        super().__init__()
        if classification not in ("softmax", "sigmoid"):
            raise ValueError(f"classification must be 'softmax' or 'sigmoid', got {classification!r}")
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
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if orig_sizes.dim() != 2 or orig_sizes.shape != (logits.shape[0], 2):
            raise ValueError(
                f"orig_sizes must be [B, 2] (h, w) with B = {logits.shape[0]}, got {tuple(orig_sizes.shape)}"
            )
        if self.classification == "softmax":
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # (B, Q) each
        else:
            batch, _, num_classes = logits.shape
            top = min(self.num_top, logits.shape[1] * num_classes)
            scores, flat_index = logits.sigmoid().flatten(1).topk(top, dim=1)  # (B, K): query * C + class
            labels = flat_index % num_classes
            query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
            boxes = boxes.gather(1, query_index[..., None].expand(-1, -1, 4))
        height, width = orig_sizes.unbind(1)
        scale = torch.stack((width, height, width, height), dim=1).to(boxes)  # (B, 4)
        pixel_boxes = cxcywh_to_xyxy(boxes) * scale[:, None, :]
        return [
            {"scores": s, "labels": lab, "boxes": b}
            for s, lab, b in zip(scores, labels, pixel_boxes, strict=True)
        ]
