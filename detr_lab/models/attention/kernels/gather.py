"""Multi-scale deformable attention core as explicit bilinear gathers: the ONNX export path.

Every sampling location reads its four neighbouring pixels with one `Gather` per corner from the
flattened value map (all levels at once: the flat index is `level_start_index[l] + y * W_l + x`),
weights them with the bilinear and attention weights, and sums them with a batched matrix product.
Nothing in it is a Python loop over levels or reads tensor values on the host, so a traced graph
stays valid for every image size and batch size (`torch.onnx.export` with dynamic axes), and it uses
only standard ONNX operators (Gather, Floor, MatMul, ...). Unlike ONNX `GridSample` it avoids
TensorRT's miscompiled `grid_sample` (NVIDIA/TensorRT#4813).

Sampling follows `F.grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)`
exactly as `reference.py` (the definition it is tested against): pixel (i, j) of a level has its
centre at normalized ((j + 0.5) / W, (i + 0.5) / H), and neighbours outside the map read zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor

# (dy, dx) of the four bilinear neighbours, top-left first
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


def ms_deform_attn_core_gather(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Weighted sum of bilinear samples of a multi-scale value map, by gathers.

    Args:
        value: `[B, Lv, heads, dh]`, the levels flattened row-major one after another.
        spatial_shapes: int64 `[L, 2]`, (H, W) of each level.
        level_start_index: int64 `[L]`, offset of each level in `Lv`.
        sampling_locations: `[B, Lq, heads, L, P, 2]`, normalized (x, y) over each level, (0, 0) the
            top-left corner of the map; samples outside read zeros.
        attention_weights: `[B, Lq, heads, L, P]`.

    Returns:
        `[B, Lq, heads*dh]` in `value`'s dtype (half precision is computed in float32, as the reference).
    """
    out_dtype = value.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        value = value.float()
    batch, length, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # Rows of one (image, head) pair are contiguous: row = (b * heads + h) * Lv + token.
    flat_value = value.permute(0, 2, 1, 3).reshape(-1, head_dim)  # (B*nh*Lv, dh)
    locations = sampling_locations.permute(0, 2, 1, 3, 4, 5).to(value.dtype)  # (B, nh, Lq, L, P, 2)
    weights = attention_weights.permute(0, 2, 1, 3, 4).to(value.dtype)  # (B, nh, Lq, L, P)

    level_shape = (num_levels, 1)  # broadcasts against (..., L, P)
    height_int = spatial_shapes[:, 0].view(level_shape)
    width_int = spatial_shapes[:, 1].view(level_shape)
    start = level_start_index.view(level_shape)
    # Pixel coordinates with pixel centres on integers (align_corners=False).
    x = locations[..., 0] * width_int.to(value.dtype) - 0.5  # (B, nh, Lq, L, P)
    y = locations[..., 1] * height_int.to(value.dtype) - 0.5
    x0, y0 = x.floor(), y.floor()
    frac_x, frac_y = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    pair = torch.arange(batch * heads, device=value.device).view(batch, heads, 1, 1, 1) * length
    rows = batch * heads * num_queries
    output = None
    for dy, dx in _CORNERS:
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < width_int) & (yi >= 0) & (yi < height_int)
        bilinear = (frac_x if dx else 1 - frac_x) * (frac_y if dy else 1 - frac_y)
        corner_weight = (weights * bilinear).masked_fill(~inside, 0.0)  # (B, nh, Lq, L, P)
        index = (start + yi * width_int + xi).masked_fill(~inside, 0) + pair  # outside: any valid row
        sampled = flat_value.index_select(0, index.reshape(-1))  # (B*nh*Lq*L*P, dh)
        sampled = sampled.view(rows, num_levels * num_points, head_dim)
        part = torch.bmm(corner_weight.reshape(rows, 1, num_levels * num_points), sampled)  # (rows, 1, dh)
        output = part if output is None else output + part
    output = output.view(batch, heads, num_queries, head_dim).permute(0, 2, 1, 3)  # (B, Lq, nh, dh)
    return output.reshape(batch, num_queries, heads * head_dim).to(out_dtype)
