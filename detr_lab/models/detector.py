"""The DETR detector: backbone -> input projection -> transformer -> class and box heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_lab.models.backbone import ResNetBackbone
from detr_lab.models.transformer import Transformer


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them: `[..., in_dim]` -> `[..., out_dim]`."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Detector(nn.Module):
    """DETR: a set of learned object queries decoded against image features.

    Args:
        backbone: returns feature levels with masks (see `ResNetBackbone.forward`); its
            `num_channels` lists each level's channels.
        position_encoding: padding mask `[B, H, W]` -> position embeddings `[B, d, H, W]`.
        transformer: a `Transformer` of width `hidden_dim`.
        input_proj: one module per feature level mapping `[B, C_l, H, W]` -> `[B, d, H, W]`
            (DETR: a single 1x1 convolution).
        num_classes: real classes; the class head has `num_classes + 1` outputs, the last being
            "no object".
        num_queries: number of object queries (`query_embed` rows).
        aux_loss: also return the predictions of every earlier decoder layer.

    Attributes: `backbone`, `position_encoding`, `input_proj`, `transformer`, `query_embed`
    (`nn.Embedding(num_queries, d)`, the queries' position embeddings; the decoder starts from zero
    queries), `class_embed` (`Linear(d, num_classes + 1)`), `bbox_embed` (3-layer `MLP`, d -> 4).
    """

    def __init__(
        self,
        *,
        backbone: ResNetBackbone,
        position_encoding: nn.Module,
        transformer: Transformer,
        input_proj: Sequence[nn.Module],
        num_classes: int,
        num_queries: int,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        if len(input_proj) != len(backbone.num_channels):
            raise ValueError(
                f"need one input projection per backbone level: {len(input_proj)} projections, "
                f"{len(backbone.num_channels)} levels"
            )
        hidden_dim = transformer.embed_dim
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.backbone = backbone
        self.position_encoding = position_encoding
        self.input_proj = nn.ModuleList(input_proj)
        self.transformer = transformer
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)

    def forward(self, images: Tensor, padding_mask: Tensor, *, return_memory: bool = False) -> dict:
        """Detect objects in a padded batch.

        Args:
            images: float `[B, 3, H, W]`, ImageNet-normalized, zero-padded bottom/right.
            padding_mask: bool `[B, H, W]`, True = padding.
            return_memory: also return the encoder output.
        Returns:
            dict with `pred_logits` `[B, Q, num_classes + 1]`, `pred_boxes` `[B, Q, 4]` (normalized
            cxcywh, relative to each image's unpadded extent), `aux_outputs` (a list with one such
            dict per earlier decoder layer, shallowest first; empty without `aux_loss`) and, with
            `return_memory`, `memory` `[B, S, d]` and `memory_padding_mask` bool `[B, S]` (True =
            padding; S = sum of H_l * W_l over the feature levels).
        """
        levels = self.backbone(images, padding_mask)
        features, masks, pos = [], [], []
        for proj, level in zip(self.input_proj, levels, strict=True):
            projected = proj(level.features)
            features.append(projected)
            masks.append(level.mask)
            pos.append(self.position_encoding(level.mask).to(projected.dtype))

        batch = images.shape[0]
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)  # (B, Q, d)
        queries = torch.zeros_like(query_pos)
        hidden, encoded = self.transformer(features, masks, pos, queries, query_pos)  # (L, B, Q, d)

        logits = self.class_embed(hidden)  # (L, B, Q, C + 1)
        boxes = self.bbox_embed(hidden).sigmoid()  # (L, B, Q, 4)
        outputs: dict = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        outputs["aux_outputs"] = (
            [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1], strict=True)]
            if self.aux_loss
            else []
        )
        if return_memory:
            outputs["memory"] = encoded.memory
            outputs["memory_padding_mask"] = encoded.memory_padding_mask
        return outputs
