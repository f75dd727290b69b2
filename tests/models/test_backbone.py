from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from detr_lab.checkpoints import CheckpointError
from detr_lab.models.backbones import FrozenBatchNorm2d, ResNetBackbone, downsample_mask


def test_frozen_batch_norm_matches_eval_batch_norm():
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(6, eps=1e-5).eval()
    reference.weight.data.uniform_(0.5, 1.5)
    reference.bias.data.normal_()
    reference.running_mean.normal_()
    reference.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(reference.state_dict())  # includes num_batches_tracked, which is dropped
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(frozen(x), reference(x), atol=1e-6, rtol=1e-5)
    assert list(frozen.parameters()) == []


def test_levels_strides_channels_and_masks():
    backbone = ResNetBackbone("resnet18", stages=(2, 3, 4))
    assert backbone.num_channels == [128, 256, 512]
    assert backbone.strides == [8, 16, 32]
    images = torch.randn(2, 3, 64, 96)
    padding_mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    padding_mask[1, :, 48:] = True  # right half of image 1 is padding
    levels = backbone(images, padding_mask)
    assert [tuple(level.features.shape) for level in levels] == [
        (2, 128, 8, 12),
        (2, 256, 4, 6),
        (2, 512, 2, 3),
    ]
    first = levels[0].mask
    assert first.dtype == torch.bool and tuple(first.shape) == (2, 8, 12)
    assert not first[0].any()
    assert first[1, :, 6:].all() and not first[1, :, :6].any()
    assert levels[2].mask[1].tolist() == [[False, False, True], [False, False, True]]


def test_downsample_mask_is_nearest():
    mask = torch.tensor([[[False, False, True, True, True, True]]])
    assert downsample_mask(mask, (1, 3)).tolist() == [[[False, True, True]]]


def test_dilation_keeps_stride_16_and_needs_bottleneck():
    backbone = ResNetBackbone("resnet50", stages=(4,), dilation=True)
    assert backbone.strides == [16] and backbone.num_channels == [2048]
    levels = backbone(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert tuple(levels[0].features.shape) == (1, 2048, 4, 4)
    with pytest.raises(ValueError, match="dilation.*resnet18"):
        ResNetBackbone("resnet18", dilation=True)


@pytest.mark.parametrize(
    ("frozen_stages", "trainable"),
    [(0, {"conv1", "layer1", "layer2", "layer3", "layer4"}), (1, {"layer2", "layer3", "layer4"}), (4, set())],
)
def test_frozen_stages(frozen_stages, trainable):
    backbone = ResNetBackbone("resnet18", frozen_stages=frozen_stages)
    with_grad = {name.split(".")[1] for name, p in backbone.named_parameters() if p.requires_grad}
    assert with_grad == trainable


def test_weights_path_loads_a_local_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)  # BatchNorm2d: has num_batches_tracked; has fc
    with torch.no_grad():
        reference.bn1.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = ResNetBackbone("resnet18", weights_path=path)
    torch.testing.assert_close(backbone.body.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(backbone.body["layer4"][1].conv2.weight, reference.layer4[1].conv2.weight)
    torch.testing.assert_close(backbone.body.bn1.running_var, reference.bn1.running_var)


def test_weights_path_errors(tmp_path):
    path = tmp_path / "resnet34.pth"
    with torch.device("meta"):
        state = torchvision.models.resnet34(weights=None).state_dict()
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}, path)
    with pytest.raises(ValueError, match=r"resnet34\.pth does not fit backbone 'resnet18'.*unexpected"):
        ResNetBackbone("resnet18", weights_path=path)
    with pytest.raises(CheckpointError, match="not found"):
        ResNetBackbone("resnet18", weights_path=tmp_path / "missing.pth")


def test_pretrained_uses_the_imagenet_weights(monkeypatch):
    torch.manual_seed(1)
    weights = torchvision.models.resnet18(weights=None).state_dict()
    monkeypatch.setattr(ResNetBackbone, "download_imagenet_weights", lambda self: weights)
    backbone = ResNetBackbone("resnet18", pretrained=True)
    torch.testing.assert_close(backbone.body.conv1.weight, weights["conv1.weight"])
    with pytest.raises(ValueError, match="not both"):
        ResNetBackbone("resnet18", pretrained=True, weights_path="x.pth")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone 'resnet152'"):
        ResNetBackbone("resnet152")
    with pytest.raises(ValueError, match="stages"):
        ResNetBackbone("resnet18", stages=(4, 2))
    backbone = ResNetBackbone("resnet18")
    with pytest.raises(ValueError, match="padding_mask"):
        backbone(torch.randn(1, 3, 32, 32), torch.zeros(1, 16, 32, dtype=torch.bool))
