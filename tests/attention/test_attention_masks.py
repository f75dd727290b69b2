"""`attn_mask` in the shared attention contract: plain, ACT and deformable attention.

Polarity everywhere: True = the query may not attend to the key. Expected values come from
independent computations: `nn.MultiheadAttention`, attention over the allowed keys only, and the
grid-sample deformable core on values with the masked keys zeroed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_lab.models.attention.clustering import AdaptiveClusteringAttention
from detr_lab.models.attention.deformable import MultiScaleDeformableAttention
from detr_lab.models.attention.kernels import ms_deform_attn_core, ms_deform_attn_core_reference
from detr_lab.models.attention.plain import PlainAttention
from detr_lab.models.transformer import EncoderLayer

DIM, HEADS = 16, 2
SHAPES = torch.tensor([[3, 4], [2, 2]])  # (H, W) of two levels
LENGTH = 12 + 4


def _multihead_like(plain: PlainAttention) -> nn.MultiheadAttention:
    reference = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
    with torch.no_grad():
        projections = (plain.q_proj, plain.k_proj, plain.v_proj)
        reference.in_proj_weight.copy_(torch.cat([proj.weight for proj in projections]))
        reference.in_proj_bias.copy_(torch.cat([proj.bias for proj in projections]))
        reference.out_proj.load_state_dict(plain.out_proj.state_dict())
    return reference.eval()


def _random_mask(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bool mask that leaves every row at least one allowed key (key 0)."""
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask[..., 0] = False
    return mask


@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("form", ["Lq_Lk", "B_Lq_Lk", "BH_Lq_Lk"])
def test_plain_mask_shapes_match_multihead_attention(impl, form):
    torch.manual_seed(0)
    plain = PlainAttention(DIM, HEADS, impl=impl).eval()
    query, key, value = torch.randn(3, 5, DIM), torch.randn(3, 7, DIM), torch.randn(3, 7, DIM)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[2, 5:] = True
    shape = {"Lq_Lk": (5, 7), "B_Lq_Lk": (3, 5, 7), "BH_Lq_Lk": (3 * HEADS, 5, 7)}[form]
    mask = _random_mask(shape, seed=1)
    # nn.MultiheadAttention takes [Lq, Lk] or [B*heads, Lq, Lk]; expand the per-image form.
    torch_mask = mask.repeat_interleave(HEADS, dim=0) if form == "B_Lq_Lk" else mask
    expected = _multihead_like(plain)(
        query, key, value, attn_mask=torch_mask, key_padding_mask=padding, need_weights=False
    )[0]
    out = plain(query, key, value, attn_mask=mask, key_padding_mask=padding)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_plain_masked_query_sees_only_its_allowed_keys():
    torch.manual_seed(2)
    plain = PlainAttention(DIM, HEADS).eval()
    query, key, value = torch.randn(1, 4, DIM), torch.randn(1, 6, DIM), torch.randn(1, 6, DIM)
    mask = _random_mask((4, 6), seed=3)
    out = plain(query, key, value, attn_mask=mask)
    for row in range(4):
        allowed = ~mask[row]
        alone = plain(query[:, row : row + 1], key[:, allowed], value[:, allowed])
        torch.testing.assert_close(out[:, row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_plain_sdpa_and_math_agree_with_a_mask_values_and_gradients():
    torch.manual_seed(4)
    plain = PlainAttention(DIM, HEADS)
    query = torch.randn(2, 5, DIM, requires_grad=True)
    key = torch.randn(2, 6, DIM, requires_grad=True)
    mask = _random_mask((2 * HEADS, 5, 6), seed=5)
    mask[1, 3] = True  # a fully masked row, head 1 of image 0
    results = []
    for impl in ("sdpa", "math"):
        plain.impl = impl
        query.grad = key.grad = None
        out = plain(query, key, key, attn_mask=mask)
        out.square().sum().backward()
        results.append((out.detach(), query.grad.clone(), key.grad.clone()))
    for fused, step_by_step in zip(*results, strict=True):
        torch.testing.assert_close(fused, step_by_step, atol=1e-5, rtol=1e-5)


def _fully_masked_rows_case():
    """Query 1 of image 0 is fully masked by attn_mask and key padding together."""
    attn_mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    attn_mask[0, 1, :3] = True
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, 3:] = True
    return attn_mask, padding


@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("module_type", [PlainAttention, AdaptiveClusteringAttention])
def test_fully_masked_query_returns_bias_without_nan(module_type, impl):
    torch.manual_seed(6)
    attention = module_type(DIM, HEADS)
    attention.impl = impl
    attn_mask, padding = _fully_masked_rows_case()
    query = torch.randn(2, 3, DIM, requires_grad=True)
    key = torch.randn(2, 5, DIM, requires_grad=True)
    out = attention(query, key, key, attn_mask=attn_mask, key_padding_mask=padding)
    torch.testing.assert_close(out[0, 1], attention.out_proj.bias)
    assert not torch.allclose(out[0, 0], attention.out_proj.bias)
    out.square().sum().backward()
    grads = [query.grad, key.grad] + [p.grad for p in attention.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    # A whole image of padding keys: every query of it attends to nothing.
    all_padding = torch.ones(2, 5, dtype=torch.bool)
    out = attention(query, key, key, key_padding_mask=all_padding)
    torch.testing.assert_close(out, attention.out_proj.bias.expand_as(out))


@pytest.mark.parametrize("module_type", [PlainAttention, AdaptiveClusteringAttention])
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((4, 6), torch.bool), ((2, 3, 6), torch.bool), ((5, 4, 6), torch.bool), ((4, 6), torch.float)],
)
def test_bad_attn_mask_is_a_value_error_naming_it(module_type, shape, dtype):
    attention = module_type(DIM, HEADS)
    query, key = torch.randn(2, 4, DIM), torch.randn(2, 6, DIM)
    bad = torch.zeros(shape, dtype=dtype)
    if dtype == torch.bool and shape == (4, 6):
        bad = torch.zeros(6, 4, dtype=torch.bool)  # transposed
    with pytest.raises(ValueError, match=r"attn_mask .*" + ("float" if dtype != torch.bool else r"shape")):
        attention(query, key, key, attn_mask=bad)


# ------------------------------------------------------------------------------------------- ACT
def test_act_with_singleton_clusters_equals_plain_attention_with_the_mask():
    torch.manual_seed(7)
    plain = PlainAttention(DIM, HEADS).eval()
    act = AdaptiveClusteringAttention(DIM, HEADS, q_hashes=16, bucket_width=1e-4).eval()
    act.load_state_dict(plain.state_dict())
    query, key = torch.randn(2, 6, DIM), torch.randn(2, 7, DIM)
    mask = _random_mask((2 * HEADS, 6, 7), seed=8)
    out = act(query, key, key, attn_mask=mask)
    assert act.last_clusters_per_head.tolist() == [[6] * HEADS] * 2  # every query alone
    torch.testing.assert_close(out, plain(query, key, key, attn_mask=mask), atol=1e-5, rtol=1e-5)


def test_act_clusters_only_queries_with_the_same_mask_row():
    torch.manual_seed(9)
    plain = PlainAttention(DIM, HEADS).eval()
    act = AdaptiveClusteringAttention(DIM, HEADS, q_hashes=4, bucket_width=1e6).eval()
    act.load_state_dict(plain.state_dict())
    query, key, value = torch.randn(1, 6, DIM), torch.randn(1, 5, DIM), torch.randn(1, 5, DIM)
    act(query, key, value)
    assert act.last_clusters_per_head.tolist() == [[1] * HEADS]  # one cluster without a mask
    rows = torch.tensor([[False, False, True, True, False], [True, False, False, False, False]])
    group = torch.tensor([0, 1, 0, 0, 1, 1])
    out = act(query, key, value, attn_mask=rows[group])
    assert act.last_clusters_per_head.tolist() == [[2] * HEADS]
    for g in range(2):
        members = group == g
        # The prototype is the mean projected query = the projection of the mean query.
        mean_query = query[:, members].mean(dim=1, keepdim=True)
        expected = plain(mean_query, key, value, key_padding_mask=rows[g][None])
        torch.testing.assert_close(out[:, members], expected.expand(1, int(members.sum()), DIM))


def test_act_padded_queries_need_the_explicit_query_padding_mask():
    torch.manual_seed(11)
    act = AdaptiveClusteringAttention(DIM, HEADS, bucket_width=1e6, q_hashes=4).eval()
    tokens, value = torch.randn(1, 9, DIM), torch.randn(1, 9, DIM)
    padding = torch.zeros(1, 9, dtype=torch.bool)
    padding[0, 6:] = True
    changed = tokens.clone()
    changed[padding] = 5.0 * torch.randn(3, DIM)
    explicit = act(tokens, tokens, value, key_padding_mask=padding, query_padding_mask=padding)
    explicit_changed = act(changed, tokens, value, key_padding_mask=padding, query_padding_mask=padding)
    torch.testing.assert_close(explicit_changed[~padding], explicit[~padding])
    # Without it (even for query is key) padded queries join the real cluster and move its mean.
    implicit = act(changed, changed, value, key_padding_mask=padding)
    assert act.last_clusters_per_head.tolist() == [[1] * HEADS]
    assert not torch.allclose(implicit[~padding], explicit[~padding])


def test_encoder_layer_passes_its_padding_as_the_query_padding_mask():
    torch.manual_seed(12)
    act = AdaptiveClusteringAttention(DIM, HEADS, bucket_width=1e6, q_hashes=4)
    layer = EncoderLayer(self_attn=act, embed_dim=DIM, ffn_dim=32, dropout=0.0).eval()
    tokens, pos = torch.randn(1, 8, DIM), torch.randn(1, 8, DIM)
    padding = torch.zeros(1, 8, dtype=torch.bool)
    padding[0, 5:] = True
    changed = tokens.clone()
    changed[padding] = 5.0 * torch.randn(3, DIM)
    out = layer(tokens, pos, padding_mask=padding)
    assert act.last_clusters_per_head.tolist() == [[1] * HEADS]  # real queries only
    torch.testing.assert_close(layer(changed, pos, padding_mask=padding)[~padding], out[~padding])


# ------------------------------------------------------------------------------------ deformable
def _deformable_inputs(seed: int, batch: int = 2, queries: int = 5, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    value = torch.randn(batch, LENGTH, HEADS, 3, generator=generator, dtype=dtype)
    locations = torch.rand(batch, queries, HEADS, 2, 2, 2, generator=generator, dtype=dtype) * 1.2 - 0.1
    weights = torch.rand(batch, queries, HEADS, 2, 2, generator=generator, dtype=dtype)
    starts = torch.tensor([0, 12])
    return value, starts, locations, weights


def test_deformable_masked_core_without_masked_keys_equals_the_reference():
    value, starts, locations, weights = _deformable_inputs(13)
    for tensor in (value, locations, weights):
        tensor.requires_grad_(True)
    nothing_masked = torch.zeros(5, LENGTH, dtype=torch.bool)
    results = []
    for mask in (None, nothing_masked):
        out = ms_deform_attn_core(value, SHAPES, starts, locations, weights, impl="reference", attn_mask=mask)
        grads = torch.autograd.grad(out.square().sum(), (value, locations, weights))
        results.append((out, *grads))
    for reference, masked in zip(*results, strict=True):
        torch.testing.assert_close(masked, reference)


def test_deformable_masked_corners_contribute_nothing():
    """Query q of image b reads exactly the map with its masked keys zeroed (per head)."""
    value, starts, locations, weights = _deformable_inputs(14)
    mask = _random_mask((2 * HEADS, 5, LENGTH), seed=15).view(2, HEADS, 5, LENGTH)
    out = ms_deform_attn_core(value, SHAPES, starts, locations, weights, attn_mask=mask.flatten(0, 1))
    assert not torch.allclose(out, ms_deform_attn_core_reference(value, SHAPES, starts, locations, weights))
    for b in range(2):
        for q in range(5):
            zeroed = value[b : b + 1].masked_fill(mask[b, :, q].T[None, :, :, None], 0.0)  # (1, Lv, nh, dh)
            expected = ms_deform_attn_core_reference(
                zeroed, SHAPES, starts, locations[b : b + 1, q : q + 1], weights[b : b + 1, q : q + 1]
            )
            torch.testing.assert_close(out[b : b + 1, q : q + 1], expected)


def test_deformable_masked_core_gradcheck():
    value, starts, locations, weights = _deformable_inputs(16, batch=1, queries=2)
    mask = _random_mask((2, LENGTH), seed=17)
    inputs = tuple(t.requires_grad_(True) for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_core(v, SHAPES, starts, loc, w, attn_mask=mask), inputs
    )


@pytest.mark.parametrize("core_impl", ["reference", "cpu_fast", "auto"])
def test_deformable_module_mask_as_padding_and_fast_cores_fall_back(core_impl):
    torch.manual_seed(18)
    module = MultiScaleDeformableAttention(DIM, 2, HEADS, 2, core_impl=core_impl).double()
    query = torch.randn(2, 5, DIM, dtype=torch.float64)
    value = torch.randn(2, LENGTH, DIM, dtype=torch.float64)
    points = torch.rand(2, 5, 2, 2, dtype=torch.float64)
    padding = torch.zeros(2, LENGTH, dtype=torch.bool)
    padding[1, 8:12] = True
    padding[1, 14:] = True
    kwargs = {"reference_points": points, "spatial_shapes": SHAPES}
    as_padding = module(query, None, value, key_padding_mask=padding, **kwargs)
    as_mask = module(query, None, value, attn_mask=padding[:, None, :].expand(2, 5, LENGTH), **kwargs)
    torch.testing.assert_close(as_mask, as_padding)
    per_query = _random_mask((2, 5, LENGTH), seed=19)
    module.core_impl = "reference"
    expected = module(query, None, value, attn_mask=per_query, **kwargs)
    module.core_impl = core_impl
    torch.testing.assert_close(module(query, None, value, attn_mask=per_query, **kwargs), expected)


def test_deformable_fully_masked_query_returns_bias_without_nan():
    torch.manual_seed(20)
    module = MultiScaleDeformableAttention(DIM, 2, HEADS, 2)
    query = torch.randn(1, 3, DIM, requires_grad=True)
    value = torch.randn(1, LENGTH, DIM, requires_grad=True)
    points = torch.rand(1, 3, 2, 2)
    mask = torch.zeros(3, LENGTH, dtype=torch.bool)
    mask[2] = True
    out = module(query, None, value, attn_mask=mask, reference_points=points, spatial_shapes=SHAPES)
    torch.testing.assert_close(out[0, 2], module.output_proj.bias)
    assert not torch.allclose(out[0, 0], module.output_proj.bias)
    out.square().sum().backward()
    grads = [query.grad, value.grad] + [p.grad for p in module.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match=r"attn_mask has shape \(3, 5\)"):
        module(query, None, value, attn_mask=mask[:, :5], reference_points=points, spatial_shapes=SHAPES)
