"""Anchor-box detectors: DAB-DETR-style 4-D anchor queries with the DINO extensions as switches.

`AnchorDetector` decodes queries that each carry a 4-D anchor box (normalized cxcywh). Every decoder
layer gets its `query_pos` from its current boxes (sine embedding, then an MLP: `AnchorPositionHead`)
and refines them; class and box heads may be shared across layers. Optional parts, each a switch:

- mixed query selection (`MixedQuerySelection`): the top-K encoder proposals give the anchors,
  the content queries are learned; the selected proposals are returned as `enc_outputs`;
- contrastive denoising (`ContrastiveDenoising`, training only): noised ground truth as extra
  queries before the matching ones, hidden from them by the self-attention mask; their predictions
  are returned apart, in `dn_outputs`, with the layout in `dn_meta`;
- look-forward-twice: each layer's boxes are predicted relative to the previous layer's boxes with
  their gradient kept.

With all of them on, deformable attention, 4 or 5 levels and sine encoding at temperature 20, this is
DINO (Zhang et al. 2022, arXiv:2203.03605) as the official IDEA-Research/DINO code computes it
(models/dino/dino.py, deformable_transformer.py). With plain attention it is DAB/DN-DETR-like.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import Tensor, nn

from detr_lab.models.backbones import Backbone
from detr_lab.models.detector import MLP, DetectorBase, class_head, layer_outputs
from detr_lab.models.queries import QuerySet, concat_query_sets
from detr_lab.models.queries.anchors import LearnedAnchors
from detr_lab.models.queries.denoising import DINO_LOGIT_EPS, ContrastiveDenoising, DenoisingLayout
from detr_lab.models.queries.embedding import AnchorPositionHead
from detr_lab.models.queries.mixed import MixedQuerySelection
from detr_lab.models.transformer import EncoderOutput, Transformer, refine_boxes


class AnchorDetector(DetectorBase):
    """Detector whose decoder queries are 4-D anchor boxes (DAB-DETR / DINO).

    Args:
        backbone, position_encoding, transformer, input_proj: see `DetectorBase` (DINO: Conv +
            GroupNorm projections, 4 levels (C3-C5 + a strided level) or 5 (C2-C5 + one)).
        num_classes: real classes (sigmoid focal classification).
        num_queries: matching queries.
        aux_loss: also return every earlier decoder layer's predictions.
        share_heads: one class head and one box head for every decoder layer (DINO).
        mixed_query_selection: anchors from the top-K encoder proposals (else learned anchors).
        look_forward_twice: see `Decoder.forward`.
        denoising: a `ContrastiveDenoising` module, or None.

    Attributes: `query_pos_head` (`AnchorPositionHead`), `query_source` (`MixedQuerySelection` or
    `LearnedAnchors`), `denoising`, `class_embed` / `bbox_embed` (one `Linear(d, C)` / 3-layer `MLP`
    when shared, else a `ModuleList` with one per decoder layer).
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
        share_heads: bool = True,
        mixed_query_selection: bool = True,
        look_forward_twice: bool = True,
        denoising: ContrastiveDenoising | None = None,
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
        self.classification = "sigmoid"
        self.share_heads = share_heads
        self.look_forward_twice = look_forward_twice
        self.num_decoder_layers = len(transformer.decoder.layers)

        classifier = class_head(hidden_dim, num_classes, "sigmoid")
        box_head = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        self.query_pos_head = AnchorPositionHead(hidden_dim)
        if mixed_query_selection:
            self.query_source: nn.Module = MixedQuerySelection(
                hidden_dim,
                num_queries,
                class_head=copy.deepcopy(classifier),
                box_head=copy.deepcopy(box_head),
            )
        else:
            self.query_source = LearnedAnchors(hidden_dim, num_queries)
        self.denoising = denoising
        if share_heads:
            self.class_embed: nn.Module = classifier
            self.bbox_embed: nn.Module = box_head
        else:
            self.class_embed = nn.ModuleList(
                copy.deepcopy(classifier) for _ in range(self.num_decoder_layers)
            )
            self.bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(self.num_decoder_layers))

    @property
    def uses_targets(self) -> bool:
        """Training needs the targets in `forward` (denoising queries are made from them)."""
        return self.denoising is not None

    def class_head(self, layer: int) -> nn.Module:
        return self.class_embed if self.share_heads else self.class_embed[layer]

    def box_head(self, layer: int) -> nn.Module:
        return self.bbox_embed if self.share_heads else self.bbox_embed[layer]

    def matching_queries(self, encoded: EncoderOutput, batch: int) -> QuerySet:
        """The matching queries: `[B, Q, d]` content with `[B, Q, 4]` anchors (normalized cxcywh)."""
        if isinstance(self.query_source, MixedQuerySelection):
            return self.query_source(encoded)
        return self.query_source(batch)

    def forward(
        self,
        images: Tensor,
        padding_mask: Tensor,
        *,
        targets: list[dict] | None = None,
        return_memory: bool = False,
    ) -> dict:
        """Detect objects in a padded batch.

        Args:
            images: float `[B, 3, H, W]`, ImageNet-normalized, zero-padded bottom/right.
            padding_mask: bool `[B, H, W]`, True = padding.
            targets: training with denoising: B dicts with `labels` int64 `[N_i]` and `boxes` `[N_i, 4]`
                normalized cxcywh; ignored in eval mode or without denoising.
            return_memory: also return the encoder output.
        Returns:
            dict with `pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]` (normalized cxcywh, relative to
            each image's unpadded extent), `aux_outputs` (one such dict per earlier decoder layer,
            shallowest first; empty without `aux_loss`); with mixed query selection `enc_outputs`: the
            selected proposals (`pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]`); when denoising ran,
            `dn_outputs` (the same structure over the P denoising queries) and `dn_meta`
            (a `DenoisingLayout`); with `return_memory`, `memory` and `memory_padding_mask`.
        """
        features, masks, pos = self.feature_levels(images, padding_mask)
        encoded = self.transformer.encode(features, masks, pos)
        query_set = self.matching_queries(encoded, images.shape[0])
        layout: DenoisingLayout | None = None
        if self.denoising is not None and self.training and targets is not None:
            dn_set = self.denoising(targets, query_set.num_queries)
            layout = dn_set.meta["dn_layout"]
            query_set = concat_query_sets(dn_set, query_set)
        decoded = self.transformer.decode(
            query_set.queries,
            None,
            encoded,
            reference_points=query_set.reference_points,
            box_heads=[self.box_head(layer) for layer in range(self.num_decoder_layers)],
            query_pos_head=self.query_pos_head,
            self_attn_mask=query_set.attn_mask,
            look_forward_twice=self.look_forward_twice,
            logit_eps=DINO_LOGIT_EPS,
        )
        hidden = decoded.hidden  # (L, B, P + Q, d)
        if self.denoising is not None and self.training:
            # The label embedding takes part in every step's graph, also when no image has objects
            # (so every rank of a distributed run uses the same parameters), as the official code.
            hidden = hidden + self.denoising.label_embed.weight[0, 0] * 0.0
        logits, boxes = [], []
        for layer, (layer_hidden, reference) in enumerate(zip(hidden, decoded.references, strict=True)):
            logits.append(self.class_head(layer)(layer_hidden))
            boxes.append(refine_boxes(self.box_head(layer)(layer_hidden), reference, eps=DINO_LOGIT_EPS))
        pad = layout.pad_size if layout is not None else 0
        outputs = layer_outputs([x[:, pad:] for x in logits], [x[:, pad:] for x in boxes], self.aux_loss)
        if "enc_outputs" in query_set.meta:
            outputs["enc_outputs"] = query_set.meta["enc_outputs"]
        if layout is not None:
            outputs["dn_meta"] = layout
            if pad:
                outputs["dn_outputs"] = layer_outputs(
                    [x[:, :pad] for x in logits], [x[:, :pad] for x in boxes], self.aux_loss
                )
        if return_memory:
            outputs.update(self.memory_outputs(encoded))
        return outputs
