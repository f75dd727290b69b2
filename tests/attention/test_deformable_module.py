"""MultiScaleDeformableAttention: official parameters and init, reference points, masks, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detr_lab.models.attention.deformable import MultiScaleDeformableAttention, set_deformable_core

SHAPES = torch.tensor([[4, 4], [2, 3]])  # (H, W) per level
LENGTH = 16 + 6


def identity_projections(module: MultiScaleDeformableAttention) -> None:
    """value_proj / output_proj = identity, so the output is the sampled value itself."""
    with torch.no_grad():
        for proj in (module.value_proj, module.output_proj):
            proj.weight.copy_(torch.eye(module.embed_dim))
            proj.bias.zero_()


def test_official_parameter_names_and_shapes():
    module = MultiScaleDeformableAttention(256, 4, 8, 4)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == {
        "sampling_offsets.weight": (256, 256),
        "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256),
        "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256),
        "value_proj.bias": (256,),
        "output_proj.weight": (256, 256),
        "output_proj.bias": (256,),
    }


def test_official_initialization():
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(64, 2, 8, 3)
    assert torch.all(module.sampling_offsets.weight == 0)
    # Head h looks along angle 2*pi*h/8, scaled so that max(|x|, |y|) = 1; point p sits at p + 1.
    directions = torch.tensor(
        [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)], dtype=torch.float
    )
    bias = module.sampling_offsets.bias.view(8, 2, 3, 2)
    for level in range(2):
        for point in range(3):
            torch.testing.assert_close(bias[:, level, point], directions * (point + 1), atol=1e-5, rtol=0)
    assert torch.all(module.attention_weights.weight == 0) and torch.all(module.attention_weights.bias == 0)
    bound = math.sqrt(6 / (64 + 64))
    for proj in (module.value_proj, module.output_proj):
        assert torch.all(proj.bias == 0)
        assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 4


def hand_module(offsets: torch.Tensor, num_points: int) -> MultiScaleDeformableAttention:
    """1 head, 2 levels, d=2, identity projections, fixed offsets (from the bias), uniform weights."""
    module = MultiScaleDeformableAttention(2, 2, 1, num_points)
    identity_projections(module)
    with torch.no_grad():
        module.sampling_offsets.bias.copy_(offsets.flatten())
    return module


def level_values() -> torch.Tensor:
    """`[1, LENGTH, 2]`: channel 0 = position index, channel 1 = 100 + position index."""
    index = torch.arange(LENGTH, dtype=torch.float)
    return torch.stack((index, 100 + index), dim=-1)[None]


def test_point_reference_offsets_are_in_pixels_of_each_level():
    # Reference at the centre of pixel (row 1, col 1) of level 0 and of pixel (0, 1) of level 1.
    reference = torch.tensor([[1.5 / 4, 1.5 / 4], [1.5 / 3, 0.5 / 2]]).view(1, 1, 2, 2)
    offsets = torch.zeros(1, 2, 1, 2)  # (heads, levels, points, xy)
    offsets[0, 0, 0] = torch.tensor([2.0, 1.0])  # level 0: -> pixel (2, 3), index 2*4+3 = 11
    offsets[0, 1, 0] = torch.tensor([1.0, 1.0])  # level 1: -> pixel (1, 2), index 16 + 1*3+2 = 21
    module = hand_module(offsets, num_points=1)
    value = level_values()
    out = module(torch.zeros(1, 1, 2), None, value, reference_points=reference, spatial_shapes=SHAPES)
    # Uniform attention over the two sampled pixels.
    expected = (value[0, 11] + value[0, 21]) / 2
    torch.testing.assert_close(out[0, 0], expected, atol=1e-5, rtol=0)


def test_box_reference_offsets_scale_with_box_size_and_points():
    # Box (cx, cy, w, h) per level; location = centre + offset / points * size / 2.
    boxes = torch.tensor([[0.375, 0.375, 0.5, 0.25], [0.5, 0.25, 2 / 3, 0.5]]).view(1, 1, 2, 4)
    offsets = torch.zeros(1, 2, 2, 2)
    # level 0: x = 0.375 + 2/2 * 0.5/2 = 0.625 (col 2), y = 0.375 + 4/2 * 0.25/2 = 0.625 (row 2): index 10
    offsets[0, 0, 0] = torch.tensor([2.0, 4.0])
    # level 0, point 1: x = 0.375 - 2/2 * 0.25 = 0.125 (col 0), y = 0.375 (row 1): index 4
    offsets[0, 0, 1] = torch.tensor([-2.0, 0.0])
    # level 1 (H=2, W=3): x = 0.5 + 2/2 * (2/3)/2 = 5/6 (col 2), y = 0.25 + 4/2 * 0.5/2 = 0.75 (row 1)
    offsets[0, 1, 0] = torch.tensor([2.0, 4.0])
    offsets[0, 1, 1] = torch.tensor([-2.0, 0.0])  # x = 0.5 - 1/3 = 1/6 (col 0), y = 0.25 (row 0)
    module = hand_module(offsets, num_points=2)
    value = level_values()
    out = module(torch.zeros(1, 1, 2), None, value, reference_points=boxes, spatial_shapes=SHAPES)
    expected = (value[0, 10] + value[0, 4] + value[0, 16 + 1 * 3 + 2] + value[0, 16 + 0]) / 4
    torch.testing.assert_close(out[0, 0], expected, atol=1e-5, rtol=0)


def test_padded_positions_have_no_influence():
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(16, 2, 2, 3)
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(std=0.5)
        module.attention_weights.weight.normal_()
    query = torch.randn(2, 5, 16)
    value = torch.randn(2, LENGTH, 16)
    reference = torch.rand(2, 5, 2, 2)
    padding_mask = torch.zeros(2, LENGTH, dtype=torch.bool)
    padding_mask[0, 2:4] = True
    padding_mask[1, 16:] = True
    changed = value.clone()
    changed[padding_mask] = 1000.0
    out = module(
        query, None, value, key_padding_mask=padding_mask, reference_points=reference, spatial_shapes=SHAPES
    )
    out_changed = module(
        query, None, changed, key_padding_mask=padding_mask, reference_points=reference, spatial_shapes=SHAPES
    )
    torch.testing.assert_close(out, out_changed)
    unmasked = module(query, None, changed, reference_points=reference, spatial_shapes=SHAPES)
    assert (unmasked - out).abs().max() > 1.0  # the mask is what removed them


@pytest.mark.parametrize("impl", ["reference", "cpu_fast"])
def test_module_gradcheck_with_padding_and_points_outside(impl):
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(4, 2, 2, 2, core_impl=impl).double()
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(std=1.0)
        module.sampling_offsets.bias.mul_(3.0)  # some points leave the map
        module.attention_weights.weight.normal_()
    query = torch.randn(1, 2, 4, dtype=torch.double, requires_grad=True)
    value = torch.randn(1, LENGTH, 4, dtype=torch.double, requires_grad=True)
    reference = (torch.rand(1, 2, 2, 2, dtype=torch.double) * 1.2 - 0.1).requires_grad_()
    padding_mask = torch.zeros(1, LENGTH, dtype=torch.bool)
    padding_mask[0, 10:18] = True

    def run(query, value, reference):
        return module(
            query, None, value, key_padding_mask=padding_mask, reference_points=reference,
            spatial_shapes=SHAPES,
        )

    with torch.no_grad():
        offsets = module.sampling_offsets(query).view(1, 2, 2, 2, 2, 2)
        locations = module.sampling_locations(offsets, reference, SHAPES)
    assert ((locations < 0) | (locations > 1)).any()
    assert torch.autograd.gradcheck(run, (query, value, reference), eps=1e-6, atol=1e-5)
    # The padded positions get no gradient.
    value.grad = None
    run(query, value, reference).sum().backward()
    assert torch.all(value.grad[padding_mask] == 0) and value.grad[~padding_mask].abs().sum() > 0


def test_core_impls_agree_through_the_module():
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(32, 2, 4, 2)
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(std=0.3)
    query, value = torch.randn(2, 6, 32), torch.randn(2, LENGTH, 32)
    reference = torch.rand(2, 6, 2, 4)
    outputs = []
    for impl in ("reference", "cpu_fast"):
        module.core_impl = impl
        outputs.append(module(query, None, value, reference_points=reference, spatial_shapes=SHAPES))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)


def test_set_deformable_core_switches_every_module():
    model = nn.Sequential(
        MultiScaleDeformableAttention(8, 1, 2, 1), nn.Linear(2, 2), MultiScaleDeformableAttention(8, 1, 2, 1)
    )
    assert set_deformable_core(model, "reference") == 2
    assert all(m.core_impl == "reference" for m in (model[0], model[2]))
    with pytest.raises(ValueError, match="impl must be one of"):
        set_deformable_core(model, "cuda")


def test_bad_inputs_are_named():
    module = MultiScaleDeformableAttention(8, 2, 2, 1)
    query, value = torch.zeros(1, 3, 8), torch.zeros(1, LENGTH, 8)
    with pytest.raises(ValueError, match=r"end in 2 \(x, y\) or 4 .* got shape \(1, 3, 2, 3\)"):
        module(query, None, value, reference_points=torch.zeros(1, 3, 2, 3), spatial_shapes=SHAPES)
    with pytest.raises(ValueError, match=r"cover 22 positions, but value has Lv=21"):
        module(query, None, value[:, :21], reference_points=torch.zeros(1, 3, 2, 2), spatial_shapes=SHAPES)
    with pytest.raises(ValueError, match=r"spatial_shapes must be \[2, 2\]"):
        module(query, None, value, reference_points=torch.zeros(1, 3, 2, 2), spatial_shapes=SHAPES[:1])
    with pytest.raises(ValueError, match="needs reference_points"):
        module(query, None, value, spatial_shapes=SHAPES)
    with pytest.raises(ValueError, match="reference_points must be"):
        module(query, None, value, reference_points=torch.zeros(1, 3, 1, 2), spatial_shapes=SHAPES)
    with pytest.raises(ValueError, match="core_impl must be one of"):
        MultiScaleDeformableAttention(8, 2, 2, 1, core_impl="gpu")
