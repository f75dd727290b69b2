"""Multi-scale deformable attention core: one contract, several implementations.

    ms_deform_attn_core(value, spatial_shapes, level_start_index, sampling_locations,
                        attention_weights, impl="auto") -> [B, Lq, heads*dh]

Implementations (`impl`):

- "reference": per-level `F.grid_sample` in plain PyTorch (any device, autograd; the definition).
- "cpu_fast": a weighted gather-sum (`embedding_bag`) with a hand-written backward; CPU.
- "triton": Triton kernels for CUDA tensors (Triton is imported only when this path is used).
- "gather": the bilinear neighbours gathered from the flattened map (`gather.py`: pair rows, or
  single rows for calls with few samples per map position), any device, autograd; the ONNX export
  path (standard operators only, valid for every traced input size).
- "auto": "triton" for CUDA tensors when Triton imports, "cpu_fast" for CPU tensors, otherwise
  "reference" (e.g. MPS, or CUDA without Triton).

All paths sample bilinearly with zero padding and pixel centres at +0.5, i.e. like
`F.grid_sample(value_level, 2 * sampling_locations - 1, align_corners=False, padding_mode="zeros")`.

With an `attn_mask` (bool, True = the query may not attend to the key) every `impl` runs
`ms_deform_attn_core_masked`, the reference computation in which a bilinear corner at a masked key
contributes zero; the fast cores have no masked variant.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from ..masks import normalize_attn_mask
from .cpu_fast import ms_deform_attn_core_cpu_fast
from .gather import ms_deform_attn_core_gather
from .reference import ms_deform_attn_core_masked, ms_deform_attn_core_reference

CORE_IMPLS = ("auto", "reference", "cpu_fast", "triton", "gather")

__all__ = [
    "CORE_IMPLS",
    "ms_deform_attn_core",
    "ms_deform_attn_core_cpu_fast",
    "ms_deform_attn_core_gather",
    "ms_deform_attn_core_masked",
    "ms_deform_attn_core_reference",
    "resolve_core_impl",
    "triton_available",
]


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (its kernels are compiled lazily, at the first call)."""
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install can fail in other ways than ImportError
        return False
    return True


def resolve_core_impl(impl: str, device: torch.device) -> str:
    """The implementation that `impl` ("auto" or a name from `CORE_IMPLS`) means for `device`."""
    if impl not in CORE_IMPLS:
        raise ValueError(f"unknown deformable attention core impl {impl!r}; expected one of {CORE_IMPLS}")
    if impl != "auto":
        return impl
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu":
        return "cpu_fast"
    return "reference"


def _check_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> None:
    if value.dim() != 4:
        raise ValueError(f"value must be [B, Lv, heads, dh], got shape {tuple(value.shape)}")
    batch, length, heads, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be [B, Lq, heads, levels, points, 2], "
            f"got {tuple(sampling_locations.shape)}"
        )
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if sampling_locations.shape[0] != batch or sampling_locations.shape[2] != heads:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value {tuple(value.shape)} "
            "in batch size or number of heads"
        )
    expected = (batch, num_queries, heads, num_levels, num_points)
    if tuple(attention_weights.shape) != expected:
        raise ValueError(f"attention_weights must be {expected}, got {tuple(attention_weights.shape)}")
    if tuple(spatial_shapes.shape) != (num_levels, 2):
        raise ValueError(f"spatial_shapes must be ({num_levels}, 2), got {tuple(spatial_shapes.shape)}")
    if tuple(level_start_index.shape) != (num_levels,):
        raise ValueError(f"level_start_index must be ({num_levels},), got {tuple(level_start_index.shape)}")
    if spatial_shapes.device.type == "cpu":  # reading the values is free here (no device sync)
        total = int(spatial_shapes.prod(1).sum())
        if total != length:
            raise ValueError(
                f"spatial_shapes {spatial_shapes.tolist()} cover {total} positions but value has Lv={length}"
            )


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    impl: str = "auto",
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Weighted sum of bilinear samples of a multi-scale value map.

    Args:
        value: `[B, Lv, heads, dh]`, all levels flattened (row-major H x W) one after another.
        spatial_shapes: int64 `[L, 2]`, (H, W) of each level.
        level_start_index: int64 `[L]`, offset of each level in `Lv`.
        sampling_locations: `[B, Lq, heads, L, P, 2]`, normalized (x, y): (0, 0) is the top-left corner
            of the map, (1, 1) the bottom-right one, pixel centres at ((j + 0.5) / W, (i + 0.5) / H);
            samples outside the map read zeros.
        attention_weights: `[B, Lq, heads, L, P]` (usually softmax-normalized over L*P per head).
        impl: "auto", "reference", "cpu_fast", "triton" or "gather" (see the module docstring).
        attn_mask: optional bool `[Lq, Lv]`, `[B, Lq, Lv]` or `[B*heads, Lq, Lv]`, True = the query
            may not attend to the key: a bilinear corner at such a key contributes zero. Any mask
            runs the masked reference computation, whatever `impl` says.

    Returns:
        `[B, Lq, heads*dh]` in `value`'s dtype, heads concatenated.

    Raises:
        ValueError: inconsistent shapes (the message names the tensor), an `attn_mask` of another
            shape or dtype.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if attn_mask is not None:
        batch, length, heads, _ = value.shape
        mask = normalize_attn_mask(attn_mask, batch, heads, sampling_locations.shape[1], length)
        return ms_deform_attn_core_masked(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, mask
        )
    name = resolve_core_impl(impl, value.device)
    if name == "reference":
        core = ms_deform_attn_core_reference
    elif name == "cpu_fast":
        core = ms_deform_attn_core_cpu_fast
    elif name == "gather":
        core = ms_deform_attn_core_gather
    else:
        if value.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"impl='triton' needs CUDA tensors (value is on {value.device}); "
                "CPU tensors only run under Triton's interpreter (TRITON_INTERPRET=1)"
            )
        if not triton_available():
            raise RuntimeError("impl='triton' was requested but Triton cannot be imported")
        from .triton_ms_deform import ms_deform_attn_core_triton as core
    return core(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
