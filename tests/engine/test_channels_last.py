"""`model.channels_last`: the training module stores its convolution weights channels-last (NHWC), and
that changes the layout only: the same loss and gradients as with the standard layout."""

from __future__ import annotations

import pytest
import torch
from tiny_members import member_config, member_module

from factories import tiny_batch


@pytest.fixture
def keep_the_random_state():
    with torch.random.fork_rng():
        yield


def convolution_weights(module) -> dict[str, torch.Tensor]:
    """The 4-D weights with a spatial kernel (a 1 x 1 kernel is laid out the same either way)."""
    return {name: p for name, p in module.model.named_parameters() if p.dim() == 4 and p.shape[-1] > 1}


@pytest.mark.parametrize("member", ["detr", "rtdetr"])
@pytest.mark.usefixtures("keep_the_random_state")
def test_convolution_weights_are_channels_last_unless_turned_off(member):
    weights = convolution_weights(member_module(member_config(member)))
    assert weights  # the backbone's convolutions
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
               for w in weights.values())
    standard = convolution_weights(member_module(member_config(member, "model.channels_last=false")))
    assert all(w.is_contiguous() for w in standard.values())


def loss_and_gradients(
    member: str, layout: str, dtype: torch.dtype
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward (denoising and dropout included, same seed) and backward of a tiny member."""
    with torch.random.fork_rng():  # the seeds set here do not reach the tests that follow
        return _loss_and_gradients(member, layout, dtype)


def _loss_and_gradients(member: str, layout: str, dtype: torch.dtype):
    module = member_module(member_config(member, f"model.channels_last={layout}")).train().to(dtype)
    images, padding_mask, targets = tiny_batch()
    targets = [{key: value.to(dtype) if value.is_floating_point() else value for key, value in target.items()}
               for target in targets]
    torch.manual_seed(1)
    outputs = module.model(images.to(dtype), padding_mask, targets=targets)
    total = module.criterion.total_loss(module.criterion(outputs, targets))
    total.backward()
    gradients = {name: p.grad for name, p in module.model.named_parameters() if p.grad is not None}
    return total.detach(), gradients


@pytest.mark.parametrize("member", ["detr", "dino", "rtdetr"])
def test_the_loss_and_gradients_are_those_of_the_standard_layout(member):
    # In float64 the two layouts agree to rounding everywhere. (In float32 a gradient may differ more
    # where max pooling meets two values within rounding of each other: its gradient is discontinuous
    # there, and either layout's rounding picks one of them, as a float64 reference shows.)
    loss, gradients = loss_and_gradients(member, "true", torch.float64)
    standard_loss, standard = loss_and_gradients(member, "false", torch.float64)
    torch.testing.assert_close(loss, standard_loss, rtol=1e-12, atol=0)
    assert gradients.keys() == standard.keys()
    convolutions = [name for name, g in gradients.items() if g.dim() == 4 and g.shape[-1] > 1]
    assert convolutions and all(gradients[name].abs().max() > 0 for name in convolutions)
    for name, gradient in gradients.items():
        scale = float(standard[name].abs().max())
        # 1e-12: gradients that are 0 but for rounding (a bias before a group norm)
        assert float((gradient - standard[name]).abs().max()) <= 1e-10 * scale + 1e-12, name
    # float32 (oneDNN's channels-last kernels): the same loss to rounding
    loss32, _ = loss_and_gradients(member, "true", torch.float32)
    standard32, _ = loss_and_gradients(member, "false", torch.float32)
    torch.testing.assert_close(loss32, standard32, rtol=1e-5, atol=0)
