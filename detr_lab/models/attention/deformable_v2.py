"""Multi-scale deformable attention of RT-DETRv2 (Lv et al. 2024, "RT-DETRv2: Improved Baseline with
Bag-of-Freebies", Sec. 3): a number of sampling points per level, and a choice of sampling method.

It is Deformable DETR's attention (`detr_lab.models.attention.deformable`) with two changes, as the
official `MSDeformableAttention` of lyuwenyu/RT-DETR (rtdetrv2_pytorch/src/zoo/rtdetr/rtdetrv2_decoder.py)
computes them:

- `num_points` may differ per level (e.g. [4, 4, 2]). The offsets and weights of one head are laid
  out level after level (`total = sum(num_points)` per head) and the softmax runs over all of them.
  Around a reference box the offset of a point of level l is scaled by `1 / num_points[l]` (the
  buffer `num_points_scale`, one entry per point, as in the official checkpoints), the box size and
  `offset_scale` (0.5): `location = centre + offset * num_points_scale * (w, h) * offset_scale`.
  Around reference points (x, y): `location = point + offset / (W_l, H_l)`.
- `sampling`: "default" samples bilinearly with zeros outside the map (as Deformable DETR: the fast
  cores of `kernels` run it); "discrete" reads the nearest value without interpolation, at pixel
  `int(location * size + 0.5)` clamped to the map (the official `discrete` method, meant for
  deployment targets without `grid_sample`). Its sampling offsets are frozen (`requires_grad` False),
  as the official module's. The official code clamps x to the map's height (it assumes square
  maps); this module clamps x to the width, which agrees wherever the official code is defined.

Parameter and buffer names and shapes are the official ones, so RT-DETRv2 checkpoints load unchanged.
The call contract is the shared one (`detr_lab.models.attention.plain`): `forward` is Deformable DETR's
module's (input checks, value projection and padding, output projection); this module changes how the
points are placed and sampled (`attend`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .deformable import MultiScaleDeformableAttention
from .kernels import CORE_IMPLS, ms_deform_attn_core

SAMPLING_METHODS = ("default", "discrete")


class MultiScaleDeformableAttentionV2(MultiScaleDeformableAttention):
    """Deformable attention with per-level sampling points and a sampling method (see module docstring).

    Args:
        embed_dim: model width d (divisible by `num_heads`).
        num_levels: feature levels L.
        num_heads: attention heads.
        num_points: sampling points per head, one number for every level or one per level.
        sampling: "default" (bilinear) or "discrete" (nearest value, frozen offsets).
        offset_scale: the scale of offsets around reference boxes (official 0.5).
        projections: the value and output projections (`value_proj`, `output_proj`); False makes both
            the identity, as D-FINE's attention (Peterande/D-FINE `dfine_decoder.py`), which has none.
        dropout: accepted for the uniform constructor and ignored (no dropout in the official module).
        core_impl: the bilinear core ("auto", "reference", "cpu_fast", "triton", "gather").

    Raises:
        ValueError: a width not divisible by the heads, a points list of another length than the
            levels, a point count below 1, an unknown sampling method or core.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_levels: int = 3,
        num_heads: int = 8,
        num_points: int | Sequence[int] = 4,
        *,
        sampling: str = "default",
        offset_scale: float = 0.5,
        projections: bool = True,
        dropout: float = 0.0,
        core_impl: str = "auto",
    ) -> None:
        nn.Module.__init__(self)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if core_impl not in CORE_IMPLS:
            raise ValueError(f"core_impl must be one of {CORE_IMPLS}, got {core_impl!r}")
        if sampling not in SAMPLING_METHODS:
            raise ValueError(f"sampling must be one of {SAMPLING_METHODS}, got {sampling!r}")
        points = (
            [int(num_points)] * num_levels if isinstance(num_points, int) else [int(p) for p in num_points]
        )
        if len(points) != num_levels or min(points) < 1:
            raise ValueError(
                f"num_points must be a positive count or one positive count per level ({num_levels}), "
                f"got {num_points}"
            )
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.level_points = points
        self.num_points = max(points)  # the slots per level of the bilinear cores (padded with zeros)
        self.total_points = sum(points)
        self.head_dim = embed_dim // num_heads
        self.sampling = sampling
        self.offset_scale = offset_scale
        self.core_impl = core_impl
        scale = [1.0 / count for count in points for _ in range(count)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))
        # Level of every point, and its slot in the [L, max points] layout of the bilinear cores.
        level_of_point = [level for level, count in enumerate(points) for _ in range(count)]
        slots = [level * self.num_points + i for level, count in enumerate(points) for i in range(count)]
        self.register_buffer("level_of_point", torch.tensor(level_of_point), persistent=False)
        self.register_buffer("point_slots", torch.tensor(slots), persistent=False)
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * self.total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * self.total_points)
        self.projections = projections
        self.value_proj = nn.Linear(embed_dim, embed_dim) if projections else nn.Identity()
        self.output_proj = nn.Linear(embed_dim, embed_dim) if projections else nn.Identity()
        self.reset_parameters()
        if sampling == "discrete":
            self.sampling_offsets.requires_grad_(False)

    def reset_parameters(self) -> None:
        """The official initialization: head h's offsets point along angle 2*pi*h/heads (scaled so the
        larger of |cos|, |sin| is 1), point i of a level at distance i + 1; uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack((angles.cos(), angles.sin()), dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values  # (nh, 2)
        distances = torch.cat([torch.arange(1, count + 1) for count in self.level_points]).float()
        grid = directions[:, None, :] * distances[None, :, None]  # (nh, total, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        if self.projections:
            nn.init.xavier_uniform_(self.value_proj.weight)
            nn.init.zeros_(self.value_proj.bias)
            nn.init.xavier_uniform_(self.output_proj.weight)
            nn.init.zeros_(self.output_proj.bias)

    def point_locations(self, offsets: Tensor, reference_points: Tensor, spatial_shapes: Tensor) -> Tensor:
        """Normalized (x, y) locations `[B, Lq, heads, total, 2]` of every point.

        Args:
            offsets: `[B, Lq, heads, total, 2]`.
            reference_points: `[B, Lq, L, 2]` normalized (x, y) or `[B, Lq, L, 4]` normalized
                (cx, cy, w, h), one per level.
            spatial_shapes: int64 `[L, 2]` (H, W).
        """
        reference = reference_points[:, :, None].index_select(3, self.level_of_point)  # (B, Lq, 1, T, 2|4)
        if reference_points.shape[-1] == 2:
            sizes = spatial_shapes.flip(-1).to(offsets.dtype).index_select(0, self.level_of_point)  # (T, 2)
            return reference + offsets / sizes
        scale = self.num_points_scale.to(offsets.dtype)[:, None]  # (T, 1)
        return reference[..., :2] + offsets * scale * reference[..., 2:] * self.offset_scale

    def attend(
        self,
        query: Tensor,
        value: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        attn_mask: Tensor | None,
    ) -> Tensor:
        """Offsets and weights of every point from `query` `[B, Lq, d]`, sampled from `value`
        `[B, Lv, heads, hd]` by the sampling method -> `[B, Lq, d]` (before the output projection).

        Raises:
            ValueError: an `attn_mask` with discrete sampling (the default sampling takes one).
        """
        if attn_mask is not None and self.sampling == "discrete":
            raise ValueError("discrete sampling takes no attn_mask")
        batch, num_queries, _ = query.shape
        heads, total = self.num_heads, self.total_points
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, total, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, total).softmax(-1)
        locations = self.point_locations(offsets, reference_points, spatial_shapes)
        if self.sampling == "discrete":
            return self.discrete_core(value, spatial_shapes, level_start_index, locations, weights)
        locations, weights = self.level_slots(locations, weights)
        return ms_deform_attn_core(
            value, spatial_shapes, level_start_index, locations, weights, impl=self.core_impl,
            attn_mask=attn_mask,
        )  # fmt: skip

    def level_slots(self, locations: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """`[B, Lq, heads, total, 2]` locations and `[B, Lq, heads, total]` weights -> the bilinear
        cores' `[B, Lq, heads, L, P, 2]` and `[B, Lq, heads, L, P]` (P = most points of a level); the
        slots a level does not use get weight 0 (they add exactly nothing)."""
        batch, num_queries, heads = weights.shape[:3]
        shape = (batch, num_queries, heads, self.num_levels, self.num_points)
        if self.total_points == self.num_levels * self.num_points:  # the same count on every level
            return locations.view(*shape, 2), weights.view(shape)
        padded_locations = locations.new_zeros(batch, num_queries, heads, shape[3] * shape[4], 2)
        padded_weights = weights.new_zeros(batch, num_queries, heads, shape[3] * shape[4])
        padded_locations = padded_locations.index_copy(3, self.point_slots, locations)
        padded_weights = padded_weights.index_copy(3, self.point_slots, weights)
        return padded_locations.view(*shape, 2), padded_weights.view(shape)

    def discrete_core(
        self,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        locations: Tensor,
        weights: Tensor,
    ) -> Tensor:
        """Nearest-value sampling: value `[B, Lv, heads, hd]`, locations `[B, Lq, heads, total, 2]`
        normalized (x, y), weights `[B, Lq, heads, total]` -> `[B, Lq, d]`.

        Point p of level l reads pixel (x, y) = `int(location * (W_l, H_l) + 0.5)` (truncated toward
        zero, as `Tensor.to(int64)`), clamped into the map, and contributes `weight * value` there.
        """
        batch, num_queries, heads, total, _ = locations.shape
        sizes = spatial_shapes.flip(-1).index_select(0, self.level_of_point)  # (T, 2): (W, H)
        pixel = (locations * sizes + 0.5).to(torch.int64)
        pixel = torch.minimum(pixel.clamp(min=0), sizes - 1)
        starts = level_start_index.index_select(0, self.level_of_point)  # (T,)
        flat = starts + pixel[..., 1] * sizes[:, 0] + pixel[..., 0]  # (B, Lq, heads, T)
        # value as (B, heads, Lv, hd): gather each head's rows at its points' flat positions
        per_head = value.permute(0, 2, 1, 3)
        index = flat.permute(0, 2, 1, 3).reshape(batch, heads, num_queries * total, 1)
        sampled = per_head.gather(2, index.expand(-1, -1, -1, self.head_dim))  # (B, heads, Lq*T, hd)
        sampled = sampled.view(batch, heads, num_queries, total, self.head_dim)
        weighted = sampled * weights.permute(0, 2, 1, 3)[..., None]
        output = weighted.sum(3)  # (B, heads, Lq, hd)
        return output.permute(0, 2, 1, 3).reshape(batch, num_queries, self.embed_dim)


def build(
    *,
    embed_dim: int,
    num_heads: int,
    dropout: float,
    num_levels: int,
    num_points: int,
    level_points: Sequence[int] | None = None,
    sampling: str = "default",
    projections: bool = True,
    **_,
) -> MultiScaleDeformableAttentionV2:
    """The "deformable_v2" variant: `level_points` (one count per level) when given, else `num_points`
    on every level; `sampling` "default" or "discrete"; `projections` False: no value and output
    projections (D-FINE)."""
    points = list(level_points) if level_points else num_points
    return MultiScaleDeformableAttentionV2(
        embed_dim, num_levels, num_heads, points, sampling=sampling, projections=projections, dropout=dropout
    )
