"""ResNet-vd (RT-DETR's PResNet) against the official code: the fixture holds the official model's
outputs for synthetic weights (tests/fixtures/resnet_vd/make_fixture.py says how it was made)."""

from __future__ import annotations

import pytest
import torch

from detr_lab.io import CheckpointError
from detr_lab.models.backbones.resnet_vd import ResNetVdBackbone

from factories import FIXTURES, load_synth_weights

FIXTURE = torch.load(FIXTURES / "resnet_vd" / "presnet.pt", weights_only=True)


@pytest.mark.parametrize("depth", [18, 50])
def test_outputs_match_the_official_presnet(depth):
    reference = FIXTURE["models"][depth]
    spec = dict(reference["state_dict_spec"])
    backbone = ResNetVdBackbone(depth, stages=(2, 3, 4), norm="batch_norm").eval()
    assert list(backbone.state_dict()) == list(spec)  # the official key layout, in its order
    backbone.load_state_dict(load_synth_weights().synth_state_dict(spec, FIXTURE["seed"]))
    with torch.no_grad():
        maps = backbone.feature_maps(FIXTURE["images"])
    assert backbone.strides == [8, 16, 32]
    expansion = 4 if depth >= 50 else 1
    assert backbone.num_channels == [128 * expansion, 256 * expansion, 512 * expansion]
    for ours, official in zip(maps, reference["outputs"], strict=True):
        assert ours.shape == official.shape
        torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)


def test_levels_masks_freezing_and_weights_file(tmp_path):
    torch.manual_seed(0)
    backbone = ResNetVdBackbone(18, stages=(3, 4), frozen_stages=2, norm="frozen_bn")
    assert backbone.strides == [16, 32] and len(backbone.res_layers) == 4
    frozen = {name.split(".")[0] + "." + name.split(".")[1] for name, p in backbone.named_parameters()
              if not p.requires_grad}  # fmt: skip
    assert {"conv1.conv1_1", "res_layers.0", "res_layers.1"} <= frozen and "res_layers.2" not in frozen
    images = torch.randn(2, 3, 70, 90)
    padding_mask = torch.zeros(2, 70, 90, dtype=torch.bool)
    padding_mask[1, :, 45:] = True
    levels = backbone(images, padding_mask)
    assert [tuple(level.features.shape[-2:]) for level in levels] == [(5, 6), (3, 3)]
    assert levels[0].mask[1, :, 3:].all() and not levels[0].mask[0].any()

    path = tmp_path / "r18vd.pth"
    torch.save(backbone.state_dict(), path)
    loaded = ResNetVdBackbone(18, stages=(3, 4), weights_path=path, norm="frozen_bn")
    torch.testing.assert_close(loaded.conv1.conv1_1.conv.weight, backbone.conv1.conv1_1.conv.weight)
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a ResNet-vd state dict"):
        ResNetVdBackbone(18, weights_path=tmp_path / "other.pth")
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNetVdBackbone(26)


def test_config_type_builds_it_and_refuses_what_it_lacks():
    from detr_lab.config import ConfigError, load_config
    from detr_lab.models.build import build_backbone

    cfg = load_config(overrides=["model.backbone.type=resnet_vd", "model.backbone.name=resnet34",
                                 "model.num_feature_levels=4", "model.backbone.frozen_stages=1"])  # fmt: skip
    backbone = build_backbone(cfg.model)
    assert isinstance(backbone, ResNetVdBackbone) and backbone.strides == [8, 16, 32]
    assert len(backbone.res_layers[2].blocks) == 6 and not backbone.conv1.conv1_1.conv.weight.requires_grad
    only_resnet = "'model.backbone.dilation' applies to 'model.backbone.type: resnet' only"
    with pytest.raises(ConfigError, match=only_resnet):
        load_config(overrides=["model.backbone.type=resnet_vd", "model.backbone.dilation=true"])
    with pytest.raises(ConfigError, match="'model.backbone.pretrained' is not available for resnet_vd"):
        load_config(overrides=["model.backbone.type=resnet_vd", "model.backbone.pretrained=true"])
    with pytest.raises(ConfigError, match="a resnet backbone is one of"):
        load_config(overrides=["model.backbone.type=resnet_vd", "model.backbone.name=resnet26"])
