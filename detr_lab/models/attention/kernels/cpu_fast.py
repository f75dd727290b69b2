"""Multi-scale deformable attention core for CPUs: bilinear sampling as a weighted gather-sum.

Every sampling point reads four pixels. Folding the bilinear factors and the attention weight into
one weight per corner turns the whole core into a single weighted bag-sum over the rows of a value
table, one bag per (batch, query, head):

    out[b, q, h] = sum over (corner, level, point) of weight * table[row(corner pixel, b, h)]

which `F.embedding_bag(..., mode="sum", per_sample_weights=...)` computes without materializing
the sampled values (the reference builds a `[B*heads, dh, Lq, levels*points]` tensor first).

Zero padding: each level is copied into the table with a border of zero pixels (1 before, 2 after,
in x and in y) and pixel positions are clamped into that border, so no corner needs a validity
mask: a clamped position reads only zeros, exactly as a point far outside the map does.

Memory bandwidth, not arithmetic, bounds this computation on CPUs. The per-point index and weight
arithmetic works on `[bags, levels*points]` tensors (trailing dims of 2 or 4 would not vectorize),
with int32 rows, over chunks of up to 4M points: that bounds the temporary memory (a few hundred MB)
while keeping the number of ops, and so of multi-threaded regions, small (each one costs scheduler
time slices when other processes compete for the cores; smaller chunks were not faster).

The backward pass is written by hand (`_CpuFastCore.backward`):

- value table: the transposed gather. All sampling points are sorted by the table row of their
  top-left corner; the points sharing a top-left corner form a segment whose four corners land at
  four fixed row offsets (0, 1, Wp, Wp+1 padded pixels). Each corner's contribution is then one
  `embedding_bag` over the rows of `grad_output` with one bag per segment.
- corner weights: `dot(grad_output row, table row)` for every corner, a sampled dense-dense matmul
  (`torch.sparse.sampled_addmm` with the corner rows as the sparsity pattern); the gradients of the
  sampling locations and attention weights follow in closed form, since the bilinear factors are
  linear in the fractional pixel position.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Sampling points per chunk of the index and weight arithmetic (the Deformable-DETR-R50 encoder at
# 800 x 1066 has 2.3M per image).
_POINTS_PER_CHUNK = 1 << 22
# With one thread there is no parallel region to amortize, and chunks whose intermediates stay in
# cache win: at the R50 encoder shape 2^15-2^17 points per chunk took 130-145 ms against 160-185 ms
# for 2^22 (one Xeon core). With several threads, each chunk's ops are parallel regions of their own.
_POINTS_PER_CHUNK_ONE_THREAD = 1 << 17
_PAD_BEFORE = 1
_PAD_AFTER = 2


class _PaddedLayout:
    """Geometry of the zero-padded, pixel-major value table, and per-point constants.

    Table row of padded pixel `p` (counted over all padded levels), batch `b` and head `h`:
    `(p * B + b) * heads + h`. Pixel-major rows keep each level's rows contiguous for any batch.
    Per-point constants are vectors over the `levels*points` axis (level-major, as the inputs).
    """

    def __init__(
        self, spatial_shapes: Tensor, batch: int, heads: int, num_points: int, dtype: torch.dtype, device
    ) -> None:
        self.shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        self.batch = batch
        self.heads = heads
        stride = batch * heads  # rows per padded pixel
        pad = _PAD_BEFORE + _PAD_AFTER
        self.padded_shapes = [(h + pad, w + pad) for h, w in self.shapes]
        sizes = [h * w for h, w in self.padded_shapes]
        self.padded_starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.num_rows = sum(sizes) * stride
        # Table rows as int32 halve the memory traffic of the index arithmetic when they fit.
        self.index_dtype = torch.int32 if self.num_rows + 2 * stride < 2**31 else torch.int64
        index_dtype = self.index_dtype

        def per_point(values, dtype):  # one value per level -> [levels*points]
            return torch.tensor(values, dtype=dtype, device=device).repeat_interleave(num_points)

        # Padded pixel coordinate of a normalized location: loc * size - 0.5 + _PAD_BEFORE, clamped
        # to [0, size + _PAD_BEFORE] so that the top-left corner and its +1 neighbours stay inside.
        self.shift = torch.tensor(_PAD_BEFORE - 0.5, dtype=dtype, device=device)
        self.width = per_point([w for _, w in self.shapes], dtype)
        self.height = per_point([h for h, _ in self.shapes], dtype)
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.one = torch.ones((), dtype=dtype, device=device)
        self.x_upper = self.width + _PAD_BEFORE
        self.y_upper = self.height + _PAD_BEFORE
        # Row of the top-left corner = (y * Wp + x) * stride + level_rows + (b * heads + h).
        self.stride = stride
        self.y_coef = per_point([w * stride for _, w in self.padded_shapes], index_dtype)
        self.level_rows = per_point([start * stride for start in self.padded_starts], index_dtype)
        self.level_first_rows = torch.tensor(
            [start * stride for start in self.padded_starts], dtype=index_dtype, device=device
        )
        # Row offsets of the corners (y0x0, y0x1, y1x0, y1x1) from the top-left one.
        self.level_corner_offsets = torch.tensor(
            [(0, stride, w * stride, (w + 1) * stride) for _, w in self.padded_shapes],
            dtype=index_dtype,
            device=device,
        )  # (L, 4)
        self.corner_offsets = self.level_corner_offsets.t().repeat_interleave(num_points, dim=1)  # (4, L*P)

    def _levels(self):
        """Per level: (H, W), and the rows of its padded grid as a view shape `[Hp, Wp]`."""
        for (height, width), (padded_h, padded_w), start in zip(
            self.shapes, self.padded_shapes, self.padded_starts, strict=True
        ):
            yield height, width, slice(start, start + padded_h * padded_w), (padded_h, padded_w)

    def pad_table(self, value: Tensor) -> Tensor:
        """`[B, Lv, heads, dh]` -> zero-padded table `[rows, dh]`."""
        batch, _, heads, head_dim = value.shape
        table = value.new_empty(self.num_rows // self.stride, batch, heads * head_dim)
        start = 0
        for height, width, rows, padded in self._levels():
            level = value[:, start : start + height * width].reshape(batch, height, width, heads * head_dim)
            grid = table[rows].view(*padded, batch, heads * head_dim)
            inner_rows = slice(_PAD_BEFORE, _PAD_BEFORE + height)
            inner_cols = slice(_PAD_BEFORE, _PAD_BEFORE + width)
            grid[inner_rows, inner_cols] = level.permute(1, 2, 0, 3)  # (H, W, B, d)
            # Only the border is zeroed: the interior was just written.
            grid[: inner_rows.start].zero_()
            grid[inner_rows.stop :].zero_()
            grid[inner_rows, : inner_cols.start].zero_()
            grid[inner_rows, inner_cols.stop :].zero_()
            start += height * width
        return table.view(-1, head_dim)

    def unpad_gradient(self, grad_table: Tensor) -> Tensor:
        """Gradient of the padded table `[rows, dh]` -> gradient of `value` `[B, Lv, heads, dh]`."""
        batch, heads, head_dim = self.batch, self.heads, grad_table.shape[1]
        grad_table = grad_table.view(-1, batch, heads * head_dim)
        length = sum(height * width for height, width in self.shapes)
        grad_value = grad_table.new_empty(batch, length, heads * head_dim)
        start = 0
        for height, width, rows, padded in self._levels():
            grid = grad_table[rows].view(*padded, batch, heads * head_dim)
            interior = grid[_PAD_BEFORE : _PAD_BEFORE + height, _PAD_BEFORE : _PAD_BEFORE + width]
            level = grad_value[:, start : start + height * width].view(batch, height, width, heads * head_dim)
            level.copy_(interior.permute(2, 0, 1, 3))  # (B, H, W, d)
            start += height * width
        return grad_value.view(batch, length, heads, head_dim)


class _ChunkGeometry:
    """Top-left corner rows and fractional positions of the sampling points of a chunk of bags.

    Args:
        x, y: `[n, L*P]` normalized sampling coordinates of `n` bags (flattened batch, query, head).
        batch_head: `[n, 1]`, `b * heads + h` of each bag (layout.index_dtype).
        with_inside: also record which positions were not clamped (for the location gradient).
    Attributes:
        top_left: `[n, L*P]` (layout.index_dtype), table row of the top-left corner.
        frac_x, frac_y: `[n, L*P]` position past the top-left corner, in [0, 1).
        inside_x, inside_y: bool `[n, L*P]`, True where the position was not clamped.
    """

    def __init__(self, layout: _PaddedLayout, x: Tensor, y: Tensor, batch_head: Tensor, with_inside: bool):
        pos_x = torch.addcmul(layout.shift, x, layout.width)
        pos_y = torch.addcmul(layout.shift, y, layout.height)
        if with_inside:
            self.inside_x = (pos_x >= 0) & (pos_x <= layout.x_upper)
            self.inside_y = (pos_y >= 0) & (pos_y <= layout.y_upper)
        # NaN positions (from a diverged model) must still give valid rows: they read the zero border.
        pos_x = pos_x.nan_to_num_(nan=0.0).clamp_(min=layout.zero, max=layout.x_upper)
        pos_y = pos_y.nan_to_num_(nan=0.0).clamp_(min=layout.zero, max=layout.y_upper)
        corner_x = pos_x.to(layout.index_dtype)  # truncation is the floor for positions >= 0
        corner_y = pos_y.to(layout.index_dtype)
        self.frac_x = pos_x.sub_(corner_x)
        self.frac_y = pos_y.sub_(corner_y)
        top_left = corner_y.mul_(layout.y_coef).add_(corner_x, alpha=layout.stride)
        self.top_left = top_left.add_(layout.level_rows).add_(batch_head)

    def corner_rows(self, layout: _PaddedLayout) -> Tensor:
        """`[n, 4, L*P]` (layout.index_dtype): table rows of the corners (y0x0, y0x1, y1x0, y1x1)."""
        return self.top_left[:, None, :] + layout.corner_offsets

    def corner_weights(self, layout: _PaddedLayout, attention: Tensor) -> Tensor:
        """`[n, 4, L*P]`: bilinear factor x attention weight of each corner (order of `corner_rows`)."""
        frac_x, frac_y = self.frac_x, self.frac_y
        x_factors = frac_x.new_empty(frac_x.shape[0], 2, frac_x.shape[1])
        torch.sub(layout.one, frac_x, out=x_factors[:, 0])
        x_factors[:, 1] = frac_x
        y_weights = frac_y.new_empty(x_factors.shape)
        torch.mul(frac_y, attention, out=y_weights[:, 1])
        torch.sub(attention, y_weights[:, 1], out=y_weights[:, 0])
        return (y_weights[:, :, None, :] * x_factors[:, None, :, :]).view(-1, 4, frac_x.shape[1])


def _chunks(num_bags: int, points_per_bag: int):
    limit = _POINTS_PER_CHUNK
    if torch.get_num_threads() == 1:
        limit = min(limit, _POINTS_PER_CHUNK_ONE_THREAD)
    step = max(1, limit // points_per_bag)
    for start in range(0, num_bags, step):
        yield start, min(start + step, num_bags)


def _batch_head(layout: _PaddedLayout, start: int, stop: int, num_queries: int, device) -> Tensor:
    """`[stop - start, 1]`: `b * heads + h` of flattened bags `(b * Lq + q) * heads + h`."""
    heads = layout.heads
    bags = torch.arange(start, stop, device=device)
    return ((bags // (num_queries * heads)) * heads + bags % heads)[:, None].to(layout.index_dtype)


def _chunk_geometry(
    layout: _PaddedLayout, locations: Tensor, start: int, stop: int, num_queries: int, *, with_inside: bool
) -> _ChunkGeometry:
    """`_ChunkGeometry` of bags `start:stop` of `locations` `[num_bags, L*P, 2]` (normalized x, y; bags
    flattened as `(b * Lq + q) * heads + h`)."""
    chunk = locations[start:stop]
    batch_head = _batch_head(layout, start, stop, num_queries, locations.device)
    return _ChunkGeometry(layout, chunk[:, :, 0], chunk[:, :, 1], batch_head, with_inside=with_inside)


def _corner_dots(grad_bags: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """`dot(grad_bags[n], table[rows[n, k]])` for every bag n and corner k -> `[n, K]`."""
    num_bags, num_corners = rows.shape
    row_starts = torch.arange(0, num_bags * num_corners + 1, num_corners, device=rows.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            row_starts,
            rows.reshape(-1),
            grad_bags.new_zeros(num_bags * num_corners),
            size=(num_bags, table.shape[0]),
            check_invariants=False,  # repeated and unsorted columns are fine for sampled_addmm
        )
    return torch.sparse.sampled_addmm(pattern, grad_bags, table.t()).values().view(num_bags, num_corners)


def _value_gradient(layout: _PaddedLayout, grad_bags: Tensor, top_left: Tensor, weights: Tensor) -> Tensor:
    """Gradient of the padded table `[rows, dh]`.

    Args:
        grad_bags: `[N, dh]`, gradient of each output bag (N = B*Lq*heads).
        top_left: `[N, L*P]`, table row of each point's top-left corner.
        weights: `[N, 4, L*P]` corner weights of the forward pass.
    """
    points_per_bag = top_left.shape[1]
    grad_table = grad_bags.new_zeros(layout.num_rows, grad_bags.shape[1])
    # Sorted as int64: with two threads that measured twice as fast as sorting the int32 keys.
    keys, order = torch.sort(top_left.flatten().long(), stable=True)
    segment_rows, counts = torch.unique_consecutive(keys, return_counts=True)
    offsets = counts.cumsum(0) - counts
    if points_per_bag & (points_per_bag - 1) == 0:
        bags = order >> (points_per_bag.bit_length() - 1)
    else:
        bags = torch.div(order, points_per_bag, rounding_mode="floor")
    # Position of each sorted point's first-corner weight in the flat `weights` `[N, 4, L*P]`.
    first_corner = bags * (3 * points_per_bag) + order
    flat_weights = weights.view(-1)
    # Levels occupy increasing row ranges, so each segment's level follows from its row.
    level_first_rows = layout.level_first_rows.long()
    segment_level = torch.bucketize(segment_rows, level_first_rows, right=True) - 1
    corner_offsets = layout.level_corner_offsets.long()[segment_level]  # (segments, 4)
    for corner in range(4):
        corner_weights = flat_weights[corner * points_per_bag :].index_select(0, first_corner)
        summed = F.embedding_bag(bags, grad_bags, offsets, mode="sum", per_sample_weights=corner_weights)
        grad_table.index_put_((segment_rows + corner_offsets[:, corner],), summed, accumulate=True)
    return grad_table


class _CpuFastCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        batch, _, heads, head_dim = value.shape
        _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
        points = num_levels * num_points
        num_bags = batch * num_queries * heads
        layout = _PaddedLayout(spatial_shapes, batch, heads, num_points, value.dtype, value.device)
        table = layout.pad_table(value)
        locations = sampling_locations.reshape(num_bags, points, 2)
        attention = attention_weights.reshape(num_bags, points)
        output = value.new_empty(num_bags, head_dim)
        for start, stop in _chunks(num_bags, points):
            geometry = _chunk_geometry(layout, locations, start, stop, num_queries, with_inside=False)
            rows = geometry.corner_rows(layout).view(stop - start, 4 * points)
            weights = geometry.corner_weights(layout, attention[start:stop]).view(stop - start, 4 * points)
            output[start:stop] = F.embedding_bag(rows, table, mode="sum", per_sample_weights=weights)
        ctx.save_for_backward(table, locations, attention)
        ctx.layout = layout
        ctx.batch_queries = (batch, num_queries)
        return output.view(batch, num_queries, heads * head_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        table, locations, attention = ctx.saved_tensors
        layout, (batch, num_queries) = ctx.layout, ctx.batch_queries
        need_value, need_locations, need_attention = ctx.needs_input_grad[0], *ctx.needs_input_grad[3:5]
        num_bags, points = attention.shape
        grad_bags = grad_output.reshape(num_bags, table.shape[1]).contiguous()  # (B*Lq*nh, dh)
        if need_value:
            top_left = torch.empty(num_bags, points, dtype=layout.index_dtype, device=table.device)
            corner_weights = table.new_empty(num_bags, 4, points)
        grad_locations = torch.empty_like(locations) if need_locations else None
        grad_attention = torch.empty_like(attention) if need_attention else None
        for start, stop in _chunks(num_bags, points):
            geometry = _chunk_geometry(
                layout, locations, start, stop, num_queries, with_inside=need_locations
            )
            chunk_attention = attention[start:stop]
            if need_value:
                top_left[start:stop] = geometry.top_left
                corner_weights[start:stop] = geometry.corner_weights(layout, chunk_attention)
            if not (need_locations or need_attention):
                continue
            rows = geometry.corner_rows(layout).view(stop - start, 4 * points)
            dots = _corner_dots(grad_bags[start:stop], table, rows).view(stop - start, 4, points)
            dot_00, dot_01, dot_10, dot_11 = dots.unbind(1)  # (n, L*P) each, (y, x) neighbours
            frac_x, frac_y = geometry.frac_x, geometry.frac_y
            step_x_top = dot_01 - dot_00  # d(dot)/dx along the top row
            step_x_bottom = dot_11 - dot_10
            along_top = torch.addcmul(dot_00, frac_x, step_x_top)  # x-interpolated dots
            along_bottom = torch.addcmul(dot_10, frac_x, step_x_bottom)
            step_y = along_bottom - along_top  # d(interpolated dot)/dy
            if need_attention:
                torch.addcmul(along_top, frac_y, step_y, out=grad_attention[start:stop])
            if need_locations:
                step_x = torch.addcmul(step_x_top, frac_y, step_x_bottom - step_x_top)
                # d(pixel position)/d(normalized location) is the level size; clamped positions get 0.
                grad_x = step_x.mul_(chunk_attention).mul_(layout.width).masked_fill_(~geometry.inside_x, 0)
                grad_y = step_y.mul_(chunk_attention).mul_(layout.height).masked_fill_(~geometry.inside_y, 0)
                grad_locations[start:stop, :, 0] = grad_x
                grad_locations[start:stop, :, 1] = grad_y
        grad_value = None
        if need_value:
            grad_value = layout.unpad_gradient(_value_gradient(layout, grad_bags, top_left, corner_weights))
        if grad_locations is not None:
            grad_locations = grad_locations.view(batch, num_queries, layout.heads, points, 2)
        if grad_attention is not None:
            grad_attention = grad_attention.view(batch, num_queries, layout.heads, points)
        return grad_value, None, None, _unflatten_levels(grad_locations, layout), _unflatten_levels(
            grad_attention, layout
        )


def _unflatten_levels(grad: Tensor | None, layout: _PaddedLayout) -> Tensor | None:
    """`[B, Lq, heads, L*P, ...]` -> `[B, Lq, heads, L, P, ...]`."""
    if grad is None:
        return None
    num_levels = len(layout.shapes)
    return grad.unflatten(3, (num_levels, grad.shape[3] // num_levels))


def ms_deform_attn_core_cpu_fast(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Same contract and results as `ms_deform_attn_core_reference`, faster on CPU.

    Args:
        value: `[B, Lv, heads, dh]`, the levels stored one after another in order (as the reference
            assumes); spatial_shapes int64 `[L, 2]` (H, W); level_start_index int64 `[L]` (unused);
        sampling_locations: `[B, Lq, heads, L, P, 2]` normalized (x, y), outside [0, 1] reads zeros;
        attention_weights: `[B, Lq, heads, L, P]`.

    Returns:
        `[B, Lq, heads*dh]` in `value`'s dtype. float16 / bfloat16 inputs are computed in float32.
    """
    out_dtype = value.dtype
    compute_dtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    output = _CpuFastCore.apply(
        value.to(compute_dtype),
        spatial_shapes,
        level_start_index,
        sampling_locations.to(compute_dtype),
        attention_weights.to(compute_dtype),
    )
    return output.to(out_dtype)
