"""Query sources: how the decoder's object queries are made, one small module per kind.

Every source returns a `QuerySet` in one order: content queries `[B, Q, d]`, their reference boxes
`[B, Q, 4]` (normalized cxcywh), the decoder self-attention mask it needs (or None) and a meta dict.

- `anchors.LearnedAnchors`: learned content and learned 4-D anchor boxes (DAB-DETR style).
- `mixed.MixedQuerySelection`: DINO's mixed query selection; the top-K encoder proposals give the
  anchors, the content is learned.
- `denoising.ContrastiveDenoising`: DINO's contrastive denoising queries made from the ground truth
  (training only), placed before the matching queries.
- `embedding`: the sine embedding of boxes and the per-layer query-position head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class QuerySet:
    """Decoder queries from one source.

    queries `[B, Q, d]` (content); reference_boxes `[B, Q, 4]` normalized (cx, cy, w, h) relative to
    each image's unpadded extent; attn_mask bool `[Q, Q]` for the decoder self-attention (True = may
    NOT attend) or None; meta: source-specific extras (e.g. `enc_outputs`, denoising layout).
    """

    queries: Tensor
    reference_boxes: Tensor
    attn_mask: Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[1]


def concat_query_sets(first: QuerySet, second: QuerySet) -> QuerySet:
    """`first` placed before `second` (e.g. denoising queries before the matching queries).

    The result's mask is `first.attn_mask` when given (it must already cover both parts, as the
    denoising mask does), else `second.attn_mask` padded with False; metas are merged.
    """
    total = first.num_queries + second.num_queries
    mask = first.attn_mask
    if mask is not None and tuple(mask.shape[-2:]) != (total, total):
        raise ValueError(
            f"the first query set's attention mask is {tuple(mask.shape)}; it must cover all {total} queries"
        )
    if mask is None and second.attn_mask is not None:
        mask = torch.zeros(total, total, dtype=torch.bool, device=second.queries.device)
        mask[first.num_queries :, first.num_queries :] = second.attn_mask
    return QuerySet(
        torch.cat((first.queries, second.queries), dim=1),
        torch.cat((first.reference_boxes, second.reference_boxes), dim=1),
        mask,
        {**second.meta, **first.meta},
    )
