"""Multi-scale deformable attention core as explicit bilinear gathers: the ONNX export path.

The value map is flattened over all levels (the flat index of pixel (y, x) of level l is
`level_start_index[l] + y * W_l + x`), and each sampling location reads its four bilinear neighbours
by `Gather`; the samples are weighted with the bilinear and attention weights (zero for neighbours
outside the map) and summed by a batched `MatMul`. Two layouts, chosen from the shapes:

- "pairs" (many samples per value position, e.g. encoder self-attention): the map is laid out as
  horizontal pairs, row r holding tokens r - 1 and r side by side (a zero row before the first and
  after the last token of each (image, head)), and each location reads two rows, one per image row
  (y0 and y0 + 1), each fetching the (x0, x0 + 1) pair. Two pair gathers took about 20% less CPU on
  onnxruntime than four single-pixel gathers at the Deformable DETR encoder shape.
- "direct" (few samples per value position over a large map, e.g. a decoder's 300 queries over an
  8400-token map): the four neighbours are read straight from the projected value `[B, Lv, heads, dh]`
  seen as rows (no copy of the map at all); building the pair layout would copy the whole map twice
  for few samples. RT-DETR's decoder cross-attention at 640 x 640 on onnxruntime: 6.5 ms of CPU
  against 9.2 ms for pairs (GridSample 5.7 ms). Over a small map the copy is cheap and the pairs'
  fewer gathered rows win: D-FINE-N's decoder (2000 positions) 4.0 ms against 4.6 direct.

`choose_form` switches by the samples per position and the map length (`DIRECT_SAMPLES_PER_POSITION`,
`REFERENCE_LENGTH`). Nothing in either form is a Python loop over levels or
reads tensor values on the host, so a traced graph stays valid for every image size and batch size
(`torch.onnx.export` with dynamic axes; the form is fixed at tracing), and both use only standard
ONNX operators (Gather, Floor, MatMul, ...). Unlike ONNX `GridSample` they avoid TensorRT's
miscompiled `grid_sample` (NVIDIA/TensorRT#4813).

Sampling follows `F.grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)`
exactly as `reference.py` (the definition both forms are tested against): pixel (i, j) of a level
has its centre at normalized ((j + 0.5) / W, (i + 0.5) / H), and neighbours outside the map read
zeros.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

# The "direct" form runs when a call has at most DIRECT_SAMPLES_PER_POSITION * length / REFERENCE_LENGTH
# samples (queries x levels x points, per head) per value position: the pair layout's copy of the map
# costs more, relative to the gathers it saves, the larger the map. Measured on onnxruntime (1 thread,
# 8 heads) in CPU time per call, direct against pairs:
# - 8400 positions (RT-DETR at 640 x 640, head width 32, 3 levels x 4 points): 0.43 samples per
#   position (300 queries) 6.5 ms against 9.2, 1.7 (1200 queries) 25 against 29, 4.3 (3000 queries) 60
#   against 53, and at a Deformable DETR encoder shape (16 per position) 92 against 81;
# - 2000 positions (D-FINE-N at 640 x 640, 40x40 and 20x20 levels x 6 points): head width 16, 0.6
#   samples per position (100 queries) 1.80 against 1.72, 1.0 (170) 3.1 against 2.6, 1.8 (300) 4.6
#   against 4.0; head width 32, 1.8 (300) 5.7 against 5.2, 3.6 (600) 10.5 against 9.6.
DIRECT_SAMPLES_PER_POSITION = 2.0
REFERENCE_LENGTH = 8400


def ms_deform_attn_core_gather(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    form: str | None = None,
) -> Tensor:
    """Weighted sum of bilinear samples of a multi-scale value map, by gathers.

    Args:
        value: `[B, Lv, heads, dh]`, the levels flattened row-major one after another.
        spatial_shapes: int64 `[L, 2]`, (H, W) of each level.
        level_start_index: int64 `[L]`, offset of each level in `Lv`.
        sampling_locations: `[B, Lq, heads, L, P, 2]`, normalized (x, y) over each level, (0, 0) the
            top-left corner of the map; samples outside read zeros.
        attention_weights: `[B, Lq, heads, L, P]`.
        form: "pairs" or "direct" (see the module docstring); None chooses by the map length and
            the samples per position (`choose_form`).

    Returns:
        `[B, Lq, heads*dh]` in `value`'s dtype (half precision is computed in float32, as the reference).

    Raises:
        ValueError: an unknown `form`.
    """
    if form is None:
        form = choose_form(value.shape[1], sampling_locations.shape)
    if form not in ("pairs", "direct"):
        raise ValueError(f"form must be 'pairs' or 'direct', got {form!r}")
    out_dtype = value.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        value = value.float()
    sample = _sample_direct if form == "direct" else _sample_pairs
    output = sample(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations.to(value.dtype),
        attention_weights.to(value.dtype),
    )
    return output.to(out_dtype)


def choose_form(length: int, locations_shape: torch.Size) -> str:
    """"direct" when the call has at most `DIRECT_SAMPLES_PER_POSITION * length / REFERENCE_LENGTH`
    samples per value position (per head), i.e. at most `2 * length**2 / 8400` samples, else "pairs".
    Under tracing the choice is fixed in the graph (either form is exact at every size; only the speed
    depends on it), so the tracer's warning about it is silenced."""
    _, num_queries, _, num_levels, num_points, _ = locations_shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        samples = int(num_queries * num_levels * num_points)
        limit = DIRECT_SAMPLES_PER_POSITION * int(length) * int(length) / REFERENCE_LENGTH
    return "direct" if samples <= limit else "pairs"


def _pixel_coordinates(
    locations: Tensor, spatial_shapes: Tensor, level_start_index: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x0, y0, frac_x, frac_y, height, width, start): the top-left neighbour (int64) and the
    fractions of `locations` `[..., L, P, 2]`, and the level sizes and offsets shaped `[L, 1]` to
    broadcast against `[..., L, P]`."""
    level_shape = (spatial_shapes.shape[0], 1)
    height = spatial_shapes[:, 0].view(level_shape)
    width = spatial_shapes[:, 1].view(level_shape)
    start = level_start_index.view(level_shape)
    # Pixel coordinates with pixel centres on integers (align_corners=False).
    x = locations[..., 0] * width.to(locations.dtype) - 0.5
    y = locations[..., 1] * height.to(locations.dtype) - 0.5
    x0, y0 = x.floor(), y.floor()
    return x0.long(), y0.long(), x - x0, y - y0, height, width, start


def _sample_direct(
    value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, locations: Tensor, weights: Tensor
) -> Tensor:
    """The "direct" form: one gather of the four neighbours of every sample from `value` as rows."""
    batch, length, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = locations.shape
    rows_of_value = value.reshape(batch * length * heads, head_dim)  # row (b * Lv + token) * heads + h
    x0, y0, frac_x, frac_y, height, width, start = _pixel_coordinates(
        locations, spatial_shapes, level_start_index
    )  # (B, Lq, nh, L, P)
    image = torch.arange(batch, device=value.device).view(batch, 1, 1, 1, 1)
    head = torch.arange(heads, device=value.device).view(1, 1, heads, 1, 1)
    level_row = (image * length + start) * heads + head  # row of each level's pixel (0, 0)
    indices, corner_weights = [], []
    for dy in (0, 1):
        yi = y0 + dy
        row_inside = (yi >= 0) & (yi < height)
        row_weights = weights * (frac_y if dy else 1 - frac_y)
        for dx in (0, 1):
            xi = x0 + dx
            inside = row_inside & (xi >= 0) & (xi < width)
            # a neighbour outside the map gets weight 0 and reads row 0 (any valid row)
            corner_weights.append((row_weights * (frac_x if dx else 1 - frac_x)).masked_fill(~inside, 0.0))
            indices.append((level_row + (yi * width + xi) * heads).masked_fill(~inside, 0))
    rows, samples = batch * num_queries * heads, num_levels * num_points * 4
    index = torch.stack(indices, dim=-1).reshape(-1)  # (B*Lq*nh*L*P*4,)
    sampled = rows_of_value.index_select(0, index).view(rows, samples, head_dim)
    corner = torch.stack(corner_weights, dim=-1).reshape(rows, 1, samples)
    output = torch.bmm(corner, sampled)  # (B*Lq*nh, 1, dh)
    return output.view(batch, num_queries, heads * head_dim)


def _sample_pairs(
    value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, locations: Tensor, weights: Tensor
) -> Tensor:
    """The "pairs" form: two gathers of horizontal neighbour pairs per sample from the pair layout."""
    batch, length, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = locations.shape
    per_pair = value.permute(0, 2, 1, 3).reshape(batch * heads, length, head_dim)  # (B*nh, Lv, dh)
    zero = per_pair.new_zeros(batch * heads, 1, head_dim)
    padded = torch.cat((zero, per_pair, zero), dim=1)  # (B*nh, Lv+2, dh)
    # row r of (image, head) p: padded tokens r and r + 1, i.e. tokens r - 1 and r
    pairs = torch.cat((padded[:, :-1], padded[:, 1:]), dim=-1).reshape(-1, 2 * head_dim)  # (B*nh*(Lv+1), 2dh)
    locations = locations.permute(0, 2, 1, 3, 4, 5)  # (B, nh, Lq, L, P, 2)
    weights = weights.permute(0, 2, 1, 3, 4)  # (B, nh, Lq, L, P)
    x0, y0, frac_x, frac_y, height, width, start = _pixel_coordinates(
        locations, spatial_shapes, level_start_index
    )  # (B, nh, Lq, L, P)
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
    return output.reshape(batch, num_queries, heads * head_dim)
