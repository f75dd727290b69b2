"""E2LSH draws, hashing and exact grouping of hash vectors for AdaptiveClusteringAttention."""

from __future__ import annotations

import math

import torch

from detr_lab.models.attention import clustering
from detr_lab.models.attention.clustering import (
    AdaptiveClusteringAttention,
    draw_hash_functions,
    group_equal_rows,
)


def _partition(labels: list) -> set[frozenset[int]]:
    """The partition of positions 0..n-1 induced by equal labels."""
    blocks: dict = {}
    for position, label in enumerate(labels):
        blocks.setdefault(label, set()).add(position)
    return {frozenset(block) for block in blocks.values()}


def _smooth_queries(batch: int, heads: int, length: int, head_dim: int, seed: int) -> torch.Tensor:
    """Float64 queries `[batch, heads, length, head_dim]` drifting slowly along the sequence."""
    generator = torch.Generator().manual_seed(seed)
    steps = 0.05 * torch.randn(batch, heads, length, head_dim, generator=generator, dtype=torch.float64)
    return steps.cumsum(dim=2)


def test_hash_draws_are_deterministic_and_longer_draws_extend_shorter_ones():
    short_directions, short_offsets = draw_hash_functions(8, 5, 2.0, seed=3)
    long_directions, long_offsets = draw_hash_functions(8, 64, 2.0, seed=3)
    assert torch.equal(long_directions[:, :5], short_directions)
    assert torch.equal(long_offsets[:5], short_offsets)
    again = draw_hash_functions(8, 64, 2.0, seed=3)
    assert torch.equal(again[0], long_directions) and torch.equal(again[1], long_offsets)
    other = draw_hash_functions(8, 64, 2.0, seed=4)
    assert not torch.equal(other[0], long_directions)
    assert long_directions.shape == (8, 64) and long_offsets.shape == (64,)


def test_hash_draws_follow_e2lsh_distributions():
    directions, offsets = draw_hash_functions(32, 512, 3.0, seed=0)
    assert abs(directions.mean().item()) < 0.02  # 16384 N(0, 1) draws: std of the mean ~0.008
    assert abs(directions.std().item() - 1.0) < 0.02
    assert offsets.min().item() >= 0.0 and offsets.max().item() < 3.0
    assert abs(offsets.mean().item() - 1.5) < 0.15  # U(0, 3): std of the mean ~0.04


def test_hashes_follow_the_e2lsh_formula():
    act = AdaptiveClusteringAttention(16, 2, q_hashes=12, bucket_width=0.3, seed=5)
    q = _smooth_queries(2, 2, 20, 8, seed=0)
    hashes = act.hash_queries(q)
    a, b = act.hash_directions.double(), act.hash_offsets.double()
    for index in [(0, 0, 0), (0, 1, 7), (1, 0, 19), (1, 1, 11)]:
        expected = [math.floor((float(q[index] @ a[:, i]) + float(b[i])) / 0.3) for i in range(12)]
        assert hashes[index].tolist() == expected


def test_cluster_count_equals_distinct_hash_vectors():
    act = AdaptiveClusteringAttention(16, 2, q_hashes=6, bucket_width=0.25, seed=1)
    q = _smooth_queries(2, 2, 50, 8, seed=2)
    hashes = act.hash_queries(q)
    cluster_index, num_clusters, num_real = act.cluster_queries(hashes)
    for b in range(2):
        for h in range(2):
            vectors = [tuple(row) for row in hashes[b, h].tolist()]
            assert num_clusters[b, h].item() == len(set(vectors)) == num_real[b, h].item()
            assert _partition(cluster_index[b, h].tolist()) == _partition(vectors)
            assert sorted(set(cluster_index[b, h].tolist())) == list(range(len(set(vectors))))
    assert 2 < num_clusters.min().item() and num_clusters.max().item() < 50  # non-trivial case


def test_more_rounds_refine_the_partition():
    q = _smooth_queries(1, 2, 120, 8, seed=4)
    coarse_labels, previous_counts = None, None
    for rounds in [1, 2, 4, 8, 16, 32, 64]:
        act = AdaptiveClusteringAttention(16, 2, q_hashes=rounds, bucket_width=0.5, seed=7)
        cluster_index, num_clusters, _ = act.cluster_queries(act.hash_queries(q))
        if coarse_labels is not None:
            assert (num_clusters >= previous_counts).all()
            for h in range(2):
                # Each fine cluster lies inside one coarse cluster.
                pairs = set(zip(cluster_index[0, h].tolist(), coarse_labels[0, h].tolist(), strict=True))
                assert len(pairs) == num_clusters[0, h].item()
        coarse_labels, previous_counts = cluster_index, num_clusters
    assert previous_counts.max().item() > 8  # the refinement was exercised, not one cluster throughout


def test_sixty_four_rounds_with_huge_bucket_indices_neither_overflow_nor_alias():
    act = AdaptiveClusteringAttention(16, 2, q_hashes=64, bucket_width=1e-12, seed=2)
    q = _smooth_queries(1, 2, 30, 8, seed=6)
    q[0, 0, 10:20] = q[0, 0, 3]  # ten exact duplicates in head 0
    hashes = act.hash_queries(q)
    assert hashes.abs().max().item() > 2**32  # far beyond what a few bits per round can hold
    cluster_index, num_clusters, _ = act.cluster_queries(hashes)
    for h in range(2):
        vectors = [tuple(row) for row in hashes[0, h].tolist()]
        assert num_clusters[0, h].item() == len(set(vectors))
        assert _partition(cluster_index[0, h].tolist()) == _partition(vectors)
    assert num_clusters.tolist() == [[20, 30]]


def test_grouping_is_exact_for_rows_that_packing_would_alias():
    # Packing round i into bits 2i.. of one integer maps [4, 0] and [0, 1] to the same code; huge
    # values overflow it. Both must stay distinct here, and equal rows must meet.
    rows = torch.tensor(
        [[4, 0], [0, 1], [4, 0], [2**61, -(2**61)], [-(2**61), 2**61], [2**61, -(2**61)], [0, 1], [1, 0]]
    )
    group_ids = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    labels = group_equal_rows(group_ids, rows).tolist()
    expected = [(g, tuple(r)) for g, r in zip(group_ids.tolist(), rows.tolist(), strict=True)]
    assert _partition(labels) == _partition(expected)
    assert labels[6] != labels[1]  # same row, different group
    assert max(labels[:6]) < min(labels[6:])  # group-major numbering


def test_fingerprint_collisions_fall_back_to_exact_grouping(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(-50, 50, (400, 5), generator=generator)
    rows[200:300] = rows[:100]  # guaranteed repeats
    group_ids = torch.randint(0, 3, (400,), generator=generator)
    expected = _partition([(g, tuple(r)) for g, r in zip(group_ids.tolist(), rows.tolist(), strict=True)])
    exact_calls = []
    exact = clustering._exact_groups
    monkeypatch.setattr(clustering, "_exact_groups", lambda *args: exact_calls.append(1) or exact(*args))

    fast = group_equal_rows(group_ids, rows)
    assert not exact_calls  # 62-bit fingerprints: no collision among ~300 distinct rows
    assert _partition(fast.tolist()) == expected
    assert torch.equal(fast.unique(), torch.arange(len(expected)))

    colliding = group_equal_rows(group_ids, rows, fingerprint_bits=2)  # 4 fingerprints per group
    assert exact_calls == [1]
    assert _partition(colliding.tolist()) == expected
