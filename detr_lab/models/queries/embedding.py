"""Sine embedding of boxes and the per-layer query-position heads of anchor-box decoders.

`POSITION_HEADS` is the table of these heads, named by the query-source spec's `position_head`.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from detr_lab.models.activations import activation_function
from detr_lab.models.position import sine_embedding


def box_sine_embedding(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalized boxes or points, in the order (y, x, w, h).

    Follows `gen_sineembed_for_position` of the official DINO / DAB-DETR code: each coordinate is
    scaled by 2 pi and divided by `temperature ** (2 * (i // 2) / num_feats)`; even channels take the
    sine, odd channels the cosine (interleaved).

    Args:
        boxes: `[..., 4]` normalized (cx, cy, w, h) or `[..., 2]` normalized (x, y).
        num_feats: features per coordinate (even; DINO: d / 2).
    Returns:
        `[..., 4 * num_feats]` (or `[..., 2 * num_feats]` for points): y, x, then w, h blocks.
    Raises:
        ValueError: boxes that end in neither 2 nor 4 values.
    """
    if boxes.shape[-1] not in (2, 4):
        raise ValueError(
            f"box_sine_embedding needs [..., 2] points or [..., 4] boxes, got {tuple(boxes.shape)}"
        )
    embedded = sine_embedding(boxes * (2 * math.pi), num_feats, temperature)  # (..., 4, F)
    order = [1, 0] + ([2, 3] if boxes.shape[-1] == 4 else [])  # (y, x, w, h)
    return embedded[..., order, :].flatten(-2)


class AnchorPositionHead(nn.Module):
    """Query position embeddings from the current anchor boxes (DAB-DETR / DINO `ref_point_head`).

    `query_pos = MLP(box_sine_embedding(boxes, d / 2))`, a 2-layer MLP 2d -> d -> d with ReLU between.

    Args:
        embed_dim: model width d (divisible by 4).
        activation: between the layers ("relu").
    """

    def __init__(self, embed_dim: int, *, activation: str = "relu") -> None:
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"anchor position embeddings need a width divisible by 4, got {embed_dim}")
        self.embed_dim = embed_dim
        self.layers = nn.ModuleList((nn.Linear(2 * embed_dim, embed_dim), nn.Linear(embed_dim, embed_dim)))
        self.act = activation_function(activation)
        for layer in self.layers:
            nn.init.xavier_uniform_(layer.weight)

    def forward(self, boxes: Tensor) -> Tensor:
        """`[B, Q, 4]` normalized cxcywh (the decoder passes them scaled to level 0) -> `[B, Q, d]`."""
        x = box_sine_embedding(boxes, self.embed_dim // 2)
        return self.layers[1](self.act(self.layers[0](x)))


class BoxPositionHead(nn.Module):
    """Query position embeddings straight from the current boxes (RT-DETR's `query_pos_head`).

    `query_pos = layers[1](relu(layers[0](boxes)))`, a 2-layer MLP 4 -> 2d -> d, Xavier-initialised,
    as the official `MLP(4, 2 * hidden_dim, hidden_dim, 2)` of lyuwenyu/RT-DETR.

    Args:
        embed_dim: model width d.
        activation: between the layers ("relu"; DEIM "silu").
    """

    def __init__(self, embed_dim: int, *, activation: str = "relu") -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.layers = nn.ModuleList((nn.Linear(4, 2 * embed_dim), nn.Linear(2 * embed_dim, embed_dim)))
        self.act = activation_function(activation)
        for layer in self.layers:
            nn.init.xavier_uniform_(layer.weight)

    def forward(self, boxes: Tensor) -> Tensor:
        """`[B, Q, 4]` normalized cxcywh -> `[B, Q, d]`."""
        return self.layers[1](self.act(self.layers[0](boxes)))


# QuerySourceSpec.position_head -> the head's class (built with the model width d).
POSITION_HEADS: dict[str, type[nn.Module]] = {"anchor_sine": AnchorPositionHead, "box_mlp": BoxPositionHead}
