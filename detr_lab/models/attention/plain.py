"""Plain multi-head attention (DETR), batch-first, on `scaled_dot_product_attention`.

`impl="math"` computes the same attention step by step (scaled `q @ k^T`, additive mask, softmax,
dropout, `@ v`), as `nn.MultiheadAttention` of the reference DETR code does; it is the reference path
for benchmarks and tests. `set_plain_attention_impl(model, "math")` switches every module of a model.

The call contract is shared by every attention module in this package:

    attn(query, key, value, *, key_padding_mask=None, attn_mask=None, query_padding_mask=None,
         reference_points=None, spatial_shapes=None, level_start_index=None) -> [B, Lq, d]

- `query` `[B, Lq, d]`, `key` / `value` `[B, Lk, d]` (batch-first).
- `key_padding_mask` bool `[B, Lk]` and `attn_mask` bool `[Lq, Lk]`, `[B, Lq, Lk]` or
  `[B*heads, Lq, Lk]`: one polarity, True = may NOT attend (padding / not allowed); see
  `detr_lab.models.attention.masks`. A query with no allowed key gets a zero attention result
  (the output projection's bias), never NaN.
- `query_padding_mask` bool `[B, Lq]`, True = padded query: its output is never read by real
  tokens. Only adaptive clustering attention uses it (padded queries form their own clusters).
- The multi-scale arguments are for deformable attention; the others accept and ignore them.

Attention modules only mix tokens: no residual connection and no normalization inside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_lab.models.dropout import dropout as cheap_dropout_fn

from .masks import additive_mask, blocked_keys

PLAIN_IMPLS = ("sdpa", "math")


class PlainAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections.

    Args:
        embed_dim: model width d (divisible by `num_heads`).
        num_heads: number of heads.
        dropout: dropout on the attention weights (training only).
        impl: "sdpa" (`F.scaled_dot_product_attention`, fused where the device has a kernel) or
            "math" (explicit matmul + softmax); the attribute of the same name may be changed later.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, impl: str = "sdpa") -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if impl not in PLAIN_IMPLS:
            raise ValueError(f"impl must be one of {PLAIN_IMPLS}, got {impl!r}")
        self.impl = impl
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As nn.MultiheadAttention: xavier-uniform over the packed [3d, d] in-projection, zero biases.
        bound = (6.0 / (self.embed_dim + 3 * self.embed_dim)) ** 0.5
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.uniform_(proj.weight, -bound, bound)
            nn.init.zeros_(proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def split_heads(self, x: Tensor) -> Tensor:
        """`[B, L, d]` -> `[B, heads, L, head_dim]`."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:
        """`[B, heads, L, head_dim]` -> `[B, L, d]`."""
        batch, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(batch, length, self.embed_dim)

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project and split heads: each `[B, heads, L, head_dim]` (queries not yet scaled)."""
        return (
            self.split_heads(self.q_proj(query)),
            self.split_heads(self.k_proj(key)),
            self.split_heads(self.v_proj(value)),
        )

    def attention_mask(
        self,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        shape: tuple[int, int, int],
        dtype: torch.dtype,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Masks of the contract -> (additive float mask, fully masked rows), or (None, None).

        Args:
            key_padding_mask: bool `[B, Lk]`, True = padding.
            attn_mask: bool `[Lq, Lk]`, `[B, Lq, Lk]` or `[B*heads, Lq, Lk]`, True = may not attend.
            shape: (B, Lq, Lk). dtype: of the additive mask.

        Returns:
            The additive mask `[B or 1, heads or 1, Lq or 1, Lk]` (0 allowed, -inf not) and the bool
            rows `[..., 1]` where every key is masked (their mask row is 0; the caller zeroes their
            result).

        Raises:
            ValueError: a mask of the wrong dtype or shape (the message names it).
        """
        if key_padding_mask is None and attn_mask is None:
            return None, None
        batch, num_queries, num_keys = shape
        blocked = blocked_keys(attn_mask, key_padding_mask, batch, self.num_heads, num_queries, num_keys)
        return additive_mask(blocked, dtype)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        query_padding_mask: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        level_start_index: Tensor | None = None,
    ) -> Tensor:
        """Attend from `query` `[B, Lq, d]` to `key`/`value` `[B, Lk, d]` -> `[B, Lq, d]`.

        `key_padding_mask` bool `[B, Lk]` (True = padding) and `attn_mask` bool `[Lq, Lk]`,
        `[B, Lq, Lk]` or `[B*heads, Lq, Lk]` (True = may not attend) together decide which keys
        each query sees; a query that sees none returns `out_proj.bias`. `query_padding_mask` and
        the multi-scale arguments are accepted for the shared contract and ignored.

        Raises:
            ValueError: a mask of the wrong dtype or shape.
        """
        q, k, v = self.project(query, key, value)  # (B, nh, L, hd)
        shape = (query.shape[0], query.shape[1], key.shape[1])
        mask, empty = self.attention_mask(key_padding_mask, attn_mask, shape, q.dtype)
        dropout = self.dropout if self.training else 0.0
        if self.impl == "math":
            out = self.math_attention(q, k, v, mask, dropout)
        elif dropout > 0 and q.device.type == "cpu":
            # SDPA's CPU dropout draws one Bernoulli sample per attention weight, the slow sampler that
            # `detr_lab.models.dropout` replaces: the weights are formed explicitly to use its mask.
            out = self.math_attention(q, k, v, mask, dropout, cheap_dropout=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)  # queries with no allowed key attend to nothing
        return self.out_proj(self.merge_heads(out))

    def math_attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, *,
        cheap_dropout: bool = False,
    ) -> Tensor:
        """softmax(q k^T / sqrt(head_dim) + mask) v, step by step.

        q `[B, nh, Lq, hd]`, k and v `[B, nh, Lk, hd]`, additive mask broadcastable to
        `[B, nh, Lq, Lk]` or None -> `[B, nh, Lq, hd]`. `dropout` on the weights: `F.dropout`, or with
        `cheap_dropout` `detr_lab.models.dropout.dropout` (same distribution to 2^-15, cheaper mask).
        """
        scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)  # (B, nh, Lq, Lk)
        if mask is not None:
            scores = scores + mask
        drop = cheap_dropout_fn if cheap_dropout else F.dropout
        weights = drop(scores.softmax(dim=-1), p=dropout, training=dropout > 0)
        return weights @ v


def set_plain_attention_impl(model: nn.Module, impl: str) -> int:
    """Set `impl` ("sdpa" or "math") of every `PlainAttention` inside `model`; returns how many.

    Subclasses with their own attention computation (adaptive clustering attention) are left alone.
    """
    if impl not in PLAIN_IMPLS:
        raise ValueError(f"impl must be one of {PLAIN_IMPLS}, got {impl!r}")
    count = 0
    for module in model.modules():
        if type(module) is PlainAttention:
            module.impl = impl
            count += 1
    return count


def build(*, embed_dim: int, num_heads: int, dropout: float, **_) -> PlainAttention:
    """The "plain" variant (see `detr_lab.models.attention.ATTENTION_SPECS`) at either site:
    `embed_dim` wide, `num_heads` heads, `dropout` on the attention weights."""
    return PlainAttention(embed_dim, num_heads, dropout=dropout)
