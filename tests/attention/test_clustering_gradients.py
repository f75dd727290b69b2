"""Gradients of AdaptiveClusteringAttention: gradcheck with a fixed partition, finite training grads."""

from __future__ import annotations

import torch

from detr_lab.models.attention.clustering import AdaptiveClusteringAttention

EMBED_DIM, HEADS = 8, 2


def _stable_setup() -> tuple[AdaptiveClusteringAttention, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 module and inputs whose queries form several clusters, far from bucket boundaries.

    Tokens sit near three centers; each seed is tried until every projected query lies at least
    1e-3 bucket widths from a boundary, so the eps = 1e-6 perturbations of gradcheck cannot move a
    query into another bucket.
    """
    for seed in range(50):
        generator = torch.Generator().manual_seed(seed)
        act = AdaptiveClusteringAttention(EMBED_DIM, HEADS, q_hashes=3, bucket_width=0.4, seed=seed).double()
        centers = torch.randn(3, EMBED_DIM, generator=generator, dtype=torch.float64)
        assignment = torch.tensor([0, 1, 2, 0, 1, 2, 0])
        noise = 1e-3 * torch.randn(7, EMBED_DIM, generator=generator, dtype=torch.float64)
        query = (centers[assignment] + noise)[None]  # (1, 7, d)
        key = torch.randn(1, 5, EMBED_DIM, generator=generator, dtype=torch.float64)
        value = torch.randn(1, 5, EMBED_DIM, generator=generator, dtype=torch.float64)
        q = act.split_heads(act.q_proj(query)) * (EMBED_DIM // HEADS) ** -0.5
        scaled = (q @ act.hash_directions + act.hash_offsets) / act.bucket_width
        margin = (scaled - scaled.round()).abs().min().item()
        with torch.no_grad():
            act(query, key, value)
        clusters = act.last_clusters_per_head
        if margin > 1e-3 and 1 < clusters.min().item() and clusters.max().item() < 7:
            return act, query, key, value
    raise AssertionError("no seed gave a stable, non-trivial partition")


def test_gradcheck_with_a_fixed_partition():
    act, query, key, value = _stable_setup()
    padding = torch.tensor([[False, False, False, False, True]])
    inputs = tuple(t.clone().requires_grad_(True) for t in (query, key, value))

    def run(q, k, v):
        return act(q, k, v, key_padding_mask=padding)

    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-6)


def test_gradients_reach_each_query_through_its_cluster_mean():
    # One cluster: the output depends on the queries only through their mean, so every query
    # receives the same gradient.
    torch.manual_seed(0)
    act = AdaptiveClusteringAttention(EMBED_DIM, HEADS, q_hashes=4, bucket_width=1e6).double()
    query = torch.randn(1, 6, EMBED_DIM, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(1, 5, EMBED_DIM, dtype=torch.float64)
    (act(query, tokens, tokens) * torch.randn(1, 6, EMBED_DIM, dtype=torch.float64)).sum().backward()
    assert act.last_num_clusters == 1.0
    assert query.grad.abs().max() > 0
    torch.testing.assert_close(query.grad[0], query.grad[0, :1].expand(6, -1))


def test_training_step_gradients_are_finite_with_dropout_and_padding():
    torch.manual_seed(1)
    act = AdaptiveClusteringAttention(32, 4, dropout=0.2, q_hashes=8, bucket_width=0.5).train()
    tokens = torch.randn(2, 30, 32, requires_grad=True)
    padding = torch.zeros(2, 30, dtype=torch.bool)
    padding[1, 18:] = True
    out = act(tokens, tokens, tokens, key_padding_mask=padding, query_padding_mask=padding)
    out.square().mean().backward()
    assert torch.isfinite(tokens.grad).all()
    for name, parameter in act.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
