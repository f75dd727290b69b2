"""Multi-scale deformable attention core as Triton kernels (forward and backward) for CUDA.

Importing this module imports Triton; `detr_lab.models.attention.kernels` imports it only when the
Triton path is chosen, so CPU-only installs without Triton never load it.

One program handles a block of `BLOCK_Q` queries of one (batch, head) pair and the whole head
dimension. For each level and point it computes the four bilinear corners (zero outside the map,
pixel centres at +0.5, as `grid_sample(2*loc-1, align_corners=False, padding_mode="zeros")`), loads
the corner rows of `value` and accumulates in float32, whatever the input dtype (float32, float16,
bfloat16). The backward program recomputes the corners, adds the value gradient with float32 atomics
and writes the sampling-location and attention-weight gradients, which each program owns.

Under `TRITON_INTERPRET=1` (set before Triton is imported) the same kernels run on CPU tensors in
Triton's interpreter, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

_BLOCK_Q = 64
_NUM_WARPS = 4


@triton.jit
def _pixel_corner(x, y, width_f, height_f):
    """Normalized (x, y) -> integer top-left corner and fractional offsets, in pixels.

    Positions are clamped to [-2, size + 1] first: outside that band both neighbours lie off the map
    either way, and the clamp keeps the integer conversion safe for far-away points.
    """
    px = tl.minimum(tl.maximum(x * width_f - 0.5, -2.0), width_f + 1.0)
    py = tl.minimum(tl.maximum(y * height_f - 0.5, -2.0), height_f + 1.0)
    x0 = tl.floor(px)
    y0 = tl.floor(py)
    return x0.to(tl.int32), y0.to(tl.int32), px - x0, py - y0


@triton.jit
def _corner_offsets(xi, yi, width, height, start, q_mask, ROW: tl.constexpr):
    """Element offset (int64, row start) of pixel (xi, yi) of a level, and whether it is on the map."""
    valid = q_mask & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    pixel = (start + yi * width + xi).to(tl.int64)
    return pixel * ROW, valid


@triton.jit
def _program_tile(num_queries, length, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """This program's block of queries of one (batch, head) pair, grid (query blocks, B * heads).

    Returns: dims `(BLOCK_D,)` channel indices; q_mask `(BLOCK_Q,)` and d_mask `(BLOCK_D,)`, True for
    real queries and channels; bags int64 `(BLOCK_Q,)`, `(b * Lq + q) * heads + h`; batch_head int64
    `(1, BLOCK_D)`, the element offset of (b, position 0, h, dims) in a `[B, Lv, heads, dh]` tensor.
    """
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // HEADS
    head = pid_bh % HEADS
    queries = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, BLOCK_D)
    q_mask = queries < num_queries
    d_mask = dims < HEAD_DIM
    bags = ((batch * num_queries + queries) * HEADS + head).to(tl.int64)
    batch_head = batch.to(tl.int64) * length * (HEADS * HEAD_DIM) + head * HEAD_DIM + dims[None, :]
    return dims, q_mask, d_mask, bags, batch_head


@triton.jit
def _forward_kernel(
    value_ptr,  # [B, Lv, heads, dh]
    shapes_ptr,  # int64 [L, 2] (H, W)
    starts_ptr,  # int64 [L]
    loc_ptr,  # [B, Lq, heads, L, P, 2]
    attn_ptr,  # [B, Lq, heads, L, P]
    out_ptr,  # [B, Lq, heads, dh]
    num_queries,
    length,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    dims, q_mask, d_mask, bags, batch_head = _program_tile(
        num_queries, length, HEADS, HEAD_DIM, BLOCK_Q, BLOCK_D
    )
    value_base = value_ptr + batch_head
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for level in range(LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        height_f = height.to(tl.float32)
        width_f = width.to(tl.float32)
        for point in range(POINTS):
            sample = bags * (LEVELS * POINTS) + (level * POINTS + point)
            x = tl.load(loc_ptr + 2 * sample, mask=q_mask, other=0.0).to(tl.float32)
            y = tl.load(loc_ptr + 2 * sample + 1, mask=q_mask, other=0.0).to(tl.float32)
            attn = tl.load(attn_ptr + sample, mask=q_mask, other=0.0).to(tl.float32)
            x0, y0, fx, fy = _pixel_corner(x, y, width_f, height_f)
            for corner in tl.static_range(4):
                xi = x0 + (corner % 2)
                yi = y0 + (corner // 2)
                weight_x = fx if corner % 2 == 1 else 1.0 - fx
                weight_y = fy if corner // 2 == 1 else 1.0 - fy
                offset, valid = _corner_offsets(xi, yi, width, height, start, q_mask, HEADS * HEAD_DIM)
                mask = valid[:, None] & d_mask[None, :]
                rows = tl.load(value_base + offset[:, None], mask=mask, other=0.0).to(tl.float32)
                acc += (attn * weight_x * weight_y)[:, None] * rows
    out_offsets = bags[:, None] * HEAD_DIM + dims[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _backward_kernel(
    value_ptr,  # [B, Lv, heads, dh]
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    grad_out_ptr,  # [B, Lq, heads, dh]
    grad_value_ptr,  # float32 [B, Lv, heads, dh], accumulated with atomics
    grad_loc_ptr,  # [B, Lq, heads, L, P, 2]
    grad_attn_ptr,  # [B, Lq, heads, L, P]
    num_queries,
    length,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    dims, q_mask, d_mask, bags, batch_head = _program_tile(
        num_queries, length, HEADS, HEAD_DIM, BLOCK_Q, BLOCK_D
    )
    value_base = value_ptr + batch_head
    grad_value_base = grad_value_ptr + batch_head
    out_mask = q_mask[:, None] & d_mask[None, :]
    grad_out = tl.load(grad_out_ptr + bags[:, None] * HEAD_DIM + dims[None, :], mask=out_mask, other=0.0)
    grad_out = grad_out.to(tl.float32)
    for level in range(LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        height_f = height.to(tl.float32)
        width_f = width.to(tl.float32)
        for point in range(POINTS):
            sample = bags * (LEVELS * POINTS) + (level * POINTS + point)
            x = tl.load(loc_ptr + 2 * sample, mask=q_mask, other=0.0).to(tl.float32)
            y = tl.load(loc_ptr + 2 * sample + 1, mask=q_mask, other=0.0).to(tl.float32)
            attn = tl.load(attn_ptr + sample, mask=q_mask, other=0.0).to(tl.float32)
            x0, y0, fx, fy = _pixel_corner(x, y, width_f, height_f)
            grad_attn = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            grad_x = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            grad_y = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            for corner in tl.static_range(4):
                xi = x0 + (corner % 2)
                yi = y0 + (corner // 2)
                weight_x = fx if corner % 2 == 1 else 1.0 - fx
                weight_y = fy if corner // 2 == 1 else 1.0 - fy
                # d(weight_x)/d(pixel x) is +1 for the right neighbour, -1 for the left one.
                slope_x = 1.0 if corner % 2 == 1 else -1.0
                slope_y = 1.0 if corner // 2 == 1 else -1.0
                offset, valid = _corner_offsets(xi, yi, width, height, start, q_mask, HEADS * HEAD_DIM)
                mask = valid[:, None] & d_mask[None, :]
                rows = tl.load(value_base + offset[:, None], mask=mask, other=0.0).to(tl.float32)
                dot = tl.sum(rows * grad_out, axis=1)  # (BLOCK_Q,); 0 for corners off the map
                grad_attn += weight_x * weight_y * dot
                grad_x += slope_x * weight_y * dot
                grad_y += slope_y * weight_x * dot
                contribution = (attn * weight_x * weight_y)[:, None] * grad_out
                tl.atomic_add(grad_value_base + offset[:, None], contribution, mask=mask, sem="relaxed")
            # Chain rule through pixel = loc * size - 0.5.
            grad_x = grad_x * attn * width_f
            grad_y = grad_y * attn * height_f
            tl.store(grad_attn_ptr + sample, grad_attn.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * sample, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * sample + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)


def _launch_config(num_queries: int, batch_heads: int, head_dim: int):
    block_d = triton.next_power_of_2(head_dim)
    grid = (triton.cdiv(num_queries, _BLOCK_Q), batch_heads)
    return grid, block_d


class _TritonCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        batch, length, heads, head_dim = value.shape
        _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
        value = value.contiguous()
        spatial_shapes = spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous()
        level_start_index = level_start_index.to(device=value.device, dtype=torch.int64).contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        output = value.new_empty(batch, num_queries, heads, head_dim)
        if output.numel():
            grid, block_d = _launch_config(num_queries, batch * heads, head_dim)
            _forward_kernel[grid](
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output,
                num_queries, length,
                HEADS=heads, HEAD_DIM=head_dim, LEVELS=num_levels, POINTS=num_points,
                BLOCK_Q=_BLOCK_Q, BLOCK_D=block_d, num_warps=_NUM_WARPS,
            )
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return output.view(batch, num_queries, heads * head_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        batch, length, heads, head_dim = value.shape
        _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
        grad_output = grad_output.contiguous()
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        grad_locations = torch.zeros_like(sampling_locations)
        grad_attention = torch.zeros_like(attention_weights)
        if grad_output.numel():
            grid, block_d = _launch_config(num_queries, batch * heads, head_dim)
            _backward_kernel[grid](
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                grad_output, grad_value, grad_locations, grad_attention,
                num_queries, length,
                HEADS=heads, HEAD_DIM=head_dim, LEVELS=num_levels, POINTS=num_points,
                BLOCK_Q=_BLOCK_Q, BLOCK_D=block_d, num_warps=_NUM_WARPS,
            )
        return grad_value.to(value.dtype), None, None, grad_locations, grad_attention


def ms_deform_attn_core_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Same contract as `ms_deform_attn_core_reference`, as Triton kernels with a hand-written backward.

    Args:
        value: `[B, Lv, heads, dh]` float32, float16 or bfloat16 (accumulation is float32).
        spatial_shapes: int64 `[L, 2]` (H, W); level_start_index: int64 `[L]`.
        sampling_locations: `[B, Lq, heads, L, P, 2]` normalized (x, y); attention_weights:
            `[B, Lq, heads, L, P]`; any floating dtype (float32 recommended for the locations).

    Returns:
        `[B, Lq, heads*dh]` in `value`'s dtype.
    """
    return _TritonCore.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
