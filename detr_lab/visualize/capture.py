"""What the attention modules did in one forward pass, recovered with forward hooks (no model changes).

Attention modules share one call contract (`query`, `key`, `value`, `key_padding_mask`,
`attn_mask`, `reference_points`, `spatial_shapes`, `level_start_index`); a hook registered
`with_kwargs=True` sees every argument, and positional ones are bound to their names. From them the
quantities to draw are recomputed with the module's own layers:

- `plain_attention_weights`: softmax(q k^T / sqrt(head_dim)) with blocked keys excluded, from
  `q_proj` / `k_proj` (DETR's decoder cross-attention, Carion et al. 2020, Fig. 6);
- `deformable_sampling`: sampling locations and their weights from `sampling_offsets` /
  `attention_weights` and the reference points, as `MultiScaleDeformableAttention.forward` computes
  them (Zhu et al. 2020, Eq. 2-3);
- `act_cluster_index`: the E2LSH clusters of the (scaled) queries of an ACT encoder layer, from
  `hash_queries` / `cluster_queries` (Zheng et al. 2020).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from detr_lab.models.attention.clustering import AdaptiveClusteringAttention
from detr_lab.models.attention.deformable import MultiScaleDeformableAttention
from detr_lab.models.attention.masks import blocked_keys
from detr_lab.models.attention.plain import PlainAttention


@contextmanager
def record_inputs(modules: Sequence[nn.Module]) -> Iterator[list[dict[str, Tensor]]]:
    """Within the block, each call of `modules[i]` stores its arguments, by name, in `records[i]`.

    Yields the list of records (one dict per module, filled by the forward pass; a later call of
    the same module overwrites its record). The hooks are removed on exit.
    """
    records: list[dict[str, Tensor]] = [{} for _ in modules]
    handles = []
    for record, module in zip(records, modules, strict=True):

        signature = inspect.signature(module.forward)

        def hook(_module, args, kwargs, _output, record=record, signature=signature):
            record.clear()
            bound = signature.bind_partial(*args, **kwargs).arguments  # positional ones by name too
            record.update({k: v for k, v in bound.items() if v is not None})

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _require(record: dict[str, Tensor], names: Sequence[str], module: nn.Module) -> None:
    missing = [n for n in names if n not in record]
    if missing:
        raise ValueError(f"{type(module).__name__} was not called with {missing} (did the forward pass run?)")


@torch.no_grad()
def plain_attention_weights(module: PlainAttention, record: dict[str, Tensor]) -> Tensor:
    """Attention weights of a `PlainAttention` call: float `[B, heads, Lq, Lk]`, rows summing to 1.

    `record` holds the call's `query` `[B, Lq, d]`, `key` `[B, Lk, d]`, optional `key_padding_mask`
    bool `[B, Lk]` (True = padding) and `attn_mask` (True = may not attend; shapes as
    `detr_lab.models.attention.masks.normalize_attn_mask`): blocked keys get weight 0, and a query
    whose every key is blocked gets an all-zero row (as the module, which attends to nothing there).
    """
    _require(record, ("query", "key"), module)
    q = module.split_heads(module.q_proj(record["query"]))  # (B, nh, Lq, hd)
    k = module.split_heads(module.k_proj(record["key"]))  # (B, nh, Lk, hd)
    scores = (q * module.head_dim**-0.5) @ k.transpose(-2, -1)  # (B, nh, Lq, Lk)
    batch, heads, num_queries, num_keys = scores.shape
    blocked = blocked_keys(record.get("attn_mask"), record.get("key_padding_mask"), batch, heads,
                           num_queries, num_keys)  # broadcastable to (B, nh, Lq, Lk) or None
    if blocked is None:
        return scores.softmax(dim=-1)
    empty = blocked.all(dim=-1, keepdim=True)  # rows with nothing to attend to
    weights = scores.masked_fill(blocked & ~empty, float("-inf")).softmax(dim=-1)
    return weights.masked_fill(empty, 0.0)


@torch.no_grad()
def deformable_sampling(
    module: MultiScaleDeformableAttention, record: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """Sampling locations and weights of a `MultiScaleDeformableAttention` call.

    `record` holds `query` `[B, Lq, d]`, `reference_points` `[B, Lq, L, 2 or 4]` and
    `spatial_shapes` int64 `[L, 2]`.

    Returns:
        locations: float `[B, Lq, heads, L, P, 2]` normalized (x, y) in each level's padded map;
        weights: float `[B, Lq, heads, L, P]`, summing to 1 over levels and points per head.
    """
    _require(record, ("query", "reference_points", "spatial_shapes"), module)
    query = record["query"]
    batch, num_queries, _ = query.shape
    shape = (batch, num_queries, module.num_heads, module.num_levels, module.num_points)
    offsets = module.sampling_offsets(query).view(*shape, 2)
    weights = module.attention_weights(query).view(batch, num_queries, module.num_heads, -1)
    weights = weights.softmax(-1).view(shape)
    locations = module.sampling_locations(offsets, record["reference_points"], record["spatial_shapes"])
    return locations, weights


@torch.no_grad()
def act_cluster_index(module: AdaptiveClusteringAttention, record: dict[str, Tensor]) -> Tensor:
    """Cluster of every query of an ACT call: int64 `[B, heads, Lq]`, ids from 0 per (batch, head).

    `record` holds `query`, `key` `[B, L, d]` and optional `key_padding_mask` bool `[B, L]` (True =
    padding), which (as in the module for encoder self-attention) also keeps padded queries apart.
    """
    _require(record, ("query",), module)
    q = module.split_heads(module.q_proj(record["query"])) * module.head_dim**-0.5  # (B, nh, Lq, hd)
    padding = record.get("query_padding_mask", record.get("key_padding_mask"))
    cluster_index, _, _ = module.cluster_queries(module.hash_queries(q), padding)
    return cluster_index


def level_map(values: Tensor, spatial_shapes: Tensor, level: int) -> Tensor:
    """Slice level `level` out of flattened multi-level tokens: `[..., S]` -> `[..., H_l, W_l]`."""
    sizes = (spatial_shapes[:, 0] * spatial_shapes[:, 1]).tolist()
    if not 0 <= level < len(sizes):
        raise ValueError(f"level {level} out of range: the model has {len(sizes)} feature level(s)")
    start = sum(sizes[:level])
    height, width = (int(v) for v in spatial_shapes[level])
    return values[..., start:start + sizes[level]].reshape(*values.shape[:-1], height, width)
