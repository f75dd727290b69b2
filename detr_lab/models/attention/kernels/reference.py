"""Multi-scale deformable attention core in plain PyTorch: one `grid_sample` per feature level.

This is the readable definition every faster path is checked against. It runs on any device
(CPU, CUDA, MPS) with autograd, and nothing in it is compiled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_core_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sample each level bilinearly at the given locations and sum with the attention weights.

    Args:
        value: `[B, Lv, heads, dh]`, the flattened levels one after another (Lv = sum of H*W).
        spatial_shapes: int64 `[L, 2]`, (H, W) of each level.
        level_start_index: int64 `[L]`, where each level starts in `Lv` (unused here: levels are
            split by their sizes, which is equivalent for consistent inputs).
        sampling_locations: `[B, Lq, heads, L, P, 2]`, normalized (x, y) in [0, 1] over each level;
            (0, 0) is the top-left corner of the top-left pixel, pixel centres are at (j+0.5)/W.
            Points outside the map read zeros (bilinear, zero padding, align_corners=False).
        attention_weights: `[B, Lq, heads, L, P]`.

    Returns:
        `[B, Lq, heads*dh]` in `value`'s dtype; float16 / bfloat16 values are sampled in float32 (a
        half-precision grid would be off by a fraction of a pixel on large maps).
    """
    out_dtype = value.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        value = value.float()
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    per_level_values = value.split(sizes, dim=1)
    # grid_sample wants coordinates in [-1, 1]; with align_corners=False, -1 is the outer edge.
    grids = (2 * sampling_locations - 1).to(value.dtype)
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        # (B, H*W, nh, dh) -> (B*nh, dh, H, W)
        level_map = per_level_values[level].permute(0, 2, 3, 1)
        level_map = level_map.reshape(batch * heads, head_dim, height, width)
        # (B, Lq, nh, P, 2) -> (B*nh, Lq, P, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(level_map, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*nh, dh, Lq, P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*nh, dh, Lq, L*P)
    # (B, Lq, nh, L, P) -> (B*nh, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2)
    weights = weights.reshape(batch * heads, 1, num_queries, num_levels * num_points)
    output = (stacked * weights.to(value.dtype)).sum(-1)  # (B*nh, dh, Lq)
    return output.view(batch, heads * head_dim, num_queries).transpose(1, 2).contiguous().to(out_dtype)
