"""optimize_for_inference keeps a detector's outputs: folded frozen norms, chunked FFNs, channels-last,
a traced CPU backbone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from detr_lab.config import load_config
from detr_lab.models.attention.plain import PlainAttention
from detr_lab.models.backbones import FrozenBatchNorm2d, ResNetBackbone
from detr_lab.models.build import build_model
from detr_lab.models.optimize import (
    ChunkedFeedForward,
    TracedBackboneRunner,
    fold_batch_norm_into_conv,
    fold_frozen_batch_norms,
    optimize_for_inference,
    trace_backbone,
)
from detr_lab.models.transformer import FeedForward

from factories import tiny_overrides

TINY = tiny_overrides(encoder__num_layers=2, num_queries=10, num_classes=5)
DEFORMABLE = [
    "model.num_feature_levels=2",
    "model.encoder.attention=deformable",
    "model.decoder.cross_attention=deformable",
    "model.box_refine=true",
    "model.classification=sigmoid",
]


@pytest.fixture
def threads():
    """Set torch's CPU thread count inside a test (chunking depends on it); restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def randomize_frozen_batch_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Statistics and affine parameters away from the identity (fresh ones fold into nothing)."""
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            channels = module.weight.shape[0]
            module.weight.copy_(0.5 + torch.rand(channels, generator=generator))
            module.bias.copy_(0.2 * torch.randn(channels, generator=generator))
            module.running_mean.copy_(0.2 * torch.randn(channels, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))


def tiny_model(overrides: list[str]) -> nn.Module:
    """A tiny detector whose every output depends on the backbone: random frozen norms, and the
    zero-initialised weights (box-head output, deformable offsets and weights) made small random."""
    torch.manual_seed(0)
    model = build_model(load_config(overrides=[*TINY, *overrides]).model).eval()
    generator = torch.Generator().manual_seed(1)
    randomize_frozen_batch_norms(model, generator)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return model


def images_and_mask(batch: int = 2, height: int = 64, width: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(batch, 3, height, width, generator=generator)
    padding_mask = torch.zeros(batch, height, width, dtype=torch.bool)
    padding_mask[1, 48:, :] = True  # the second image is shorter and narrower: padded bottom/right
    padding_mask[1, :, 70:] = True
    images[1][padding_mask[1].expand(3, -1, -1)] = 0.0
    return images, padding_mask


@pytest.mark.slow  # traced backbones, two model variants
@pytest.mark.parametrize("variant", ["detr", "deformable"])
def test_optimized_model_gives_the_same_outputs(variant, threads):
    threads(1)
    model = tiny_model([] if variant == "detr" else DEFORMABLE)
    plain = copy.deepcopy(model)
    optimized = optimize_for_inference(copy.deepcopy(model))
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in optimized.modules())
    chunked = [m for m in optimized.modules() if isinstance(m, ChunkedFeedForward)]
    assert len(chunked) == 4  # two encoder and two decoder layers
    for block in chunked:  # chunk even these tiny inputs, in uneven pieces
        block.rows_per_chunk, block.min_hidden_elements = 5, 0
    images, padding_mask = images_and_mask()
    with torch.inference_mode():
        expected = model(images, padding_mask)
        got = optimized(images, padding_mask)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(got[key], expected[key], atol=1e-4, rtol=0), key
        pairs = zip(got["aux_outputs"], expected["aux_outputs"], strict=True)
        for index, (aux_got, aux_expected) in enumerate(pairs):
            assert torch.allclose(aux_got[key], aux_expected[key], atol=1e-4, rtol=0), (index, key)
    # The randomized norms matter: without them the outputs differ by far more than the tolerance.
    for module in plain.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.running_var.fill_(1.0)
    with torch.inference_mode():
        other = plain(images, padding_mask)
    for key in ("pred_logits", "pred_boxes"):
        assert (other[key] - expected[key]).abs().max() > 1e-3, key


def test_optimized_model_runs_channels_last_and_in_eval_mode():
    model = tiny_model([]).train()
    optimize_for_inference(model, compile_backbone=False)  # the eager backbone keeps channels-last
    assert not any(module.training for module in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    with torch.inference_mode():
        levels = model.backbone(*images_and_mask())
    assert levels[-1].features.is_contiguous(memory_format=torch.channels_last)
    optimize_for_inference(model, channels_last=False)  # a second call finds nothing left to fold
    assert fold_frozen_batch_norms(model) == 0


def test_fold_counts_every_resnet18_batch_norm():
    model = tiny_model([])
    norms = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert norms == 1 + 8 * 2 + 3  # stem, two per basic block, three downsample branches
    assert fold_frozen_batch_norms(model) == norms
    assert sum(isinstance(m, nn.Identity) for m in model.backbone.modules()) == norms


@pytest.mark.parametrize("conv_bias", [False, True])
def test_fold_batch_norm_into_conv_matches_conv_then_norm(conv_bias):
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, kernel_size=3, padding=1, stride=2, bias=conv_bias)
    norm = FrozenBatchNorm2d(6)
    randomize_frozen_batch_norms(norm, torch.Generator().manual_seed(4))
    x = torch.randn(2, 4, 9, 11)
    expected = norm(conv(x))
    fold_batch_norm_into_conv(conv, norm)
    assert conv.bias is not None
    assert torch.allclose(conv(x), expected, atol=1e-5, rtol=1e-5)


def test_fold_rejects_a_norm_of_another_width():
    with pytest.raises(ValueError, match="4 channels into a convolution with 6 output channels"):
        fold_batch_norm_into_conv(nn.Conv2d(3, 6, 1), FrozenBatchNorm2d(4))


def test_optimize_restores_the_fast_attention_paths():
    model = tiny_model([])
    attention = [m for m in model.modules() if type(m) is PlainAttention]
    for module in attention:
        module.impl = "math"
    optimize_for_inference(model)
    assert attention and all(m.impl == "sdpa" for m in attention)


def test_chunked_feed_forward_matches_feed_forward(threads):
    threads(1)
    torch.manual_seed(5)
    block = FeedForward(16, 40, dropout=0.1).eval()
    chunked = ChunkedFeedForward(block, rows_per_chunk=7, min_hidden_elements=0)
    assert set(chunked.state_dict()) == set(block.state_dict())
    x = torch.randn(3, 17, 16)  # 51 rows: seven full chunks and a partial one
    calls = []
    block.linear1.register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))
    with torch.inference_mode():
        expected = block(x)
        calls.clear()
        assert torch.allclose(chunked(x), expected, atol=1e-6, rtol=1e-5)
    assert calls == [7] * 7 + [2]
    # Below the size threshold the block runs in one piece.
    calls.clear()
    with torch.inference_mode():
        ChunkedFeedForward(block, rows_per_chunk=7, min_hidden_elements=51 * 40 + 1)(x)
    assert calls == [3]  # one call on the whole [3, 17, 16] input
    # So it does with several threads.
    threads(2)
    calls.clear()
    with torch.inference_mode():
        chunked(x)
    assert calls == [3]
    # With gradients recorded it is the plain block (and differentiable).
    x.requires_grad_(True)
    chunked(x).square().sum().backward()
    chunked_grad, x.grad = x.grad, None
    block(x).square().sum().backward()
    torch.testing.assert_close(chunked_grad, x.grad)


def test_chunked_feed_forward_keeps_dropout_in_training():
    torch.manual_seed(6)
    block = FeedForward(16, 40, dropout=0.5)
    chunked = ChunkedFeedForward(block, rows_per_chunk=4, min_hidden_elements=0).train()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        assert not torch.allclose(chunked(x), chunked(x))


def test_chunked_feed_forward_under_bfloat16_autocast(threads):
    threads(1)
    torch.manual_seed(7)
    block = FeedForward(16, 40).eval()
    chunked = ChunkedFeedForward(block, rows_per_chunk=5, min_hidden_elements=0)
    x = torch.randn(2, 11, 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = chunked(x), block(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("variant", ["detr", "deformable"])
def test_traced_backbone_matches_eager_at_other_sizes(variant):
    model = tiny_model([] if variant == "detr" else DEFORMABLE)
    optimized = optimize_for_inference(copy.deepcopy(model))
    assert isinstance(optimized.backbone.inference_runner, TracedBackboneRunner)
    assert isinstance(optimized.backbone.eager, ResNetBackbone)
    assert (
        {key.replace("backbone.eager.", "backbone.", 1) for key in optimized.state_dict()}
        == set(optimize_for_inference(copy.deepcopy(model), compile_backbone=False).state_dict())
    )  # the runner is no submodule: the wrapper adds no state beyond the eager backbone's
    for batch, height, width in [(3, 80, 112), (2, 57, 129)]:  # traced at 1 x 64 x 96
        images, padding_mask = images_and_mask(batch, height, width)
        with torch.inference_mode():
            expected = model(images, padding_mask)
            got = optimized(images, padding_mask)
            maps = optimized.backbone.feature_maps(images)
            eager_maps = model.backbone.feature_maps(images)
        for have, want in zip(maps, eager_maps, strict=True):
            assert have.shape == want.shape
            assert (have - want).abs().max() <= 1e-4 * want.abs().max()
        for key in ("pred_logits", "pred_boxes"):
            assert torch.allclose(got[key], expected[key], atol=1e-4, rtol=0), (batch, key)


def test_traced_backbone_only_runs_where_it_applies():
    optimized = optimize_for_inference(tiny_model([]))
    backbone = optimized.backbone
    images, _ = images_and_mask()
    calls = []
    runner = backbone.inference_runner
    backbone.set_inference_runner(
        type("Counting", (), {"applies_to": staticmethod(runner.applies_to),
                              "__call__": lambda self, x: calls.append(1) or runner(x)})()
    )  # fmt: skip
    with torch.inference_mode():
        backbone.feature_maps(images)
    assert len(calls) == 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        backbone.feature_maps(images)  # autocast: the modules decide the dtypes
    maps = backbone.feature_maps(images.requires_grad_())  # autograd recording: eager, differentiable
    assert maps[-1].requires_grad
    backbone.train()
    with torch.inference_mode():
        backbone.feature_maps(images)
    assert len(calls) == 1
    # A copy computes with its own modules (the compiled body holds the original weights).
    backbone.set_inference_runner(runner)
    assert copy.deepcopy(optimized).backbone.inference_runner is None


def test_tracing_failures_leave_the_backbone_eager(monkeypatch):
    model = tiny_model([])
    with pytest.raises(RuntimeError, match="eval mode"):
        trace_backbone(copy.deepcopy(model).backbone.train())

    def broken_trace(*args, **kwargs):
        raise RuntimeError("tracer unavailable")

    monkeypatch.setattr(torch.jit, "trace", broken_trace)
    with pytest.warns(
        UserWarning, match="backbone left uncompiled: tracing the backbone failed.*unavailable"
    ):
        optimized = optimize_for_inference(copy.deepcopy(model))
    assert isinstance(optimized.backbone, ResNetBackbone)  # not wrapped: no inference runner
    images, padding_mask = images_and_mask()
    with torch.inference_mode():
        got, expected = optimized(images, padding_mask), model(images, padding_mask)
    assert torch.allclose(got["pred_logits"], expected["pred_logits"], atol=1e-4, rtol=0)


def test_a_traced_backbone_that_disagrees_is_refused(monkeypatch):
    real = torch.jit.optimize_for_inference

    def off_by_a_bit(module, *args, **kwargs):
        compiled = real(module, *args, **kwargs)
        return lambda images: [level + 1e-2 * level.abs().amax() for level in compiled(images)]

    monkeypatch.setattr(torch.jit, "optimize_for_inference", off_by_a_bit)
    with pytest.raises(RuntimeError, match="disagrees with the eager one at stage level 0"):
        trace_backbone(tiny_model([]).backbone)
