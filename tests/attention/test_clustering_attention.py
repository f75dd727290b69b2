"""AdaptiveClusteringAttention against exact attention and hand computations."""

from __future__ import annotations

import pytest
import torch

from detr_lab.models.attention.clustering import AdaptiveClusteringAttention
from detr_lab.models.attention.plain import PlainAttention

EMBED_DIM, HEADS = 32, 4


def _act_like(plain: PlainAttention, **kwargs) -> AdaptiveClusteringAttention:
    act = AdaptiveClusteringAttention(plain.embed_dim, plain.num_heads, **kwargs)
    act.load_state_dict(plain.state_dict())  # strict: the parameter sets must be identical
    return act


def _clustered_tokens(batch: int, length: int, num_centers: int, noise: float, seed: int) -> torch.Tensor:
    """Tokens `[batch, length, EMBED_DIM]` near `num_centers` points, like smooth feature maps."""
    generator = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(batch, num_centers, EMBED_DIM, generator=generator)
    assignment = torch.randint(0, num_centers, (batch, length), generator=generator)
    tokens = torch.gather(centers, 1, assignment[..., None].expand(-1, -1, EMBED_DIM))
    return tokens + noise * torch.randn(batch, length, EMBED_DIM, generator=generator)


def test_plain_checkpoint_loads_unchanged_and_hash_draws_are_not_saved():
    torch.manual_seed(0)
    plain = PlainAttention(EMBED_DIM, HEADS)
    act = _act_like(plain)
    assert set(act.state_dict()) == set(plain.state_dict())
    assert {name for name, _ in act.named_buffers()} == {"hash_directions", "hash_offsets"}
    assert set(dict(act.named_parameters())) == set(dict(plain.named_parameters()))


def test_tiny_buckets_make_every_query_its_own_cluster_and_match_exact_attention():
    torch.manual_seed(0)
    plain = PlainAttention(EMBED_DIM, HEADS).eval()
    act = _act_like(plain, bucket_width=1e-6, q_hashes=8).eval()
    query, key = torch.randn(2, 11, EMBED_DIM), torch.randn(2, 13, EMBED_DIM)
    value = torch.randn(2, 13, EMBED_DIM)
    padding = torch.zeros(2, 13, dtype=torch.bool)
    padding[1, 9:] = True
    out = act(query, key, value, key_padding_mask=padding)
    expected = plain(query, key, value, key_padding_mask=padding)
    assert act.last_num_clusters == 11.0
    assert act.last_clusters_per_head.tolist() == [[11] * HEADS] * 2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_huge_buckets_give_one_cluster_attending_with_the_mean_query():
    torch.manual_seed(1)
    act = AdaptiveClusteringAttention(EMBED_DIM, HEADS, bucket_width=1e6, q_hashes=16).double().eval()
    query, key = torch.randn(2, 7, EMBED_DIM).double(), torch.randn(2, 9, EMBED_DIM).double()
    value = torch.randn(2, 9, EMBED_DIM).double()
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, 6:] = True
    out = act(query, key, value, key_padding_mask=padding)
    assert act.last_num_clusters == 1.0

    # By hand: per head, softmax(mean(q) . k / sqrt(hd)) over the real keys, times v.
    head_dim = EMBED_DIM // HEADS
    q = query @ act.q_proj.weight.T + act.q_proj.bias
    k = key @ act.k_proj.weight.T + act.k_proj.bias
    v = value @ act.v_proj.weight.T + act.v_proj.bias
    rows = []
    for b in range(2):
        real = ~padding[b]
        heads = []
        for h in range(HEADS):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            mean_q = q[b, :, cols].mean(dim=0)
            weights = torch.softmax(k[b, real, cols] @ mean_q / head_dim**0.5, dim=0)
            heads.append(weights @ v[b, real, cols])
        rows.append(torch.cat(heads))
    expected = torch.stack(rows) @ act.out_proj.weight.T + act.out_proj.bias  # (B, d)
    torch.testing.assert_close(out, expected[:, None, :].expand_as(out), atol=1e-10, rtol=0)


def test_members_of_a_cluster_share_one_output_and_clustering_approximates():
    torch.manual_seed(2)
    plain = PlainAttention(EMBED_DIM, HEADS).eval()
    act = _act_like(plain, bucket_width=0.5, q_hashes=4).eval()
    tokens = _clustered_tokens(1, 40, num_centers=3, noise=0.05, seed=3)
    out = act(tokens, tokens, tokens)
    assert 1.0 < act.last_num_clusters < 40.0
    q = act.split_heads(act.q_proj(tokens)) * (EMBED_DIM // HEADS) ** -0.5
    cluster_index, _, _ = act.cluster_queries(act.hash_queries(q))  # (1, nh, Lq)
    signature = cluster_index[0].T  # (Lq, nh): a query's cluster in every head
    for i in range(40):
        same = (signature == signature[i]).all(dim=1)
        torch.testing.assert_close(out[0, same], out[0, i].expand(int(same.sum()), -1))
    num_signatures = torch.unique(signature, dim=0).shape[0]
    assert num_signatures < 40
    assert torch.unique(out[0].round(decimals=5), dim=0).shape[0] == num_signatures
    assert not torch.allclose(out, plain(tokens, tokens, tokens), atol=1e-6)


def test_padded_keys_get_no_weight():
    torch.manual_seed(4)
    act = AdaptiveClusteringAttention(EMBED_DIM, HEADS, bucket_width=0.5, q_hashes=8).eval()
    query = _clustered_tokens(2, 10, num_centers=3, noise=0.05, seed=5)
    key, value = torch.randn(2, 12, EMBED_DIM), torch.randn(2, 12, EMBED_DIM)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[0, 8:] = True
    padding[1, 5:] = True
    out = act(query, key, value, key_padding_mask=padding)
    assert 1.0 < act.last_num_clusters < 10.0
    changed_key, changed_value = key.clone(), value.clone()
    changed_key[padding] = 100.0 * torch.randn(int(padding.sum()), EMBED_DIM)
    changed_value[padding] = 100.0 * torch.randn(int(padding.sum()), EMBED_DIM)
    torch.testing.assert_close(act(query, changed_key, changed_value, key_padding_mask=padding), out)
    # The same change without the mask does move the output.
    assert not torch.allclose(act(query, changed_key, changed_value), act(query, key, value))


def test_padded_queries_stay_out_of_real_clusters():
    torch.manual_seed(6)
    act = AdaptiveClusteringAttention(EMBED_DIM, HEADS, bucket_width=1e6, q_hashes=4).eval()
    tokens = torch.randn(1, 9, EMBED_DIM)
    padding = torch.zeros(1, 9, dtype=torch.bool)
    padding[0, 6:] = True
    changed = tokens.clone()
    changed[padding] = torch.randn(3, EMBED_DIM)
    kwargs = {"key_padding_mask": padding, "query_padding_mask": padding}
    out, out_changed = act(tokens, tokens, tokens, **kwargs), act(changed, tokens, tokens, **kwargs)
    assert act.last_clusters_per_head.tolist() == [[1] * HEADS]  # real clusters only
    torch.testing.assert_close(out_changed[~padding], out[~padding])
    # Without query_padding_mask the padded queries join the single cluster and move its mean.
    unmasked = act(changed, tokens, tokens, key_padding_mask=padding)
    assert not torch.allclose(unmasked[~padding], out[~padding])


def test_outputs_do_not_depend_on_other_batch_elements():
    torch.manual_seed(7)
    act = AdaptiveClusteringAttention(EMBED_DIM, HEADS, bucket_width=0.5, q_hashes=8).eval()
    tokens = _clustered_tokens(3, 12, num_centers=4, noise=0.05, seed=8)
    together = act(tokens, tokens, tokens)
    alone = torch.cat([act(tokens[i : i + 1], tokens[i : i + 1], tokens[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="q_hashes"):
        AdaptiveClusteringAttention(EMBED_DIM, HEADS, q_hashes=0)
    with pytest.raises(ValueError, match="bucket_width"):
        AdaptiveClusteringAttention(EMBED_DIM, HEADS, bucket_width=0.0)
    act = AdaptiveClusteringAttention(EMBED_DIM, HEADS)
    tokens = torch.randn(2, 5, EMBED_DIM)
    with pytest.raises(ValueError, match="key_padding_mask"):
        act(tokens, tokens, tokens, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="query_padding_mask"):
        act(tokens, tokens, tokens, query_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="bucket_width"):
        act(torch.full_like(tokens, float("nan")), tokens, tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(9)
    act = AdaptiveClusteringAttention(EMBED_DIM, HEADS, bucket_width=0.5, q_hashes=8).double().eval()
    tokens = _clustered_tokens(2, 30, num_centers=4, noise=0.05, seed=10).double()
    padding = torch.zeros(2, 30, dtype=torch.bool)
    padding[1, 20:] = True
    out_cpu = act(tokens, tokens, tokens, key_padding_mask=padding)
    clusters_cpu = act.last_clusters_per_head.clone()
    act = act.cuda()
    out_cuda = act(tokens.cuda(), tokens.cuda(), tokens.cuda(), key_padding_mask=padding.cuda())
    assert torch.equal(act.last_clusters_per_head.cpu(), clusters_cpu)
    torch.testing.assert_close(out_cuda.cpu(), out_cpu)
