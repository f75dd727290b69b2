"""Two-stage Deformable DETR: encoder tokens propose boxes; the best proposals become the queries.

Every encoder token proposes a box centred on its pixel (size 0.05 * 2^level of the image); a
detection head scores it and refines it in logit space, and the top-k proposals by the score of the
first class become the decoder's reference boxes. Their sine embedding, through a linear layer and a
LayerNorm, gives each query's position embedding and its content.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from detr_lab.models.position import sine_embedding
from detr_lab.models.queries.query_set import QuerySet
from detr_lab.models.transformer import EncoderOutput

# Proposals whose box leaves (0.01, 0.99) in any coordinate are dropped (their logits become +inf).
PROPOSAL_MARGIN = 0.01
PROPOSAL_BASE_SIZE = 0.05  # width and height of a level-0 proposal, as a fraction of the image


def encoder_proposals(
    memory_padding_mask: Tensor, spatial_shapes: Tensor, valid_sizes: Tensor
) -> tuple[Tensor, Tensor]:
    """One box per encoder token, centred on its pixel, in logit space.

    Args:
        memory_padding_mask: bool `[B, S]` (True = padding), levels flattened row-major.
        spatial_shapes: int64 `[levels, 2]` (H, W).
        valid_sizes: int64 `[B, levels, 2]`, each level's unpadded (width, height) (`EncoderOutput`).
    Returns:
        proposals `[B, S, 4]`: inverse-sigmoid of normalized (cx, cy, w, h) relative to each image's
        unpadded extent, +inf at padding and for boxes too close to the border; valid bool `[B, S, 1]`
        (True = a usable proposal).
    """
    # Vectorized over all tokens (no loop over level sizes read on the host), so a traced graph (ONNX
    # export) stays valid for every input size: each token's level, pixel (x, y), and its level's
    # unpadded width / height (from `valid_sizes`).
    batch, length = memory_padding_mask.shape
    device = memory_padding_mask.device
    heights, widths = spatial_shapes[:, 0], spatial_shapes[:, 1]  # (L,)
    areas = heights * widths
    # Each level's first token: the areas of the levels before it, summed under a mask. Not `cumsum`:
    # OpenVINO does not fold a `CumSum` of constants, and its CPU plugin then divided the centres below
    # in place in a buffer it reuses, so a fixed-size export drifted on every call after the first.
    levels = torch.arange(areas.shape[0], device=device)
    starts = (areas[None, :] * (levels[None, :] < levels[:, None])).sum(1)  # (L,)
    token = torch.arange(length, device=device)  # (S,)
    level = (token[:, None] >= starts[None, :]).sum(1) - 1  # (S,)
    local = token - starts[level]
    xs = local % widths[level]
    ys = torch.div(local, widths[level], rounding_mode="floor")
    extent = valid_sizes.float()[:, level]  # (B, S, 2): each token's level's unpadded (width, height)
    centres = (torch.stack((xs, ys), dim=-1).float()[None] + 0.5) / extent  # (B, S, 2)
    # 0.05 * 2^level is exact in float32, as the per-level constant it replaces
    sizes = (2.0 ** level.float() * PROPOSAL_BASE_SIZE)[None, :, None].expand(batch, -1, 2)
    proposals = torch.cat((centres, sizes), dim=-1)  # (B, S, 4)
    valid = ((proposals > PROPOSAL_MARGIN) & (proposals < 1 - PROPOSAL_MARGIN)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(memory_padding_mask[..., None], float("inf"))
    proposals = proposals.masked_fill(~valid, float("inf"))
    valid = valid & ~memory_padding_mask[..., None]
    return proposals, valid


def proposal_sine_embedding(proposals: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of boxes given in logit space.

    Args:
        proposals: `[B, K, 4]` inverse-sigmoid (cx, cy, w, h).
        num_feats: features per coordinate (even).
    Returns:
        `[B, K, 4 * num_feats]`: per coordinate (in cx, cy, w, h order) sin/cos pairs of
        `2 pi * sigmoid(coordinate)` over a geometric range of frequencies, interleaved.
    """
    return sine_embedding(proposals.sigmoid() * (2 * math.pi), num_feats, temperature).flatten(2)


class TwoStageQueries(nn.Module):
    """The learned parts of the two-stage query selection (the scoring heads belong to the detector).

    Args:
        embed_dim: model width d.
        num_queries: proposals kept (k of the top-k).

    Attributes: `memory_proj` + `memory_norm` (Linear(d, d), LayerNorm) turn encoder tokens into
    proposal features; `query_proj` + `query_norm` (Linear(2d, 2d), LayerNorm) turn a proposal's sine
    embedding into (query_pos, queries).
    """

    def __init__(self, embed_dim: int, num_queries: int) -> None:
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"two-stage queries need a model width divisible by 4, got {embed_dim}")
        self.embed_dim = embed_dim
        self.num_queries = num_queries
        self.memory_proj = nn.Linear(embed_dim, embed_dim)
        self.memory_norm = nn.LayerNorm(embed_dim)
        self.query_proj = nn.Linear(2 * embed_dim, 2 * embed_dim)
        self.query_norm = nn.LayerNorm(2 * embed_dim)
        nn.init.xavier_uniform_(self.memory_proj.weight)
        nn.init.xavier_uniform_(self.query_proj.weight)

    def proposal_features(self, encoded: EncoderOutput) -> tuple[Tensor, Tensor]:
        """-> (features `[B, S, d]` for the proposal heads, proposals `[B, S, 4]` in logit space).

        Padding tokens and unusable proposals get zero input features and +inf proposals.
        """
        proposals, valid = encoder_proposals(
            encoded.memory_padding_mask, encoded.spatial_shapes, encoded.valid_sizes
        )
        memory = encoded.memory.masked_fill(~valid, 0.0)
        return self.memory_norm(self.memory_proj(memory)), proposals

    def select(self, scores: Tensor, proposal_boxes: Tensor) -> Tensor:
        """The `num_queries` best proposals.

        Args:
            scores: `[B, S]` (the first class logit of every proposal).
            proposal_boxes: `[B, S, 4]` refined proposals in logit space.
        Returns:
            `[B, num_queries, 4]` in logit space, detached (the decoder does not train the proposals).
        """
        if scores.shape[1] < self.num_queries:
            raise ValueError(
                f"two-stage selection needs at least num_queries={self.num_queries} encoder tokens, "
                f"got {scores.shape[1]} (larger images or fewer queries)"
            )
        top = scores.topk(self.num_queries, dim=1).indices  # (B, K)
        chosen = proposal_boxes.gather(1, top[..., None].expand(-1, -1, proposal_boxes.shape[-1]))
        return chosen.detach()

    def queries(self, chosen: Tensor) -> tuple[Tensor, Tensor]:
        """Selected proposals `[B, K, 4]` (logit space) -> (query_pos `[B, K, d]`, queries `[B, K, d]`)."""
        embedding = proposal_sine_embedding(chosen, self.embed_dim // 2)  # (B, K, 2d)
        query_pos, queries = self.query_norm(self.query_proj(embedding)).split(self.embed_dim, dim=-1)
        return query_pos, queries

    def forward(
        self, encoded: EncoderOutput, proposal_heads: tuple[nn.Module, nn.Module] | None = None
    ) -> QuerySet:
        """Two-stage queries from the encoder output, scored and refined by the proposal heads.

        Args:
            encoded: the encoder output.
            proposal_heads: (class_head, box_head), the detector's heads after the decoder layers':
                class_head `[B, S, d]` -> `[B, S, C]` logits (the first class ranks the proposals);
                box_head `[B, S, d]` -> `[B, S, 4]` deltas in logit space.
        Returns:
            `QuerySet`: queries and query_pos `[B, K, d]`, reference boxes `[B, K, 4]` normalized cxcywh
            (detached), meta `enc_outputs`: every token's proposal, `pred_logits` `[B, S, C]` and
            `pred_boxes` `[B, S, 4]` (unusable ones at (1, 1, 1, 1)).
        """
        if proposal_heads is None:
            raise ValueError("two-stage queries need the detector's proposal heads (class_head, box_head)")
        class_head, box_head = proposal_heads
        features, proposals = self.proposal_features(encoded)  # (B, S, d), (B, S, 4) logit space
        logits = class_head(features)  # (B, S, C)
        boxes = box_head(features) + proposals  # logit space, inf = unusable
        chosen = self.select(logits[..., 0], boxes)  # (B, K, 4)
        query_pos, queries = self.queries(chosen)
        enc_outputs = {"pred_logits": logits, "pred_boxes": boxes.sigmoid()}
        return QuerySet(queries, chosen.sigmoid(), meta={"enc_outputs": enc_outputs}, query_pos=query_pos)


def build(*, embed_dim: int, num_queries: int, **_) -> TwoStageQueries:
    return TwoStageQueries(embed_dim, num_queries)
