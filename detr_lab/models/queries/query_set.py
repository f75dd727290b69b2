"""The decoder's query set: what every query source returns.

May import torch and nothing else of detr_lab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class QuerySet:
    """Decoder queries from one source.

    queries `[B, Q, d]` (content); reference_points: `[B, Q, 4]` normalized (cx, cy, w, h) boxes
    (anchor-box and two-stage sources) or `[B, Q, 2]` normalized (x, y) points, relative to each
    image's unpadded extent, or None (DETR); attn_mask bool `[Q, Q]` for the decoder self-attention
    (True = may NOT attend) or None; meta: source-specific extras (e.g. `enc_outputs`, the denoising
    layout); query_pos `[B, Q, d]` when the source fixes the position embeddings (None: the decoder's
    query-position head makes them from the reference boxes).
    """

    queries: Tensor
    reference_points: Tensor | None
    attn_mask: Tensor | None = None
    meta: dict = field(default_factory=dict)
    query_pos: Tensor | None = None

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
    if (first.reference_points is None) != (second.reference_points is None) or (
        (first.query_pos is None) != (second.query_pos is None)
    ):
        raise ValueError(
            "query sets to concatenate must both have (or both lack) reference points and query_pos"
        )
    reference = None
    if first.reference_points is not None:
        reference = torch.cat((first.reference_points, second.reference_points), dim=1)
    query_pos = None
    if first.query_pos is not None:
        query_pos = torch.cat((first.query_pos, second.query_pos), dim=1)
    return QuerySet(
        torch.cat((first.queries, second.queries), dim=1),
        reference,
        mask,
        {**second.meta, **first.meta},
        query_pos,
    )
