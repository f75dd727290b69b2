"""Multi-scale deformable attention core in plain PyTorch: one `grid_sample` per feature level.

This is the readable definition every faster path is checked against. It runs on any device
(CPU, CUDA, MPS) with autograd, and nothing in it is compiled.

`ms_deform_attn_core_masked` is the same computation with an `attn_mask`: the four bilinear corners
of every sampling point are gathered explicitly, and a corner at a key the query may not attend to
contributes zero, as a padded key (a zeroed value row) or a corner outside the map does.
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
    # (B, Lq, nh, L, P) -> (B*nh, 1, Lq, L, P)
    weights = attention_weights.transpose(1, 2).to(value.dtype)
    weights = weights.reshape(batch * heads, 1, num_queries, num_levels, num_points)
    # Each level's samples are weighted and summed as they come, not stacked first: the stack copied
    # every sample once more (an exported Deformable DETR at 800 x 1066 spent 9% of its onnxruntime
    # time in that Concat).
    output = None
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        # (B, H*W, nh, dh) -> (B*nh, dh, H, W)
        level_map = per_level_values[level].permute(0, 2, 3, 1)
        level_map = level_map.reshape(batch * heads, head_dim, height, width)
        # (B, Lq, nh, P, 2) -> (B*nh, Lq, P, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(
            level_map, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (B*nh, dh, Lq, P)
        contribution = (sampled * weights[..., level, :]).sum(-1)  # (B*nh, dh, Lq)
        output = contribution if output is None else output + contribution
    return output.view(batch, heads * head_dim, num_queries).transpose(1, 2).contiguous().to(out_dtype)


def ms_deform_attn_core_masked(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    attn_mask: Tensor,
) -> Tensor:
    """`ms_deform_attn_core_reference` where masked keys contribute nothing to a query's samples.

    Bilinear sampling at (x, y) reads the four pixels around `(x * W - 0.5, y * H - 0.5)` with
    weights `(1 - fx)(1 - fy)`, `fx (1 - fy)`, `(1 - fx) fy`, `fx fy` (`grid_sample`,
    `align_corners=False`, zero padding). Here each corner's weight is also set to zero when the
    corner is outside the map or when `attn_mask[b, h, q, key]` is True for its flat key index
    `level_start + row * W + col`. With an all-False mask the result equals the reference.

    Args:
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights: as
            `ms_deform_attn_core_reference` (`level_start_index` unused likewise).
        attn_mask: bool `[B or 1, heads or 1, Lq, Lv]`, True = the query may not attend to the key
            (see `detr_lab.models.attention.masks.normalize_attn_mask`).

    Returns:
        `[B, Lq, heads*dh]` in `value`'s dtype (computed in float32 for half-precision values). A
        query whose samples all fall on masked keys returns zeros.

    Memory: a `[B, heads, Lq, L*P*4, dh]` gather, four times the reference's sampled tensor.
    """
    out_dtype = value.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        value = value.float()
    batch, length, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    locations = sampling_locations.to(value.dtype).permute(0, 2, 1, 3, 4, 5)  # (B, nh, Lq, L, P, 2)
    weights = attention_weights.to(value.dtype).permute(0, 2, 1, 3, 4)  # (B, nh, Lq, L, P)
    indices, corner_weights = [], []
    start = 0
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        x = locations[:, :, :, level, :, 0] * width - 0.5  # (B, nh, Lq, P) pixel coordinates
        y = locations[:, :, :, level, :, 1] * height - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        for dx, dy, bilinear in (
            (0, 0, (1 - fx) * (1 - fy)),
            (1, 0, fx * (1 - fy)),
            (0, 1, (1 - fx) * fy),
            (1, 1, fx * fy),
        ):
            col, row = x0 + dx, y0 + dy
            inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
            flat = start + row.clamp(0, height - 1).long() * width + col.clamp(0, width - 1).long()
            indices.append(flat)
            corner_weights.append(bilinear * inside * weights[:, :, :, level])
        start += int(height) * int(width)
    index = torch.stack(indices, dim=-1).flatten(-2)  # (B, nh, Lq, L*4*P)
    corner_weight = torch.stack(corner_weights, dim=-1).flatten(-2)
    mask = attn_mask.expand(batch, heads, num_queries, length)
    corner_weight = corner_weight.masked_fill(mask.gather(-1, index), 0.0)
    samples = index.shape[-1]
    table = value.permute(0, 2, 1, 3)  # (B, nh, Lv, dh)
    gathered = table.gather(2, index.reshape(batch, heads, -1, 1).expand(-1, -1, -1, head_dim))
    gathered = gathered.view(batch, heads, num_queries, samples, head_dim)
    output = (gathered * corner_weight[..., None]).sum(-2)  # (B, nh, Lq, dh)
    return output.transpose(1, 2).reshape(batch, num_queries, heads * head_dim).to(out_dtype)
