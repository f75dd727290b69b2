"""Learned queries with learned 4-D anchor boxes (DAB-DETR; DINO without mixed query selection)."""

from __future__ import annotations

from torch import Tensor, nn

from detr_lab.models.queries import QuerySet


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

    def forward(self, batch: int) -> QuerySet:
        """-> `QuerySet` with queries `[batch, Q, d]`, reference boxes `[batch, Q, 4]` = sigmoid(anchors)."""
        queries = self.content.weight[None].expand(batch, -1, -1)
        boxes: Tensor = self.anchors.weight.sigmoid()[None].expand(batch, -1, -1)
        return QuerySet(queries, boxes)
