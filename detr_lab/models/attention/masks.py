"""Attention masks shared by every attention module: shape checks, merging, fully masked rows.

One polarity everywhere: True = this query may NOT attend to this key (as `key_padding_mask`, where
True = padding). `attn_mask` is a bool tensor in one of three shapes (the ones
`nn.MultiheadAttention` accepts, batch-major for the per-head form):

- `[Lq, Lk]`: the same mask for every batch element and head;
- `[B, Lq, Lk]`: one mask per batch element, shared by its heads;
- `[B*heads, Lq, Lk]`: one mask per batch element and head, row `b * heads + h`.

A query whose every key is masked (by `attn_mask` and `key_padding_mask` together) attends to
nothing: its attention result is zero before the output projection, so the module returns the
output projection's bias for it. Implementations unmask such rows before the softmax and zero
their result afterwards, so neither the output nor any gradient is NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_key_padding_mask(mask: Tensor | None, batch: int, num_keys: int) -> None:
    """Raise `ValueError` unless `mask` is None or bool `[B, Lk]` (True = padding)."""
    if mask is None:
        return
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, num_keys):
        raise ValueError(
            f"key_padding_mask must be bool [B, Lk] = [{batch}, {num_keys}] (True = padding), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )


def normalize_attn_mask(
    attn_mask: Tensor | None, batch: int, heads: int, num_queries: int, num_keys: int
) -> Tensor | None:
    """`attn_mask` in any accepted shape -> bool `[B or 1, heads or 1, Lq, Lk]` (a view, no copy).

    Args:
        attn_mask: None, or bool `[Lq, Lk]`, `[B, Lq, Lk]` or `[B*heads, Lq, Lk]` (True = the query
            may not attend to the key; per-head rows batch-major, `b * heads + h`).
        batch, heads, num_queries, num_keys: B, heads, Lq, Lk of the attention call.

    Raises:
        ValueError: a non-bool mask, or a shape other than the three above (the message names it).
    """
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool:
        raise ValueError(
            f"attn_mask must be a bool tensor (True = may not attend), got {attn_mask.dtype} "
            f"of shape {tuple(attn_mask.shape)}"
        )
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() == 2 and shape == (num_queries, num_keys):
        return attn_mask[None, None]
    if attn_mask.dim() == 3 and shape[1:] == (num_queries, num_keys):
        if shape[0] == batch:
            return attn_mask[:, None]
        if shape[0] == batch * heads:
            return attn_mask.view(batch, heads, num_queries, num_keys)
    raise ValueError(
        f"attn_mask has shape {shape}; expected [Lq, Lk] = [{num_queries}, {num_keys}], "
        f"[B, Lq, Lk] = [{batch}, {num_queries}, {num_keys}] or "
        f"[B*heads, Lq, Lk] = [{batch * heads}, {num_queries}, {num_keys}]"
    )


def blocked_keys(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    batch: int,
    heads: int,
    num_queries: int,
    num_keys: int,
) -> Tensor | None:
    """Every key a query may not attend to: bool `[B or 1, heads or 1, Lq or 1, Lk]`, or None.

    `attn_mask` as `normalize_attn_mask` accepts; `key_padding_mask` bool `[B, Lk]` (True =
    padding). The result is True where either mask is.
    """
    check_key_padding_mask(key_padding_mask, batch, num_keys)
    mask = normalize_attn_mask(attn_mask, batch, heads, num_queries, num_keys)
    padding = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    if mask is None:
        return padding
    return mask if padding is None else mask | padding


def additive_mask(blocked: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Bool blocked keys `[..., Lq or 1, Lk]` -> (additive float mask, fully masked rows).

    The additive mask is 0 where attention is allowed and -inf where it is not, except on rows
    where every key is blocked: those are all 0 (finite softmax). `empty` `[..., Lq or 1, 1]` marks
    those rows; the caller zeroes their attention result.
    """
    empty = blocked.all(dim=-1, keepdim=True)
    mask = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)
    mask = mask.masked_fill(blocked & ~empty, float("-inf"))
    return mask, empty
