"""The gather-based deformable core (the ONNX export path) against the grid_sample reference."""

from __future__ import annotations

import pytest
import torch

from detr_lab.models.attention.kernels import ms_deform_attn_core_gather, ms_deform_attn_core_reference


def level_index(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))


def random_inputs(shapes, batch=2, queries=9, heads=2, head_dim=4, points=3, dtype=torch.float32, seed=0):
    """Locations spread past the map edges (-0.3 .. 1.3) so that zero padding is exercised."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes, starts = level_index(shapes)
    length = int(spatial_shapes.prod(1).sum())
    value = torch.randn(batch, length, heads, head_dim, generator=generator, dtype=dtype)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator, dtype=dtype)
    locations = locations * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator, dtype=dtype)
    return value, spatial_shapes, starts, locations, weights


FORMS = ["pairs", "direct"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shapes", [[(5, 7)], [(8, 6), (4, 3), (2, 2), (1, 1)], [(3, 11), (13, 2)]])
def test_gather_matches_reference_float32(shapes, form):
    inputs = random_inputs(shapes)
    expected = ms_deform_attn_core_reference(*inputs)
    got = ms_deform_attn_core_gather(*inputs, form=form)
    assert got.shape == expected.shape == (2, 9, 8)
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_gather_matches_reference_float64_and_gradients(form):
    inputs = random_inputs([(4, 5), (2, 3)], dtype=torch.float64, seed=1)
    value, shapes, starts, locations, weights = (t.clone() for t in inputs)
    for tensor in (value, locations, weights):
        tensor.requires_grad_(True)
    expected = ms_deform_attn_core_reference(value, shapes, starts, locations, weights)
    got = ms_deform_attn_core_gather(value, shapes, starts, locations, weights, form=form)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(got.square().sum(), (value, locations, weights))
    expected_grads = torch.autograd.grad(expected.square().sum(), (value, locations, weights))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)


def test_form_follows_the_samples_per_value_position_and_the_map_size():
    from detr_lab.models.attention.kernels.gather import choose_form

    # RT-DETR's decoder at 640 x 640: 300 queries x 3 levels x 4 points over 8400 positions
    assert choose_form(8400, torch.Size((1, 300, 8, 3, 4, 2))) == "direct"
    # encoder self-attention: one query per position, 4 levels x 4 points each
    assert choose_form(8400, torch.Size((1, 8400, 8, 4, 4, 2))) == "pairs"
    # at 8400 positions the limit is 2 samples per position: 16800 samples
    assert choose_form(8400, torch.Size((1, 16800, 8, 1, 1, 2))) == "direct"
    assert choose_form(8400, torch.Size((1, 16801, 8, 1, 1, 2))) == "pairs"
    # D-FINE-N's decoder at 640 x 640: 300 queries x 2 levels x 6 points over 2000 positions (1.8 per
    # position, over the limit of 2 * 2000 / 8400 = 0.48 there)
    assert choose_form(2000, torch.Size((1, 300, 8, 2, 6, 2))) == "pairs"
    assert choose_form(2000, torch.Size((1, 950, 8, 1, 1, 2))) == "direct"
    assert choose_form(2000, torch.Size((1, 953, 8, 1, 1, 2))) == "pairs"


def test_half_precision_runs_in_float32_in_both_forms():
    inputs = random_inputs([(4, 5), (2, 3)])
    value, shapes, starts, locations, weights = inputs
    expected = ms_deform_attn_core_reference(*inputs)
    for form in FORMS:
        got = ms_deform_attn_core_gather(value.bfloat16(), shapes, starts, locations, weights, form=form)
        assert got.dtype == torch.bfloat16
        assert (got.float() - expected).abs().max() <= 0.1


def test_unknown_form_is_refused():
    with pytest.raises(ValueError, match="form must be"):
        ms_deform_attn_core_gather(*random_inputs([(3, 4)]), form="quads")


@pytest.mark.parametrize("form", FORMS)
def test_pixel_centres_and_outside_points(form):
    # one level 2 x 3, one head of width 1: value = flat pixel index + 1
    shapes, starts = level_index([(2, 3)])
    value = torch.arange(1.0, 7.0).view(1, 6, 1, 1)
    # pixel (row 1, col 2) centre; halfway between (0, 0) and (0, 1); fully outside; the top-left corner
    points = torch.tensor([[2.5 / 3, 1.5 / 2], [1.0 / 3, 0.5 / 2], [1.5, 0.5], [0.0, 0.0]])
    locations = points.view(1, 4, 1, 1, 1, 2)
    weights = torch.ones(1, 4, 1, 1, 1)
    got = ms_deform_attn_core_gather(value, shapes, starts, locations, weights, form=form).flatten()
    # the corner reads a quarter of pixel (0, 0): its three other neighbours are outside (zeros)
    torch.testing.assert_close(got, torch.tensor([6.0, 1.5, 0.0, 0.25]))


def test_gather_core_selected_by_name():
    from detr_lab.models.attention.kernels import ms_deform_attn_core

    inputs = random_inputs([(3, 4)])
    torch.testing.assert_close(
        ms_deform_attn_core(*inputs, impl="gather"), ms_deform_attn_core_gather(*inputs), rtol=0, atol=0
    )


class Core(torch.nn.Module):
    def __init__(self, form=None):
        super().__init__()
        self.form = form

    def forward(self, value, spatial_shapes, level_start_index, locations, weights):
        return ms_deform_attn_core_gather(
            value, spatial_shapes, level_start_index, locations, weights, form=self.form
        )


@pytest.mark.parametrize("form", FORMS)
def test_exported_gather_core_matches_reference_under_onnxruntime(tmp_path, form):
    ort = pytest.importorskip("onnxruntime")
    traced_inputs = random_inputs([(6, 5), (3, 3)], seed=2)
    path = tmp_path / "core.onnx"
    names = ["value", "spatial_shapes", "level_start_index", "locations", "weights"]
    torch.onnx.export(
        Core(form), traced_inputs, str(path), input_names=names, output_names=["output"], opset_version=17,
        dynamic_axes={"value": {0: "b", 1: "lv"}, "locations": {0: "b", 1: "q"}, "weights": {0: "b", 1: "q"},
                      "spatial_shapes": {0: "levels"}, "level_start_index": {0: "levels"}},
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # other level sizes, batch and query count than traced: the graph reads them from its inputs
    inputs = random_inputs([(9, 4), (2, 7)], batch=3, queries=11, seed=3)
    got = session.run(None, {name: tensor.numpy() for name, tensor in zip(names, inputs, strict=True)})[0]
    expected = ms_deform_attn_core_reference(*inputs)
    assert got.shape == tuple(expected.shape)
    assert abs(torch.from_numpy(got) - expected).max() <= 1e-5
    # only standard ONNX operators (default domain)
    onnx = pytest.importorskip("onnx")
    assert {node.domain for node in onnx.load(str(path)).graph.node} <= {""}


def test_core_benchmark_times_both_onnx_forms():
    pytest.importorskip("onnxruntime")
    from detr_lab.export.core_benchmark import benchmark_export_cores

    result = benchmark_export_cores(shapes=((6, 8), (3, 4)), heads=2, head_dim=4, points=2, runs=2)
    for name in ("gather", "grid_sample"):
        assert len(result[name]["values_s"]) == 2 and result[name]["median_s"] > 0
        assert result[name]["max_abs_difference"] <= 1e-5
