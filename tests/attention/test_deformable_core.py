"""The multi-scale deformable attention core: sampling semantics, gradients, fast CPU path vs reference."""

from __future__ import annotations

import pytest
import torch

from detr_lab.models.attention.kernels import (
    ms_deform_attn_core,
    resolve_core_impl,
    triton_available,
)

CPU_IMPLS = ("reference", "cpu_fast")


def make_level_index(shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    return spatial_shapes, level_start_index


def random_inputs(shapes, batch, queries, heads, head_dim, points, dtype=torch.float64, seed=0, spread=0.4):
    """Random core inputs; `spread` pushes locations past the [0, 1] edges (zero-padding region)."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = make_level_index(shapes)
    length = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    levels = len(shapes)
    value = torch.randn(batch, length, heads, head_dim, generator=generator, dtype=dtype)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=dtype)
    locations = locations * (1 + 2 * spread) - spread
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=dtype)
    return value, spatial_shapes, level_start_index, locations, weights


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_pixel_centre_returns_that_pixel(impl):
    torch.manual_seed(0)
    shapes = [(3, 5), (2, 3)]
    spatial_shapes, level_start_index = make_level_index(shapes)
    value = torch.randn(1, 15 + 6, 2, 4)
    # One query per pixel of level 1; the level-0 point gets weight 0.
    height, width = shapes[1]
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centres = torch.stack(((cols.flatten() + 0.5) / width, (rows.flatten() + 0.5) / height), dim=-1)  # (6, 2)
    locations = torch.zeros(1, 6, 2, 2, 1, 2)
    locations[0, :, :, 1, 0] = centres[:, None, :]
    locations[0, :, :, 0, 0] = 0.5
    weights = torch.zeros(1, 6, 2, 2, 1)
    weights[..., 1, 0] = 1.0
    out = ms_deform_attn_core(value, spatial_shapes, level_start_index, locations, weights, impl=impl)
    expected = value[0, 15:].reshape(6, 8)  # pixel i*W+j of level 1, heads concatenated
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_zero_padding_and_half_pixel_edges(impl):
    """A 1 x 2 map [a, b]: the left edge (x=0) is halfway between pixel a and the zero padding."""
    spatial_shapes, level_start_index = make_level_index([(1, 2)])
    value = torch.tensor([3.0, 5.0]).view(1, 2, 1, 1)
    xs = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, -0.25, 1.25, 0.25])
    ys = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0])
    locations = torch.stack((xs, ys), dim=-1).view(1, 8, 1, 1, 1, 2)
    weights = torch.ones(1, 8, 1, 1, 1)
    out = ms_deform_attn_core(value, spatial_shapes, level_start_index, locations, weights, impl=impl)
    # x=0: pixel coordinate -0.5 -> 0.5*a; 0.25: centre of a; 0.5: midway; 1.0: 0.5*b; outside: 0;
    # y=0 on a 1-pixel-high map: halfway to the padding above.
    expected = torch.tensor([1.5, 3.0, 4.0, 5.0, 2.5, 0.0, 0.0, 1.5]).view(1, 8, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_gradcheck_float64(impl):
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(
        [(3, 4), (2, 2), (1, 3)], batch=2, queries=3, heads=2, head_dim=3, points=2
    )
    assert ((locations < 0) | (locations > 1)).any(), "some points should fall outside the map"
    inputs = tuple(t.clone().requires_grad_() for t in (value, locations, weights))

    def core(value, locations, weights):
        return ms_deform_attn_core(value, spatial_shapes, level_start_index, locations, weights, impl=impl)

    assert torch.autograd.gradcheck(core, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "shapes, batch, queries, heads, head_dim, points, seed",
    [
        ([(6, 7), (3, 4), (2, 2), (1, 1)], 2, 9, 4, 8, 3, 0),
        ([(5, 3), (1, 6)], 3, 4, 1, 5, 1, 1),
        ([(10, 13)], 1, 17, 2, 16, 4, 2),
    ],
)
def test_cpu_fast_matches_reference(shapes, batch, queries, heads, head_dim, points, seed):
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(
        shapes, batch, queries, heads, head_dim, points, dtype=torch.float32, seed=seed, spread=0.5
    )
    locations[0, 0, 0, 0, 0] = torch.tensor([-30.0, 0.5])  # far outside the map
    locations[-1, -1, -1, -1, -1] = torch.tensor([0.5, 1e6])
    grad_output = torch.randn(batch, queries, heads * head_dim, generator=torch.Generator().manual_seed(seed))
    results = {}
    for impl in CPU_IMPLS:
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = ms_deform_attn_core(
            inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2], impl=impl
        )
        out.backward(grad_output)
        results[impl] = (out.detach(), *(t.grad for t in inputs))
    names = ("output", "grad value", "grad locations", "grad weights")
    for name, fast, ref in zip(names, results["cpu_fast"], results["reference"], strict=True):
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("points_per_chunk", [1, 37])
def test_cpu_fast_chunking_matches_reference(monkeypatch, points_per_chunk):
    """Chunks of a few bags, boundaries inside queries and across batch items."""
    from detr_lab.models.attention.kernels import cpu_fast

    monkeypatch.setattr(cpu_fast, "_POINTS_PER_CHUNK", points_per_chunk)
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(
        [(4, 5), (2, 3)], batch=2, queries=5, heads=3, head_dim=2, points=2, dtype=torch.float64
    )
    results = []
    for impl in CPU_IMPLS:
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = ms_deform_attn_core(
            inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2], impl=impl
        )
        out.backward(torch.ones_like(out))
        results.append((out.detach(), *(t.grad for t in inputs)))
    for fast, ref in zip(*results, strict=True):
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)


def test_cpu_fast_accepts_half_precision_values():
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(
        [(4, 4), (2, 2)], batch=1, queries=5, heads=2, head_dim=4, points=2, dtype=torch.float32
    )
    full = ms_deform_attn_core(value, spatial_shapes, level_start_index, locations, weights, impl="reference")
    for dtype in (torch.float16, torch.bfloat16):
        half_value = value.to(dtype)
        out = ms_deform_attn_core(
            half_value, spatial_shapes, level_start_index, locations, weights, impl="cpu_fast"
        )
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), full, rtol=0, atol=0.05)


def test_auto_dispatch():
    assert resolve_core_impl("auto", torch.device("cpu")) == "cpu_fast"
    assert resolve_core_impl("auto", torch.device("mps")) == "reference"
    expected_cuda = "triton" if triton_available() else "reference"
    assert resolve_core_impl("auto", torch.device("cuda")) == expected_cuda
    assert resolve_core_impl("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="unknown deformable attention core impl 'fast'"):
        resolve_core_impl("fast", torch.device("cpu"))


def test_triton_on_cpu_tensors_is_refused_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(
        [(2, 2)], batch=1, queries=1, heads=1, head_dim=2, points=1
    )
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ms_deform_attn_core(value, spatial_shapes, level_start_index, locations, weights, impl="triton")


def test_inconsistent_inputs_are_named():
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(
        [(2, 3), (1, 2)], batch=1, queries=2, heads=2, head_dim=2, points=1
    )
    with pytest.raises(ValueError, match=r"spatial_shapes \[\[2, 3\], \[1, 2\]\] cover 8 positions.*Lv=7"):
        ms_deform_attn_core(value[:, :7], spatial_shapes, level_start_index, locations, weights)
    with pytest.raises(ValueError, match="attention_weights must be"):
        ms_deform_attn_core(value, spatial_shapes, level_start_index, locations, weights[..., :1, :])
    with pytest.raises(ValueError, match="sampling_locations must be"):
        ms_deform_attn_core(value, spatial_shapes, level_start_index, locations[..., 0], weights)


def test_cpu_fast_handles_empty_queries_and_nan_locations():
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(
        [(4, 5), (2, 3)], batch=2, queries=3, heads=2, head_dim=4, points=2, dtype=torch.float32
    )
    empty = [t[:, :0].clone().requires_grad_() for t in (locations, weights)]
    leaf_value = value.clone().requires_grad_()
    out = ms_deform_attn_core(leaf_value, spatial_shapes, level_start_index, *empty, impl="cpu_fast")
    out.sum().backward()
    assert out.shape == (2, 0, 8) and torch.all(leaf_value.grad == 0)
    assert empty[0].grad.shape == (2, 0, 2, 2, 2, 2)
    # A NaN location (a diverged model) reads zeros instead of indexing outside the table.
    locations[1, 2, 1] = float("nan")
    inputs = (value, spatial_shapes, level_start_index, locations, weights)
    out = ms_deform_attn_core(*inputs, impl="cpu_fast")
    reference = ms_deform_attn_core(*inputs, impl="reference")
    assert torch.all(out[1, 2, 4:] == 0)
    torch.testing.assert_close(out[:, :2], reference[:, :2])
