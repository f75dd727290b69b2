"""`model.fold_frozen_norms`: in training, each convolution followed by a frozen batch norm applies the
norm itself (`FrozenNormConv2d`). Same loss and gradients as the separate norm, same state dict, and the
inference folding still folds each norm exactly once."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_members import member_config, member_module

from detr_lab.models.backbones import FrozenBatchNorm2d
from detr_lab.models.backbones.frozen_norm_conv import (
    AppliedFrozenBatchNorm2d,
    FrozenNormConv2d,
    fold_frozen_norms_for_training,
    unfold_frozen_norms,
)
from detr_lab.models.optimize import optimize_for_inference

from factories import tiny_batch

FROZEN = "model.backbone.norm=frozen_bn"


def randomize_frozen_norms(model: torch.nn.Module) -> None:
    """Statistics and affine terms far from the identity, the same for models built alike."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            channels = module.weight.shape[0]
            module.weight.copy_(0.5 + torch.rand(channels, generator=generator))
            module.bias.copy_(torch.randn(channels, generator=generator))
            module.running_mean.copy_(torch.randn(channels, generator=generator))
            module.running_var.copy_(0.2 + torch.rand(channels, generator=generator))


def build(member: str, fold: bool, dtype: torch.dtype = torch.float32):
    with torch.random.fork_rng():
        module = member_module(member_config(member, FROZEN, f"model.fold_frozen_norms={str(fold).lower()}"))
    randomize_frozen_norms(module.model)
    return module.to(dtype)


def loss_and_gradients(module, dtype: torch.dtype):
    images, padding_mask, targets = tiny_batch()
    targets = [{key: value.to(dtype) if value.is_floating_point() else value for key, value in target.items()}
               for target in targets]
    with torch.random.fork_rng():
        torch.manual_seed(1)  # the same dropout masks and denoising queries on both sides
        outputs = module.model.train()(images.to(dtype), padding_mask, targets=targets)
        total = module.criterion.total_loss(module.criterion(outputs, targets))
    total.backward()
    return total.detach(), {name: p.grad for name, p in module.model.named_parameters() if p.grad is not None}


# One member per layout of (conv, norm) pairs: torchvision's conv1/bn1 and Sequential downsample
# (DETR's ResNet), ResNet-vd's ConvNorm conv/norm (RT-DETR), HGNetv2's timm ConvBNAct conv/bn (D-FINE).
@pytest.mark.parametrize("member", ["detr", "rtdetr", "dfine"])
def test_loss_and_gradients_are_those_of_the_separate_norms(member):
    folded, separate = build(member, True, torch.float64), build(member, False, torch.float64)
    applied = [m for m in folded.model.modules() if isinstance(m, FrozenNormConv2d)]
    assert applied and not any(isinstance(m, FrozenNormConv2d) for m in separate.model.modules())
    frozen_norms = [m for m in separate.model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(applied) == len(frozen_norms)  # every frozen norm of these backbones follows a convolution
    loss, gradients = loss_and_gradients(folded, torch.float64)
    separate_loss, separate_gradients = loss_and_gradients(separate, torch.float64)
    torch.testing.assert_close(loss, separate_loss, rtol=1e-12, atol=0)
    assert gradients.keys() == separate_gradients.keys()
    trained = [name for m_name, m in folded.model.named_modules() if isinstance(m, FrozenNormConv2d)
               for name in (f"{m_name}.weight",) if name in gradients]
    assert trained and all(gradients[name].abs().max() > 0 for name in trained)
    for name, gradient in gradients.items():
        scale = float(separate_gradients[name].abs().max())
        assert float((gradient - separate_gradients[name]).abs().max()) <= 1e-10 * scale + 1e-12, name


def test_state_dict_is_unchanged_and_loads_both_ways():
    folded, separate = build("detr", True), build("detr", False)
    folded_state, separate_state = folded.model.state_dict(), separate.model.state_dict()
    assert list(folded_state) == list(separate_state)
    assert all(torch.equal(folded_state[key], separate_state[key]) for key in folded_state)
    fresh = build("detr", True)
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.zero_()
    fresh.model.load_state_dict(separate_state)  # strict
    assert all(torch.equal(fresh.model.state_dict()[key], separate_state[key]) for key in separate_state)


def test_parameters_are_shared_and_an_optimizer_step_moves_them():
    module = build("detr", False)
    body = module.model.backbone.body
    weight, norm_buffer = body.layer2[0].conv1.weight, body.layer2[0].bn1.running_var
    assert fold_frozen_norms_for_training(module.model) > 0
    conv, norm = body.layer2[0].conv1, body.layer2[0].bn1
    assert isinstance(conv, FrozenNormConv2d) and isinstance(norm, AppliedFrozenBatchNorm2d)
    assert conv.weight is weight and norm.running_var is norm_buffer and conv.norm is norm
    assert "norm" not in dict(conv.named_children())  # the norm stays registered in its own place
    assert fold_frozen_norms_for_training(module.model) == 0  # a second call finds nothing
    _, gradients = loss_and_gradients(module, torch.float32)
    before = weight.detach().clone()
    optimizer = torch.optim.SGD([weight], lr=1.0)
    optimizer.step()
    assert not torch.equal(before, body.layer2[0].conv1.weight.detach())
    # a copy points its convolutions at its own norms
    copied = copy.deepcopy(module.model).backbone.body.layer2[0]
    assert copied.conv1.norm is copied.bn1 and copied.bn1 is not norm


def test_trainable_batch_norms_are_left_alone():
    with torch.random.fork_rng():
        module = member_module(member_config("rtdetr", "model.backbone.norm=batch_norm"))
    assert not any(isinstance(m, FrozenNormConv2d) for m in module.model.modules())


def test_inference_folding_folds_each_norm_once():
    folded, separate = build("detr", True), build("detr", False)
    images, padding_mask, _ = tiny_batch()
    with torch.inference_mode():
        expected = separate.model.eval()(images, padding_mask)
        optimized = optimize_for_inference(folded.model, compile_backbone=False)
        outputs = optimized(images, padding_mask)
    assert not any(isinstance(m, (FrozenNormConv2d, FrozenBatchNorm2d)) for m in optimized.modules())
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs[key], expected[key], rtol=1e-4, atol=1e-5)


def test_unfold_restores_plain_modules_with_the_same_tensors():
    module = build("detr", True)
    weight = module.model.backbone.body.conv1.weight
    count = unfold_frozen_norms(module.model)
    assert count == sum(isinstance(m, FrozenBatchNorm2d) for m in module.model.modules())
    assert type(module.model.backbone.body.conv1) is torch.nn.Conv2d
    assert module.model.backbone.body.conv1.weight is weight
    assert type(module.model.backbone.body.bn1) is FrozenBatchNorm2d
