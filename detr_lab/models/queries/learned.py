"""Learned query embeddings of DETR and one-stage Deformable DETR, as query sources."""

from __future__ import annotations

import torch
from torch import nn

from detr_lab.models.queries.query_set import QuerySet
from detr_lab.models.transformer import EncoderOutput


class LearnedQueries(nn.Module):
    """DETR (Carion et al. 2020): `query_embed` `(Q, d)` are the position embeddings, content starts at 0.

    Attributes: `query_embed` (`nn.Embedding(Q, d)`).
    """

    def __init__(self, embed_dim: int, num_queries: int) -> None:
        super().__init__()
        self.query_embed = nn.Embedding(num_queries, embed_dim)

    def forward(self, encoded: EncoderOutput, proposal_heads=None) -> QuerySet:
        """-> `QuerySet` with queries zeros `[B, Q, d]`, query_pos `[B, Q, d]`, no reference points."""
        query_pos = self.query_embed.weight[None].expand(encoded.memory.shape[0], -1, -1)  # (B, Q, d)
        return QuerySet(torch.zeros_like(query_pos), None, query_pos=query_pos)


class LearnedPointQueries(nn.Module):
    """One-stage Deformable DETR (Zhu et al. 2021): `query_embed` `(Q, 2d)` splits into position (first
    d) and content (last d); the sigmoid of `reference_points_head` on the position gives each query's
    reference point.

    Attributes: `query_embed` (`nn.Embedding(Q, 2d)`), `reference_points_head` (`Linear(d, 2)`,
    Xavier-uniform weight, zero bias).
    """

    def __init__(self, embed_dim: int, num_queries: int) -> None:
        super().__init__()
        self.query_embed = nn.Embedding(num_queries, 2 * embed_dim)
        self.reference_points_head = nn.Linear(embed_dim, 2)
        nn.init.xavier_uniform_(self.reference_points_head.weight, gain=1.0)
        nn.init.zeros_(self.reference_points_head.bias)

    def forward(self, encoded: EncoderOutput, proposal_heads=None) -> QuerySet:
        """-> `QuerySet` with queries and query_pos `[B, Q, d]`, reference points `[B, Q, 2]`
        normalized (x, y)."""
        batch = encoded.memory.shape[0]
        d = self.query_embed.weight.shape[1] // 2
        query_pos, queries = self.query_embed.weight.split(d, dim=1)  # (Q, d) each
        query_pos = query_pos[None].expand(batch, -1, -1)
        queries = queries[None].expand(batch, -1, -1)
        reference_points = self.reference_points_head(query_pos).sigmoid()  # (B, Q, 2)
        return QuerySet(queries, reference_points, query_pos=query_pos)


def build_learned(*, embed_dim: int, num_queries: int, **_) -> LearnedQueries:
    return LearnedQueries(embed_dim, num_queries)


def build_learned_points(*, embed_dim: int, num_queries: int, **_) -> LearnedPointQueries:
    return LearnedPointQueries(embed_dim, num_queries)
