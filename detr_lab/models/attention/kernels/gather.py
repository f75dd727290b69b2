"""Multi-scale deformable attention core as explicit bilinear gathers: the ONNX export path.

The value map is flattened over all levels (the flat index of pixel (y, x) of level l is
`level_start_index[l] + y * W_l + x`) and laid out as horizontal pairs: row r holds tokens r - 1 and r
side by side (a zero row before the first and after the last token of each (image, head)). Each
sampling location then reads its four bilinear neighbours with two `Gather`s, one per image row
(y0 and y0 + 1), each fetching the (x0, x0 + 1) pair; the samples are weighted with the bilinear and
attention weights (zero for neighbours outside the map) and summed by a batched `MatMul`. Nothing
in it is a Python loop over levels or reads tensor values on the host, so a traced graph stays valid
for every image size and batch size (`torch.onnx.export` with dynamic axes), and it uses only
standard ONNX operators (Gather, Floor, MatMul, ...). Unlike ONNX `GridSample` it avoids TensorRT's
miscompiled `grid_sample` (NVIDIA/TensorRT#4813). (Two pair gathers took about 20% less CPU on
onnxruntime than four single-pixel gathers.)

Sampling follows `F.grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)`
exactly as `reference.py` (the definition it is tested against): pixel (i, j) of a level has its
centre at normalized ((j + 0.5) / W, (i + 0.5) / H), and neighbours outside the map read zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    per_pair = value.permute(0, 2, 1, 3).reshape(batch * heads, length, head_dim)  # (B*nh, Lv, dh)
    zero = per_pair.new_zeros(batch * heads, 1, head_dim)
    padded = torch.cat((zero, per_pair, zero), dim=1)  # (B*nh, Lv+2, dh)
    # row r of (image, head) p: padded tokens r and r + 1, i.e. tokens r - 1 and r
    pairs = torch.cat((padded[:, :-1], padded[:, 1:]), dim=-1).reshape(-1, 2 * head_dim)  # (B*nh*(Lv+1), 2dh)
    locations = sampling_locations.permute(0, 2, 1, 3, 4, 5).to(value.dtype)  # (B, nh, Lq, L, P, 2)
    weights = attention_weights.permute(0, 2, 1, 3, 4).to(value.dtype)  # (B, nh, Lq, L, P)

    level_shape = (num_levels, 1)  # broadcasts against (..., L, P)
    height = spatial_shapes[:, 0].view(level_shape)
    width = spatial_shapes[:, 1].view(level_shape)
    start = level_start_index.view(level_shape)
    # Pixel coordinates with pixel centres on integers (align_corners=False).
    x = locations[..., 0] * width.to(value.dtype) - 0.5  # (B, nh, Lq, L, P)
    y = locations[..., 1] * height.to(value.dtype) - 0.5
    x0, y0 = x.floor(), y.floor()
    frac_x, frac_y = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    left_inside = (x0 >= 0) & (x0 < width)
    right_inside = (x0 >= -1) & (x0 < width - 1)
    pair_offset = torch.arange(batch * heads, device=value.device).view(batch, heads, 1, 1, 1) * (length + 1)
    rows, samples = batch * heads * num_queries, num_levels * num_points
    output = None
    for dy in (0, 1):
        yi = y0 + dy
        row_inside = (yi >= 0) & (yi < height)
        row_weights = weights * (frac_y if dy else 1 - frac_y)
        left = (row_weights * (1 - frac_x)).masked_fill(~(row_inside & left_inside), 0.0)
        right = (row_weights * frac_x).masked_fill(~(row_inside & right_inside), 0.0)
        # the pair row of (x0, x0 + 1) is token index + 1; a pair with no neighbour inside reads row 0
        used = row_inside & (left_inside | right_inside)
        index = (start + yi * width + x0 + 1).masked_fill(~used, 0) + pair_offset
        sampled = pairs.index_select(0, index.reshape(-1))  # (B*nh*Lq*L*P, 2dh): left | right
        sampled = sampled.view(rows, samples * 2, head_dim)
        pair_weights = torch.stack((left, right), dim=-1).reshape(rows, 1, samples * 2)
        part = torch.bmm(pair_weights, sampled)  # (rows, 1, dh)
        output = part if output is None else output + part
    output = output.view(batch, heads, num_queries, head_dim).permute(0, 2, 1, 3)  # (B, Lq, nh, dh)
    return output.reshape(batch, num_queries, heads * head_dim).to(out_dtype)
