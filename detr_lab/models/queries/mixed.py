"""Query selection from encoder proposals: DINO's mixed query selection and RT-DETR's.

Every encoder token proposes a box centred on its pixel (the two-stage proposals of
`detr_lab.models.two_stage`); a class head and a box head (the proposal heads, separate from the
decoder's) score and refine them; the top-K tokens by their best class logit give the decoder's
anchor boxes (detached) and the content queries are the learned `content` (`tgt_embed`), as
`DeformableTransformer.forward` with `two_stage_type='standard'` and `embed_init_tgt=True` in the
official DINO code.

RT-DETR's query selection ("iou_aware" in `QUERY_SOURCES`) selects the same way, and its content
queries are the selected proposal features themselves, detached (`content="selected"`, the official
`RTDETRTransformerv2._get_decoder_input` with `learn_query_content=False`; Lv et al. 2023, Sec. 4.3:
trained with the varifocal loss, the class score that ranks the proposals learns their IoU).
"""

from __future__ import annotations

import torch
from torch import nn

from detr_lab.models.queries.query_set import QuerySet
from detr_lab.models.transformer import EncoderOutput
from detr_lab.models.two_stage import encoder_proposals

CONTENTS = ("learned", "selected")


class MixedQuerySelection(nn.Module):
    """Top-K encoder proposals as anchors, with learned or selected content.

    Args:
        embed_dim: model width d. num_queries: K. class_head: `[..., d]` -> `[..., C]` logits;
        box_head: `[..., d]` -> `[..., 4]` box deltas in logit space (both owned here; DINO's
        `enc_out_class_embed` / `enc_out_bbox_embed`, RT-DETR's `enc_score_head` / `enc_bbox_head`).
        content: "learned" (DINO: a learned embedding per query) or "selected" (RT-DETR: the selected
            proposals' features, detached).

    Attributes: `memory_proj` + `memory_norm` (DINO's `enc_output`, `enc_output_norm`; RT-DETR's
    `enc_output.proj` / `.norm`), `class_head`, `box_head`, and with learned content `content`
    (`nn.Embedding(K, d)`, DINO's `tgt_embed`).
    """

    def __init__(
        self,
        embed_dim: int,
        num_queries: int,
        *,
        class_head: nn.Module,
        box_head: nn.Module,
        content: str = "learned",
    ) -> None:
        super().__init__()
        if content not in CONTENTS:
            raise ValueError(f"content must be one of {CONTENTS}, got {content!r}")
        self.num_queries = num_queries
        self.content_source = content
        self.memory_proj = nn.Linear(embed_dim, embed_dim)
        self.memory_norm = nn.LayerNorm(embed_dim)
        nn.init.xavier_uniform_(self.memory_proj.weight)
        self.class_head = class_head
        self.box_head = box_head
        self.content = None
        if content == "learned":
            self.content = nn.Embedding(num_queries, embed_dim)
            nn.init.normal_(self.content.weight)

    def forward(self, encoded: EncoderOutput, proposal_heads=None) -> QuerySet:
        """-> `QuerySet`: queries `[B, K, d]`, reference boxes `[B, K, 4]` (detached), and in `meta`
        `enc_outputs`: the selected proposals' `pred_logits` `[B, K, C]` and `pred_boxes` `[B, K, 4]`
        (normalized cxcywh, with gradients; unusable proposals at (1, 1, 1, 1)), and
        `selected_indices` int64 `[B, K]`: their encoder positions (levels flattened in order,
        row-major), best first.

        Raises:
            ValueError: fewer encoder tokens than K.
        """
        proposals, valid = encoder_proposals(
            encoded.memory_padding_mask, encoded.spatial_shapes, encoded.valid_sizes
        )
        if proposals.shape[1] < self.num_queries:
            raise ValueError(
                f"query selection needs at least num_queries={self.num_queries} encoder tokens, "
                f"got {proposals.shape[1]} (larger images or fewer queries)"
            )
        features = self.memory_norm(self.memory_proj(encoded.memory.masked_fill(~valid, 0.0)))  # (B, S, d)
        logits = self.class_head(features)  # (B, S, C)
        top = torch.topk(logits.max(-1).values, self.num_queries, dim=1).indices  # (B, K)
        chosen_features = features.gather(1, top[..., None].expand(-1, -1, features.shape[-1]))
        # The box head runs on the K selected proposals only: the official code runs it on all S tokens
        # and gathers K of them, the same values (a row's result does not depend on the other rows, up
        # to float rounding) for a fraction of the work (RT-DETR at 640 x 640: 300 of 8400 tokens, two
        # 256 x 256 matrix products over 8400 rows saved, about 5% of the model's CPU time).
        chosen_proposals = proposals.gather(1, top[..., None].expand(-1, -1, 4))
        chosen_boxes = self.box_head(chosen_features) + chosen_proposals  # (B, K, 4) logits; inf: unusable
        # The proposals' logits: RT-DETR gathers them, DINO scores the selected features again (the
        # same values up to the last bits of the matrix product; each as its official code).
        if self.content is None:
            queries = chosen_features.detach()
            chosen_logits = logits.gather(1, top[..., None].expand(-1, -1, logits.shape[-1]))
        else:
            queries = self.content.weight[None].expand(features.shape[0], -1, -1)
            chosen_logits = self.class_head(chosen_features)
        enc_outputs = {"pred_logits": chosen_logits, "pred_boxes": chosen_boxes.sigmoid()}
        meta = {"enc_outputs": enc_outputs, "selected_indices": top}
        return QuerySet(queries, chosen_boxes.detach().sigmoid(), meta=meta)


def build(
    *, embed_dim: int, num_queries: int, class_head: nn.Module, box_head: nn.Module, **_
) -> MixedQuerySelection:
    """DINO's source with its own proposal heads (fresh copies of the decoder's class and box heads)."""
    return MixedQuerySelection(embed_dim, num_queries, class_head=class_head, box_head=box_head)


def build_selected(
    *, embed_dim: int, num_queries: int, class_head: nn.Module, box_head: nn.Module, **_
) -> MixedQuerySelection:
    """RT-DETR's source: the selected proposal features are the content queries."""
    return MixedQuerySelection(
        embed_dim, num_queries, class_head=class_head, box_head=box_head, content="selected"
    )
