"""Learned queries with learned 4-D anchor boxes (DAB-DETR; DINO without mixed query selection)."""

from __future__ import annotations

from torch import Tensor, nn

from detr_lab.models.queries.query_set import QuerySet
from detr_lab.models.transformer import EncoderOutput


class LearnedAnchors(nn.Module):
    """`num_queries` learned content vectors and anchor boxes, the same for every image.

    Attributes: `content` (`nn.Embedding(Q, d)`, DINO's `tgt_embed`), `anchors`
    (`nn.Embedding(Q, 4)`, unnormalized logits of (cx, cy, w, h), DINO's `refpoint_embed`).
    """

    def __init__(self, embed_dim: int, num_queries: int) -> None:
        super().__init__()
        self.content = nn.Embedding(num_queries, embed_dim)
        self.anchors = nn.Embedding(num_queries, 4)
        nn.init.normal_(self.content.weight)

    def forward(self, encoded: EncoderOutput, proposal_heads=None) -> QuerySet:
        """-> `QuerySet` with queries `[B, Q, d]`, reference boxes `[B, Q, 4]` = sigmoid(anchors)."""
        batch = encoded.memory.shape[0]
        queries = self.content.weight[None].expand(batch, -1, -1)
        boxes: Tensor = self.anchors.weight.sigmoid()[None].expand(batch, -1, -1)
        return QuerySet(queries, boxes)


def build(*, embed_dim: int, num_queries: int, **_) -> LearnedAnchors:
    return LearnedAnchors(embed_dim, num_queries)
