"""Detectors: backbone -> input projections -> transformer -> class and box heads.

`Detector` is DETR: learned query position embeddings, zero content queries, boxes predicted
absolutely. `DeformableDetector` is Deformable DETR: every query has a reference point (predicted
from its embedding, or a selected encoder proposal in the two-stage variant) and boxes are predicted
relative to it; optionally each decoder layer refines the boxes of the previous one. Both take any
transformer whose layers carry attention modules of the shared contract.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from detr_lab.models.backbones import Backbone, downsample_mask
from detr_lab.models.queries import QuerySet
from detr_lab.models.queries.learned import deformable_queries, detr_queries
from detr_lab.models.transformer import EncoderOutput, Transformer, refine_boxes
from detr_lab.models.two_stage import TwoStageQueries

CLASSIFICATIONS = ("softmax", "sigmoid")
FOCAL_PRIOR = 0.01  # sigmoid heads start out predicting every class with this probability


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


def group_norm_projection(
    in_channels: int, out_channels: int, *, kernel_size: int = 1, stride: int = 1, groups: int = 32
) -> nn.Sequential:
    """Conv + GroupNorm input projection of Deformable DETR (Xavier-uniform conv, zero bias).

    1x1 for a backbone level; 3x3 with stride 2 for an extra level below the deepest one.
    """
    if out_channels % groups:
        raise ValueError(
            f"GroupNorm({groups}) input projections need a width divisible by {groups}, got {out_channels}"
        )
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.xavier_uniform_(conv.weight, gain=1)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(groups, out_channels))


def class_head(hidden_dim: int, num_classes: int, classification: str) -> nn.Linear:
    """Softmax: `num_classes + 1` logits (the last is "no object"). Sigmoid: `num_classes` logits whose
    bias starts at the focal-loss prior, logit(0.01)."""
    if classification not in CLASSIFICATIONS:
        raise ValueError(f"classification must be 'softmax' or 'sigmoid', got {classification!r}")
    if classification == "softmax":
        return nn.Linear(hidden_dim, num_classes + 1)
    head = nn.Linear(hidden_dim, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - FOCAL_PRIOR) / FOCAL_PRIOR))
    return head


def layer_outputs(logits: Sequence[Tensor], boxes: Sequence[Tensor], aux_loss: bool) -> dict:
    """Per-layer predictions (shallowest first) -> the output dict of the last layer with `aux_outputs`."""
    outputs: dict = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    outputs["aux_outputs"] = (
        [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1], strict=True)]
        if aux_loss
        else []
    )
    return outputs


class DetectorBase(nn.Module):
    """Backbone levels, their projections to width d, extra strided levels and position embeddings.

    Args:
        backbone: returns feature levels with masks (see `Backbone.forward`); its
            `num_channels` lists each level's channels.
        position_encoding: padding mask `[B, H, W]` -> position embeddings `[B, d, H, W]`.
        transformer: a `Transformer` of width d.
        input_proj: one module per feature level mapping `[B, C, H, W]` -> `[B, d, H', W']`: first one
            per backbone level, then any extra levels, each applied to the previous level's input
            (the first extra to the deepest backbone output, the next to that extra level, ...):
            Deformable DETR's stride-2 3x3 convolutions.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        position_encoding: nn.Module,
        transformer: Transformer,
        input_proj: Sequence[nn.Module],
    ) -> None:
        super().__init__()
        if len(input_proj) < len(backbone.num_channels):
            raise ValueError(
                f"need one input projection per backbone level (and one per extra level): "
                f"{len(input_proj)} projections, {len(backbone.num_channels)} backbone levels"
            )
        self.backbone = backbone
        self.position_encoding = position_encoding
        self.input_proj = nn.ModuleList(input_proj)
        self.transformer = transformer

    @property
    def num_levels(self) -> int:
        return len(self.input_proj)

    def feature_levels(
        self, images: Tensor, padding_mask: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Projected levels, shallowest first.

        Args:
            images: float `[B, 3, H, W]`, normalized, zero-padded bottom/right.
            padding_mask: bool `[B, H, W]`, True = padding.
        Returns:
            features `[B, d, H_l, W_l]`, masks bool `[B, H_l, W_l]` (True = padding; extra levels
            resize the image mask) and position embeddings `[B, d, H_l, W_l]`, one of each per level.
        """
        levels = self.backbone(images, padding_mask)
        features = [proj(level.features) for proj, level in zip(self.input_proj, levels, strict=False)]
        masks = [level.mask for level in levels]
        previous = levels[-1].features
        for proj in self.input_proj[len(levels) :]:
            previous = proj(previous)
            features.append(previous)
            masks.append(downsample_mask(padding_mask, previous.shape[-2:]))
        pos = [
            self.position_encoding(mask).to(feature.dtype)
            for feature, mask in zip(features, masks, strict=True)
        ]
        return features, masks, pos

    @staticmethod
    def memory_outputs(encoded: EncoderOutput) -> dict:
        return {"memory": encoded.memory, "memory_padding_mask": encoded.memory_padding_mask}


class Detector(DetectorBase):
    """DETR: a set of learned object queries decoded against image features.

    Args:
        backbone, position_encoding, transformer, input_proj: see `DetectorBase` (DETR: one level, a
            single 1x1 convolution).
        num_classes: real classes.
        num_queries: number of object queries (`query_embed` rows).
        aux_loss: also return the predictions of every earlier decoder layer.
        classification: "softmax" (DETR: a "no object" logit at index `num_classes`) or "sigmoid"
            (`num_classes` logits, focal loss).

    Attributes: `backbone`, `position_encoding`, `input_proj`, `transformer`, `query_embed`
    (`nn.Embedding(num_queries, d)`, the queries' position embeddings; the decoder starts from zero
    queries), `class_embed` (`Linear(d, num_classes + 1)`, or `num_classes` with sigmoid), `bbox_embed`
    (3-layer `MLP`, d -> 4).
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        position_encoding: nn.Module,
        transformer: Transformer,
        input_proj: Sequence[nn.Module],
        num_classes: int,
        num_queries: int,
        aux_loss: bool = True,
        classification: str = "softmax",
    ) -> None:
        super().__init__(
            backbone=backbone,
            position_encoding=position_encoding,
            transformer=transformer,
            input_proj=input_proj,
        )
        hidden_dim = transformer.embed_dim
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.classification = classification
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = class_head(hidden_dim, num_classes, classification)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)

    def forward(self, images: Tensor, padding_mask: Tensor, *, return_memory: bool = False) -> dict:
        """Detect objects in a padded batch.

        Args:
            images: float `[B, 3, H, W]`, ImageNet-normalized, zero-padded bottom/right.
            padding_mask: bool `[B, H, W]`, True = padding.
            return_memory: also return the encoder output.
        Returns:
            dict with `pred_logits` `[B, Q, C]` (C = num_classes + 1 with softmax, num_classes with
            sigmoid), `pred_boxes` `[B, Q, 4]` (normalized cxcywh, relative to each image's unpadded
            extent), `aux_outputs` (a list with one such dict per earlier decoder layer, shallowest
            first; empty without `aux_loss`) and, with `return_memory`, `memory` `[B, S, d]` and
            `memory_padding_mask` bool `[B, S]` (True = padding; S = sum of H_l * W_l over the levels).
        """
        features, masks, pos = self.feature_levels(images, padding_mask)
        query_set = detr_queries(self.query_embed, images.shape[0])
        decoded, encoded = self.transformer(features, masks, pos, query_set.queries, query_set.query_pos)
        hidden = decoded.hidden  # (L, B, Q, d)
        outputs = layer_outputs(self.class_embed(hidden), self.bbox_embed(hidden).sigmoid(), self.aux_loss)
        if return_memory:
            outputs.update(self.memory_outputs(encoded))
        return outputs


class DeformableDetector(DetectorBase):
    """Deformable DETR: queries with reference points, boxes predicted relative to them.

    Args:
        backbone, position_encoding, transformer, input_proj: see `DetectorBase` (Deformable DETR:
            Conv + GroupNorm projections, 4 levels: strides 8, 16, 32 and an extra stride-64 level).
        num_classes: real classes.
        num_queries: object queries (two-stage: encoder proposals kept).
        aux_loss: also return the predictions of every earlier decoder layer.
        classification: "sigmoid" (Deformable DETR, focal loss) or "softmax".
        box_refine: iterative box refinement: one class/box head per decoder layer, and each layer's
            boxes become the next layer's reference boxes.
        two_stage: queries from the best encoder proposals (needs `box_refine`); adds a head pair for
            the proposals and `enc_outputs` to the outputs.

    Attributes:
        query_embed: `nn.Embedding(num_queries, 2d)`, split into each query's position embedding
            (first d) and its initial content (last d); absent with `two_stage`.
        reference_points_head: `Linear(d, 2)`; sigmoid of it on the position embedding gives the
            query's reference point (x, y); absent with `two_stage`.
        proposal_queries: `TwoStageQueries` (with `two_stage`, else None).
        class_embed, bbox_embed: a `Linear(d, C)` and a 3-layer `MLP` d -> 4 shared by every layer; with
            `box_refine` a `ModuleList` of one per decoder layer (plus one for the proposals with
            `two_stage`).
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        position_encoding: nn.Module,
        transformer: Transformer,
        input_proj: Sequence[nn.Module],
        num_classes: int,
        num_queries: int,
        aux_loss: bool = True,
        classification: str = "sigmoid",
        box_refine: bool = False,
        two_stage: bool = False,
    ) -> None:
        super().__init__(
            backbone=backbone,
            position_encoding=position_encoding,
            transformer=transformer,
            input_proj=input_proj,
        )
        if two_stage and not box_refine:
            raise ValueError("two_stage needs box_refine (one head per decoder layer plus the proposal head)")
        hidden_dim = transformer.embed_dim
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.classification = classification
        self.box_refine = box_refine
        self.num_decoder_layers = len(transformer.decoder.layers)

        self.proposal_queries = TwoStageQueries(hidden_dim, num_queries) if two_stage else None
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, 2 * hidden_dim)
            self.reference_points_head = nn.Linear(hidden_dim, 2)
            nn.init.xavier_uniform_(self.reference_points_head.weight, gain=1.0)
            nn.init.zeros_(self.reference_points_head.bias)

        classifier = class_head(hidden_dim, num_classes, classification)
        box_head = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        if box_refine:
            num_heads = self.num_decoder_layers + (1 if two_stage else 0)
            self.class_embed = nn.ModuleList(copy.deepcopy(classifier) for _ in range(num_heads))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_heads))
            # Where the first layer turns reference points into boxes, sizes start at sigmoid(-2);
            # two-stage reference boxes already have sizes, so every head starts at zero offsets.
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], 0.0 if two_stage else -2.0)
        else:
            self.class_embed = classifier
            self.bbox_embed = box_head
            nn.init.constant_(self.bbox_embed.layers[-1].bias[2:], -2.0)

    def class_head(self, layer: int) -> nn.Module:
        """The class head of decoder layer `layer` (index `num_decoder_layers`: the proposals)."""
        return self.class_embed[layer] if self.box_refine else self.class_embed

    def box_head(self, layer: int) -> nn.Module:
        return self.bbox_embed[layer] if self.box_refine else self.bbox_embed

    def initial_queries(self, encoded: EncoderOutput, batch: int) -> QuerySet:
        """The query set: learned embeddings (`deformable_queries`, reference points `[B, Q, 2]`) or the
        two-stage proposals (`TwoStageQueries.query_set`, reference boxes `[B, Q, 4]`, `enc_outputs`)."""
        if self.proposal_queries is None:
            return deformable_queries(self.query_embed, self.reference_points_head, batch)
        layer = self.num_decoder_layers  # the proposal heads follow the decoder layers' heads
        return self.proposal_queries.query_set(encoded, self.class_head(layer), self.box_head(layer))

    def forward(self, images: Tensor, padding_mask: Tensor, *, return_memory: bool = False) -> dict:
        """Detect objects in a padded batch.

        Args:
            images: float `[B, 3, H, W]`, ImageNet-normalized, zero-padded bottom/right.
            padding_mask: bool `[B, H, W]`, True = padding.
            return_memory: also return the encoder output.
        Returns:
            dict with `pred_logits` `[B, Q, C]` (C = num_classes with sigmoid, num_classes + 1 with
            softmax), `pred_boxes` `[B, Q, 4]` (normalized cxcywh, relative to each image's unpadded
            extent), `aux_outputs` (one such dict per earlier decoder layer, shallowest first; empty
            without `aux_loss`); with `two_stage` `enc_outputs`: the proposals of every encoder token,
            `pred_logits` `[B, S, C]` and `pred_boxes` `[B, S, 4]` (unusable ones at (1, 1, 1, 1));
            with `return_memory`, `memory` `[B, S, d]` and `memory_padding_mask` bool `[B, S]`.
        """
        features, masks, pos = self.feature_levels(images, padding_mask)
        encoded = self.transformer.encode(features, masks, pos)
        query_set = self.initial_queries(encoded, images.shape[0])
        decoded = self.transformer.decode(
            query_set.queries,
            query_set.query_pos,
            encoded,
            reference_points=query_set.reference_points,
            box_heads=self.bbox_embed if self.box_refine else None,
        )
        logits, boxes = [], []
        for layer, (hidden, reference) in enumerate(zip(decoded.hidden, decoded.references, strict=True)):
            logits.append(self.class_head(layer)(hidden))
            boxes.append(refine_boxes(self.box_head(layer)(hidden), reference))
        outputs = layer_outputs(logits, boxes, self.aux_loss)
        if "enc_outputs" in query_set.meta:
            outputs["enc_outputs"] = query_set.meta["enc_outputs"]
        if return_memory:
            outputs.update(self.memory_outputs(encoded))
        return outputs
