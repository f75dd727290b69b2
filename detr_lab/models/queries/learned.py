"""Learned query embeddings of DETR and one-stage Deformable DETR.

The parameters stay on the detectors (`query_embed`, `reference_points_head`, as the official
checkpoints name them); these functions turn them into a `QuerySet` for a batch.
"""

from __future__ import annotations

import torch
from torch import nn

from detr_lab.models.queries import QuerySet


def detr_queries(query_embed: nn.Embedding, batch: int) -> QuerySet:
    """DETR (Carion et al. 2020): `query_embed` `(Q, d)` are the position embeddings, content starts at 0.

    Returns: `QuerySet` with queries zeros `[batch, Q, d]`, query_pos `[batch, Q, d]`, no reference points.
    """
    query_pos = query_embed.weight[None].expand(batch, -1, -1)  # (B, Q, d)
    return QuerySet(torch.zeros_like(query_pos), None, query_pos=query_pos)


def deformable_queries(query_embed: nn.Embedding, reference_points_head: nn.Module, batch: int) -> QuerySet:
    """One-stage Deformable DETR (Zhu et al. 2021): `query_embed` `(Q, 2d)` splits into position (first
    d) and content (last d); the sigmoid of `reference_points_head` on the position gives each query's
    reference point.

    Returns: `QuerySet` with queries and query_pos `[batch, Q, d]`, reference points `[batch, Q, 2]`
    normalized (x, y).
    """
    d = query_embed.weight.shape[1] // 2
    query_pos, queries = query_embed.weight.split(d, dim=1)  # (Q, d) each
    query_pos = query_pos[None].expand(batch, -1, -1)
    queries = queries[None].expand(batch, -1, -1)
    reference_points = reference_points_head(query_pos).sigmoid()  # (B, Q, 2)
    return QuerySet(queries, reference_points, query_pos=query_pos)
