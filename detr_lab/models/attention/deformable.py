"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2020).

Each query attends to a handful of sampled positions instead of the whole map: per head, level and
point it predicts an offset from its reference point and a weight (softmax over levels*points), and
the output is the weighted sum of the bilinearly sampled values. The shared attention call contract
(see `detr_lab.models.attention.plain`):

    attn(query, key, value, *, key_padding_mask=None, attn_mask=None, query_padding_mask=None,
         reference_points=None, spatial_shapes=None, level_start_index=None) -> [B, Lq, d]

`key` is ignored: the offsets and weights come from the query alone. The keys of the masks are the
value positions (Lk = Lv). Masks act on the bilinear corners: a corner at a padded key
(`key_padding_mask`) or at a key the query may not attend to (`attn_mask`, True = not allowed)
contributes zero, as a corner outside the map does; the attention weights are not renormalized
(as for padding in the official code). A query whose samples all land on masked keys gets a zero
result before the output projection (the module returns `output_proj.bias`). An `attn_mask` runs
the masked reference core whatever `core_impl` says (the fast cores have no masked variant).

Parameter names, shapes and initialization follow the official `MSDeformAttn`, so official
checkpoints load unchanged.

The sampling core (`ms_deform_attn_core`) has several implementations, chosen per call by
`core_impl` ("auto" picks Triton on CUDA, the fast CPU path on CPU, the reference elsewhere);
`set_deformable_core(model, "reference")` switches every module of a model, e.g. for a benchmark.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .kernels import CORE_IMPLS, ms_deform_attn_core
from .masks import check_key_padding_mask


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over a flattened multi-scale feature map.

    Args:
        embed_dim: model width d (divisible by `num_heads`).
        num_levels: feature levels L the value map holds.
        num_heads: attention heads.
        num_points: sampling points per head and level.
        dropout: accepted for a uniform attention constructor and ignored (the official module has
            no dropout).
        core_impl: "auto", "reference", "cpu_fast", "triton" or "gather"; the attribute of the same
            name may be changed after construction.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_levels: int = 4,
        num_heads: int = 8,
        num_points: int = 4,
        *,
        dropout: float = 0.0,
        core_impl: str = "auto",
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if core_impl not in CORE_IMPLS:
            raise ValueError(f"core_impl must be one of {CORE_IMPLS}, got {core_impl!r}")
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.head_dim = embed_dim // num_heads
        self.core_impl = core_impl
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialization.

        Offsets start as a fixed pattern: head h points along the direction at angle 2*pi*h/heads,
        scaled so the larger of |cos|, |sin| is 1 (a square ring), point p at distance p+1 pixels;
        attention weights start uniform (zero logits).
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack((angles.cos(), angles.sin()), dim=-1)  # (nh, 2)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        distances = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        grid = directions[:, None, None, :] * distances[None, None, :, None]  # (nh, 1, P, 2)
        grid = grid.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def _check_inputs(
        self, query: Tensor, value: Tensor, reference_points: Tensor | None, spatial_shapes: Tensor | None
    ) -> None:
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be [B, Lq, {self.embed_dim}], got {tuple(query.shape)}")
        if value.dim() != 3 or value.shape[-1] != self.embed_dim or value.shape[0] != query.shape[0]:
            raise ValueError(
                f"value must be [B, Lv, {self.embed_dim}] with the batch size of query "
                f"{tuple(query.shape)}, got {tuple(value.shape)}"
            )
        if reference_points is None or spatial_shapes is None:
            raise ValueError("deformable attention needs reference_points and spatial_shapes")
        if tuple(spatial_shapes.shape) != (self.num_levels, 2):
            raise ValueError(
                f"spatial_shapes must be [{self.num_levels}, 2] (H, W) for {self.num_levels} levels, "
                f"got {tuple(spatial_shapes.shape)}"
            )
        positions = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
        if positions != value.shape[1]:
            raise ValueError(
                f"spatial_shapes {spatial_shapes.tolist()} cover {positions} positions, "
                f"but value has Lv={value.shape[1]}"
            )
        expected = (query.shape[0], query.shape[1], self.num_levels)
        if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != expected:
            raise ValueError(
                f"reference_points must be [B, Lq, levels, 2 or 4] with B, Lq, levels = {expected}, "
                f"got {tuple(reference_points.shape)}"
            )
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                "reference_points must end in 2 (x, y) or 4 (cx, cy, w, h) values, "
                f"got shape {tuple(reference_points.shape)}"
            )

    def sampling_locations(self, offsets: Tensor, reference_points: Tensor, spatial_shapes: Tensor) -> Tensor:
        """Normalized (x, y) sampling locations `[B, Lq, heads, L, P, 2]`.

        Args:
            offsets: `[B, Lq, heads, L, P, 2]` predicted offsets.
            reference_points: `[B, Lq, L, 2]` normalized (x, y), offsets in pixels of each level; or
                `[B, Lq, L, 4]` normalized boxes (cx, cy, w, h), offsets in units of half the box size
                divided by the number of points.
            spatial_shapes: int64 `[L, 2]` (H, W).
        """
        if reference_points.shape[-1] == 2:
            # reference + offset / (W, H), as one multiply-add over rows of L*P*2 contiguous values
            # (a broadcast over trailing dimensions of size 2 does not vectorize: ~10x slower on CPU).
            batch, num_queries, heads, levels, points, _ = offsets.shape
            inverse = torch.stack((spatial_shapes[:, 1], spatial_shapes[:, 0]), dim=-1).to(offsets.dtype)
            inverse = inverse.reciprocal()[:, None, :].expand(levels, points, 2).reshape(-1)  # (L*P*2,)
            base = reference_points[:, :, None, :, None, :].expand(batch, num_queries, 1, levels, points, 2)
            base = base.reshape(batch, num_queries, 1, -1)  # (B, Lq, 1, L*P*2)
            flat = offsets.reshape(batch, num_queries, heads, -1)  # (B, Lq, heads, L*P*2)
            return torch.addcmul(base, flat, inverse).view(offsets.shape)
        centers = reference_points[:, :, None, :, None, :2]
        sizes = reference_points[:, :, None, :, None, 2:]
        return centers + offsets / self.num_points * sizes * 0.5

    def forward(
        self,
        query: Tensor,
        key: Tensor | None,
        value: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        query_padding_mask: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        level_start_index: Tensor | None = None,
    ) -> Tensor:
        """Attend from `query` to sampled positions of the multi-scale map `value`.

        Args:
            query: `[B, Lq, d]` (position embedding already added).
            key: ignored.
            value: `[B, Lv, d]`, the levels flattened row-major one after another, Lv = sum(H*W).
            key_padding_mask: bool `[B, Lv]`, True = padding; padded positions read as zeros.
            attn_mask: bool `[Lq, Lv]`, `[B, Lq, Lv]` or `[B*heads, Lq, Lv]`, True = the query may
                not attend to the position: its bilinear corners there contribute zero.
            query_padding_mask: accepted for the shared contract and ignored.
            reference_points: `[B, Lq, L, 2]` normalized (x, y) or `[B, Lq, L, 4]` normalized
                (cx, cy, w, h) per level.
            spatial_shapes: int64 `[L, 2]`, (H, W) of each level.
            level_start_index: int64 `[L]`, offset of each level in Lv (computed when None).

        Returns:
            `[B, Lq, d]`.

        Raises:
            ValueError: inconsistent shapes or a mask of the wrong shape or dtype (the message
                names the tensor).
        """
        self._check_inputs(query, value, reference_points, spatial_shapes)
        check_key_padding_mask(key_padding_mask, query.shape[0], value.shape[1])
        if level_start_index is None:
            sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
            level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
        value = self.project_value(value, key_padding_mask)
        output = self.attend(query, value, reference_points, spatial_shapes, level_start_index, attn_mask)
        return self.output_proj(output)

    def project_value(self, value: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """`[B, Lv, d]` -> the projected values per head `[B, Lv, heads, head_dim]`, zero at padding."""
        batch, length = value.shape[:2]
        projected = self.value_proj(value)
        # On CPU a batch without padding (a single image) skips the pass over the whole map; on GPU
        # the check would cost a host synchronisation, and a traced graph (ONNX export) must mask
        # whatever its example input was.
        if key_padding_mask is not None and (
            projected.device.type != "cpu" or torch.jit.is_tracing() or bool(key_padding_mask.any())
        ):
            mask = key_padding_mask[..., None]
            # In place only on a fresh projection. Without one (D-FINE: the identity) `value` is the
            # caller's memory, shared by every decoder layer: masked out of place, each layer's
            # masking is the same function of the same inputs, which an exported graph computes once
            # (onnxruntime's common-subexpression elimination).
            if projected is value:
                projected = value.masked_fill(mask, 0.0)
            else:
                projected = projected.masked_fill_(mask, 0.0)
        return projected.view(batch, length, self.num_heads, self.head_dim)

    def attend(
        self,
        query: Tensor,
        value: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        attn_mask: Tensor | None,
    ) -> Tensor:
        """Offsets and weights from `query` `[B, Lq, d]`, sampled from `value` `[B, Lv, heads, hd]` ->
        `[B, Lq, d]` (before the output projection)."""
        batch, num_queries, _ = query.shape
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, num_queries, self.num_heads, self.num_levels * self.num_points
        )
        weights = weights.softmax(-1).view(offsets.shape[:-1])  # (B, Lq, nh, L, P)
        locations = self.sampling_locations(offsets, reference_points, spatial_shapes)
        return ms_deform_attn_core(
            value,
            spatial_shapes,
            level_start_index,
            locations,
            weights,
            impl=self.core_impl,
            attn_mask=attn_mask,
        )  # (B, Lq, d)


def set_deformable_core(model: nn.Module, impl: str) -> int:
    """Set `core_impl` of every `MultiScaleDeformableAttention` inside `model`; returns how many."""
    if impl not in CORE_IMPLS:
        raise ValueError(f"impl must be one of {CORE_IMPLS}, got {impl!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            module.core_impl = impl
            count += 1
    return count


def build(
    *, embed_dim: int, num_heads: int, dropout: float, num_levels: int, num_points: int, **_
) -> MultiScaleDeformableAttention:
    """The "deformable" variant (see `detr_lab.models.attention.ATTENTION_SPECS`): `num_levels`
    levels, `num_points` sampling points per head and level."""
    return MultiScaleDeformableAttention(embed_dim, num_levels, num_heads, num_points, dropout=dropout)
