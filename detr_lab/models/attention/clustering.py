"""Adaptive clustering attention (ACT, Zheng et al., arXiv:2011.09315), batch-first, pure PyTorch.

Queries that look alike are grouped, per batch element and head, with Euclidean LSH (E2LSH); each
group's mean query (its *prototype*) attends to all keys, and every member query receives its
prototype's result. The number of groups adapts to the input: similar queries share one hash code.

For one head, with queries `q` already scaled by 1/sqrt(head_dim), round i hashes

    h_i(q) = floor((q . a_i + b_i) / r),     a_i ~ N(0, I_head_dim),  b_i ~ U(0, r),

and two queries share a cluster when all L rounds agree. The whole vector h_1..h_L is the cluster
key: rounds are never packed into the bits of one integer. Grouping sorts a random 64-bit
fingerprint of each vector and then compares the vectors behind equal fingerprints element by
element; on any collision it falls back to an exact lexicographic `unique`, so two different
vectors never share a cluster, for any L and any bucket index up to 2**62. Cost per head: the
prototype attention is O(K * Lk) instead of O(Lq * Lk) for K clusters.

The module has exactly the parameters of `PlainAttention` (q/k/v/out projections), so a checkpoint
trained with plain encoder attention loads unchanged. The hash draws are non-persistent buffers
(absent from `state_dict`), drawn once at construction from `seed`:

- one set of L rounds per module, shared by all heads and batch elements;
- rounds are drawn one after another from a CPU `torch.Generator`, so for the same seed the first
  L rounds of an L + k module equal those of an L module and its partition refines the L one
  (more rounds never merge clusters);
- modules built with the same seed (e.g. every encoder layer from one config) hash identically.

The authors' released code redraws the hash functions on every call and uses r = 8 with
b ~ U(0, 1); here the draws are fixed (so evaluation is reproducible), b ~ U(0, r) as in E2LSH, and
r is a constructor argument.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from detr_lab.models.attention.masks import additive_mask, check_key_padding_mask, normalize_attn_mask
from detr_lab.models.attention.plain import PlainAttention

# Random 64-bit fingerprints of the hash rows make grouping a 1-D sort; equal fingerprints are then
# checked row by row, and any collision falls back to an exact multi-column `unique`.
_FINGERPRINT_SEED = 0x5EED
_MAX_HASH_MAGNITUDE = 2.0**62


def draw_hash_functions(
    head_dim: int, num_rounds: int, bucket_width: float, seed: int
) -> tuple[Tensor, Tensor]:
    """E2LSH draws: directions `[head_dim, num_rounds]` ~ N(0, 1) and offsets `[num_rounds]` ~ U(0, r).

    Round i uses only the generator draws made after rounds 0..i-1, so a longer draw with the same
    seed starts with the shorter one. Returned in float32 on the CPU.
    """
    generator = torch.Generator().manual_seed(seed)
    directions, offsets = [], []
    for _ in range(num_rounds):  # one round at a time keeps the prefix property for any length
        directions.append(torch.randn(head_dim, generator=generator, dtype=torch.float64))
        offsets.append(torch.rand((), generator=generator, dtype=torch.float64) * bucket_width)
    return torch.stack(directions, dim=1).float(), torch.stack(offsets).float()


def e2lsh_hashes(queries: Tensor, directions: Tensor, offsets: Tensor, bucket_width: float) -> Tensor:
    """Hash `queries` `[..., head_dim]` with L E2LSH rounds -> int64 `[..., L]` (no gradient).

    Computed in float32 (float64 for float64 queries). Raises `ValueError` when a bucket index is not
    finite or beyond +-2**62 (non-finite queries, or a `bucket_width` far too small for them).
    """
    dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        projected = queries.detach().to(dtype) @ directions.to(dtype)  # (..., L)
        buckets = torch.floor((projected + offsets.to(dtype)) / bucket_width)
        if buckets.numel() and not bool(buckets.abs().amax() < _MAX_HASH_MAGNITUDE):
            raise ValueError(
                f"E2LSH bucket indices of the queries are not finite or exceed 2**62 "
                f"(bucket_width={bucket_width}): check the queries for inf/nan or raise bucket_width"
            )
        return buckets.long()


def _exact_groups(group_ids: Tensor, rows: Tensor) -> Tensor:
    """Cluster ids of `(group_ids[m], rows[m])` by exact lexicographic `unique`, group-major order."""
    keyed = torch.cat([group_ids[:, None], rows], dim=1)  # (M, 1 + C)
    return torch.unique(keyed, dim=0, return_inverse=True)[1]


def group_equal_rows(group_ids: Tensor, rows: Tensor, *, fingerprint_bits: int = 62) -> Tensor:
    """Number the distinct `(group_id, row)` pairs: equal pairs get equal ids, different pairs differ.

    Args:
        group_ids: int64 `[M]`, values in `[0, G)` (one id per batch element and head).
        rows: int64 `[M, C]`, the cluster key of each item (e.g. its L hash values).
        fingerprint_bits: bits of the random row fingerprint used for the fast path (tests lower it
            to force the exact fallback).

    Returns:
        int64 `[M]` cluster ids in `[0, K)`, K the number of distinct pairs, numbered group-major: the
        clusters of group g come before those of group g + 1.
    """
    num_items, num_columns = rows.shape
    if num_items == 0:
        return torch.zeros(0, dtype=torch.long, device=rows.device)
    num_groups = int(group_ids.max()) + 1
    group_bits = max(1, math.ceil(math.log2(num_groups + 1)))
    if 62 - group_bits < 16:  # too many groups to keep a useful fingerprint beside the group id
        return _exact_groups(group_ids, rows)
    bits = min(fingerprint_bits, 62 - group_bits)
    generator = torch.Generator().manual_seed(_FINGERPRINT_SEED)
    multipliers = torch.randint(-(2**62), 2**62, (num_columns,), generator=generator) | 1
    # Wrapping int64 arithmetic: a random linear fingerprint of the row, then a xor-shift to mix
    # high bits into the low ones that are kept.
    fingerprint = (rows * multipliers.to(rows.device)).sum(dim=1)
    fingerprint = fingerprint ^ (fingerprint >> 29)
    key = (group_ids << bits) | (fingerprint & ((1 << bits) - 1))
    unique_keys, inverse = torch.unique(key, return_inverse=True)  # sorted: group-major
    # Verify: every item must equal the first item that has its key.
    first = torch.full((unique_keys.numel(),), num_items, dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, inverse, torch.arange(num_items, device=rows.device), reduce="amin")
    representative = first.index_select(0, inverse)
    if bool((rows != rows.index_select(0, representative)).any()):  # fingerprint collision: exact path
        return _exact_groups(group_ids, rows)
    return inverse


class AdaptiveClusteringAttention(PlainAttention):
    """ACT: queries clustered by E2LSH per batch element and head; prototypes attend to the keys.

    Args:
        embed_dim: model width d (divisible by `num_heads`).
        num_heads: number of heads.
        dropout: dropout on the prototypes' attention weights (training only); all members of a
            cluster share their prototype's dropped weights.
        q_hashes: L, the number of E2LSH rounds; more rounds give more, smaller clusters.
        bucket_width: r, the E2LSH bucket width, in units of the scaled queries (q / sqrt(head_dim));
            wider buckets give fewer, larger clusters.
        seed: seeds the hash draws (see the module docstring).

    After each forward, `last_num_clusters` holds the mean number of clusters of real (non-padded)
    queries over batch x heads, and `last_clusters_per_head` the int64 `[B, heads]` counts.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        q_hashes: int = 32,
        bucket_width: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout)
        if isinstance(q_hashes, bool) or not isinstance(q_hashes, int) or q_hashes < 1:
            raise ValueError(f"q_hashes must be a positive integer, got {q_hashes!r}")
        if not (isinstance(bucket_width, (int, float)) and math.isfinite(bucket_width) and bucket_width > 0):
            raise ValueError(f"bucket_width must be a finite positive number, got {bucket_width!r}")
        self.q_hashes = q_hashes
        self.bucket_width = float(bucket_width)
        self.seed = int(seed)
        directions, offsets = draw_hash_functions(self.head_dim, q_hashes, self.bucket_width, self.seed)
        # Non-persistent: not in state_dict, so plain-attention checkpoints load unchanged.
        self.register_buffer("hash_directions", directions, persistent=False)  # (head_dim, L)
        self.register_buffer("hash_offsets", offsets, persistent=False)  # (L,)
        self.last_num_clusters = float("nan")
        self.last_clusters_per_head: Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"q_hashes={self.q_hashes}, bucket_width={self.bucket_width}, seed={self.seed}"
        )

    def hash_queries(self, queries: Tensor) -> Tensor:
        """Scaled queries `[B, heads, Lq, head_dim]` -> int64 hash codes `[B, heads, Lq, L]`."""
        return e2lsh_hashes(queries, self.hash_directions, self.hash_offsets, self.bucket_width)

    def cluster_queries(
        self, hashes: Tensor, query_padding_mask: Tensor | None = None, mask_rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Group queries whose L hash values all agree, separately for each batch element and head.

        Args:
            hashes: int64 `[B, heads, Lq, L]`.
            query_padding_mask: optional bool `[B, Lq]`, True = padding; padded queries never share
                a cluster with real ones.
            mask_rows: optional int64 `[B, heads, Lq]`, an id of each query's `attn_mask` row; only
                queries with equal ids (the same allowed keys) share a cluster.

        Returns:
            cluster_index: int64 `[B, heads, Lq]`, each query's cluster in `[0, K_max)`, numbered
                per (batch element, head).
            num_clusters: int64 `[B, heads]`, clusters per (batch element, head), padding included.
            num_real_clusters: int64 `[B, heads]`, clusters that hold real (non-padded) queries.
        """
        batch, heads, length, rounds = hashes.shape
        device = hashes.device
        groups = batch * heads
        group_ids = torch.arange(groups, device=device).repeat_interleave(length)  # (B*nh*Lq,)
        rows = hashes.reshape(groups * length, rounds)
        is_padding = torch.zeros(batch, heads, length, dtype=torch.long, device=device)
        if query_padding_mask is not None:
            is_padding = is_padding + query_padding_mask[:, None, :].long()
            rows = torch.cat([is_padding.reshape(-1, 1), rows], dim=1)  # padding joins the key
        if mask_rows is not None:
            rows = torch.cat([mask_rows.reshape(-1, 1), rows], dim=1)  # so does the attn_mask row
        cluster_ids = group_equal_rows(group_ids, rows)  # (B*nh*Lq,), group-major
        num_total = int(cluster_ids.max()) + 1 if cluster_ids.numel() else 0
        # Group and padding flag of each cluster (all its members agree on both).
        cluster_group = torch.zeros(num_total, dtype=torch.long, device=device)
        cluster_group = cluster_group.scatter(0, cluster_ids, group_ids)
        cluster_padding = torch.zeros(num_total, dtype=torch.long, device=device)
        cluster_padding = cluster_padding.scatter(0, cluster_ids, is_padding.reshape(-1))
        num_clusters = torch.bincount(cluster_group, minlength=groups)  # (B*nh,)
        num_real = torch.bincount(cluster_group[cluster_padding == 0], minlength=groups)
        first_of_group = torch.cumsum(num_clusters, dim=0) - num_clusters
        local_ids = cluster_ids - first_of_group.index_select(0, group_ids)
        return (
            local_ids.view(batch, heads, length),
            num_clusters.view(batch, heads),
            num_real.view(batch, heads),
        )

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

        Args:
            key_padding_mask: bool `[B, Lk]`, True = padding (those keys get no weight).
            attn_mask: bool `[Lq, Lk]`, `[B, Lq, Lk]` or `[B*heads, Lq, Lk]`, True = the query may
                not attend to the key. Queries share a cluster only when their mask rows are equal,
                so every prototype attends with exactly its members' mask. A query with no allowed
                key returns `out_proj.bias`.
            query_padding_mask: bool `[B, Lq]`, True = padded query; padded queries never share a
                cluster with real ones. The encoder layer passes its padding mask here; without it,
                padded queries are clustered like any other.
            reference_points, spatial_shapes, level_start_index: accepted for the shared contract
                and ignored.

        Raises:
            ValueError: a mask of the wrong dtype or shape; non-finite queries (see `e2lsh_hashes`).
        """
        batch, num_queries, _ = query.shape
        num_keys = key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        check_key_padding_mask(key_padding_mask, batch, num_keys)
        self._check_mask("query_padding_mask", query_padding_mask, batch, num_queries)
        rule = normalize_attn_mask(attn_mask, batch, heads, num_queries, num_keys)  # (B|1, nh|1, Lq, Lk)
        q, k, v = self.project(query, key, value)  # (B, nh, L, hd)
        q = q * head_dim**-0.5
        hashes = self.hash_queries(q)  # (B, nh, Lq, L)
        mask_rows, distinct_rows = None, None
        if rule is not None:
            # Number the distinct mask rows; equal rows (the same allowed keys) get equal ids.
            distinct_rows, row_ids = torch.unique(rule.reshape(-1, num_keys), dim=0, return_inverse=True)
            mask_rows = row_ids.view(rule.shape[:3]).expand(batch, heads, num_queries)
        cluster_index, num_clusters, num_real = self.cluster_queries(hashes, query_padding_mask, mask_rows)
        max_clusters = int(num_clusters.max()) if num_clusters.numel() else 0
        self.last_clusters_per_head = num_real
        self.last_num_clusters = float(num_real.double().mean()) if num_real.numel() else float("nan")

        # Prototypes: mean member query, padded to max_clusters per (batch element, head).
        first_slot = torch.arange(batch * heads, device=q.device).view(batch, heads, 1) * max_clusters
        slot = (first_slot + cluster_index).reshape(-1)  # (B*nh*Lq,) row in the padded prototypes
        # In-place index_add_ / index_select: much faster on CPU than out-of-place index_add / [].
        num_slots = batch * heads * max_clusters
        sum_dtype = torch.promote_types(q.dtype, torch.float32)  # half-precision sums drift
        sums = q.new_zeros(num_slots, head_dim, dtype=sum_dtype)
        sums = sums.index_add_(0, slot, q.reshape(-1, head_dim).to(sum_dtype))
        sizes = torch.bincount(slot, minlength=num_slots).clamp(min=1)
        prototypes = (sums / sizes[:, None].to(sum_dtype)).to(q.dtype)
        prototypes = prototypes.view(batch, heads, max_clusters, head_dim)

        blocked = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
        if mask_rows is not None:
            # Each prototype's mask row is its members' (all equal); empty slots allow every key.
            prototype_rows = torch.full((num_slots,), -1, dtype=torch.long, device=q.device)
            prototype_rows = prototype_rows.scatter_reduce(0, slot, mask_rows.reshape(-1), reduce="amax")
            table = torch.cat([distinct_rows, distinct_rows.new_zeros(1, num_keys)])  # row -1: none
            rows = table.index_select(0, prototype_rows.remainder(table.shape[0]))
            rows = rows.view(batch, heads, max_clusters, num_keys)
            blocked = rows if blocked is None else rows | blocked
        mask, empty = (None, None) if blocked is None else additive_mask(blocked, q.dtype)
        out = F.scaled_dot_product_attention(
            prototypes, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=1.0
        )  # (B, nh, K_max, hd); the queries are already scaled
        if empty is not None:
            out = out.masked_fill(empty, 0.0)  # prototypes with no allowed key attend to nothing
        out = out.reshape(-1, head_dim).index_select(0, slot).view(batch, heads, num_queries, head_dim)
        return self.out_proj(self.merge_heads(out))

    @staticmethod
    def _check_mask(name: str, mask: Tensor | None, batch: int, length: int) -> None:
        if mask is None:
            return
        if mask.dtype != torch.bool or tuple(mask.shape) != (batch, length):
            raise ValueError(
                f"{name} must be bool [B, L] = [{batch}, {length}] (True = padding), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )


def build(
    *, embed_dim: int, num_heads: int, dropout: float, q_hashes: int, bucket_width: float, seed: int, **_
) -> AdaptiveClusteringAttention:
    """The "act" variant (see `detr_lab.models.attention.ATTENTION_SPECS`), encoder only, with its
    hash settings (`model.encoder.act`)."""
    return AdaptiveClusteringAttention(
        embed_dim, num_heads, dropout=dropout, q_hashes=q_hashes, bucket_width=bucket_width, seed=seed
    )
