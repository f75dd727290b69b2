"""HGNetv2 (D-FINE's backbone) against the official code: the fixture holds the official module's float64
outputs for synthetic weights (B0, with and without learnable affine blocks) and digests of its state
dict layouts for B0..B6 (tests/fixtures/hgnetv2/make_fixture.py says how it was made). Also the key
mapping, freezing, padding masks, weight files and the config."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from detr_lab.config import HGNETV2_NAMES, ConfigError, load_config
from detr_lab.io import CheckpointError
from detr_lab.models.backbones import FrozenBatchNorm2d, HGNetv2Backbone, downsample_mask
from detr_lab.models.backbones.hgnetv2_keys import (
    HGNETV2_NAMES as BACKBONE_NAMES,
)
from detr_lab.models.backbones.hgnetv2_keys import (
    hgnetv2_layout,
    infer_hgnetv2,
    official_hgnetv2_state_dict,
)
from detr_lab.models.build import build_backbone
from detr_lab.models.fusion import AffineClamp, fold_learnable_affine_blocks
from detr_lab.models.optimize import fold_conv_norm_units

from factories import FIXTURES, load_module

FIXTURE = torch.load(FIXTURES / "hgnetv2" / "hgnetv2_b0.pt", weights_only=True)
SYNTH = load_module(FIXTURES / "hgnetv2" / "synth.py")
ALL_STRIDES = (4, 8, 16, 32)


def official_weights(use_lab: bool) -> dict[str, torch.Tensor]:
    """The fixture's synthetic weights in the official layout (with `num_batches_tracked`)."""
    return SYNTH.synth_state_dict(FIXTURE["models"][use_lab]["state_dict_spec"], FIXTURE["seed"])


def meta_backbone(name: str, use_lab: bool, norm: str = "batch_norm") -> HGNetv2Backbone:
    with torch.device("meta"):
        return HGNetv2Backbone(name, strides=ALL_STRIDES, use_lab=use_lab, norm=norm)


@pytest.mark.parametrize("norm", ["batch_norm", "frozen_bn"])
@pytest.mark.parametrize("use_lab", [True, False])
def test_outputs_match_the_official_hgnetv2_in_float64(use_lab, norm):
    reference = FIXTURE["models"][use_lab]
    weights = official_weights(use_lab)
    if use_lab:  # the affine blocks hold values a model ignoring them would miss
        scales = torch.cat([v for k, v in weights.items() if k.endswith("lab.scale")])
        assert scales.sub(1).abs().min() > 1e-4
    backbone = HGNetv2Backbone("hgnetv2_b0", strides=(8, 16, 32), use_lab=use_lab, norm=norm).double()
    backbone.load_state_dict(official_hgnetv2_state_dict(weights))
    # Frozen batch norm ignores the mode: in training mode it still computes the official eval outputs.
    backbone.train(norm == "frozen_bn")
    with torch.no_grad():
        maps = backbone.feature_maps(FIXTURE["image"].double())
    assert backbone.strides == [8, 16, 32] and backbone.num_channels == [256, 512, 1024]
    assert len(maps) == 3
    for index, official in reference["outputs"].items():
        ours = maps[index - 1]  # official return_idx 1, 2, 3
        assert ours.dtype == torch.float64 and ours.shape == official.shape
        torch.testing.assert_close(ours, official, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["batch_norm", "frozen_bn"])
@pytest.mark.parametrize("use_lab", [True, False])
@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_every_variant_has_the_official_key_layout(name, use_lab, norm):
    """Names, shapes and order of the state dict equal the official module's (freeze_norm as norm)."""
    backbone = meta_backbone(name, use_lab, norm)
    digest = FIXTURE["layout_sha256"][(name, use_lab, norm == "frozen_bn")]
    assert SYNTH.layout_digest(backbone.state_dict()) == digest
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()) or norm == "batch_norm"


def test_b0_layout_is_the_fixture_spec():
    """The readable counterpart of the digests: B0's official keys and shapes, one by one."""
    for use_lab, reference in FIXTURE["models"].items():
        spec = [(k, tuple(s)) for k, s in reference["state_dict_spec"] if "num_batches" not in k]
        assert list(hgnetv2_layout("hgnetv2_b0", use_lab).items()) == spec
        assert any(".lab." in k for k, _ in spec) == use_lab


@pytest.mark.parametrize("use_lab", [True, False])
@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_mapping_consumes_every_official_key_and_fills_every_backbone_key(name, use_lab):
    official = meta_backbone(name, use_lab).state_dict()  # the official layout (test above)
    assert any(k.endswith("num_batches_tracked") for k in official)
    mapped = official_hgnetv2_state_dict(official)
    expected = [k for k in official if not k.endswith("num_batches_tracked")]
    assert list(mapped) == expected
    assert all(mapped[k] is official[k] for k in mapped)
    assert infer_hgnetv2(official) == (name, use_lab)
    # A backbone with fewer stages loads the keys of the stages it has.
    with torch.device("meta"):
        short = HGNetv2Backbone(name, strides=(8, 16), use_lab=use_lab)
    own = short.state_dict()
    short.load_state_dict({k: v for k, v in mapped.items() if k in own}, assign=True)
    assert not any(k.startswith("stages.3.") for k in own)


def test_mapping_names_the_keys_that_do_not_fit():
    official = official_weights(True)
    key = "stages.2.blocks.1.layers.0.conv2.lab.scale"
    with pytest.raises(CheckpointError, match=rf"1 missing, e\.g\. \['{key}'\]"):
        official_hgnetv2_state_dict({k: v for k, v in official.items() if k != key})
    with pytest.raises(CheckpointError, match=r"1 unexpected, e\.g\. \['stages\.0\.extra\.weight'\]"):
        official_hgnetv2_state_dict({**official, "stages.0.extra.weight": torch.zeros(1)})
    bad = {**official, "stem.stem1.conv.weight": torch.zeros(16, 3, 5, 5)}
    with pytest.raises(CheckpointError, match=r"shape mismatch, e\.g\. \['stem\.stem1\.conv\.weight \(16, 3"):
        official_hgnetv2_state_dict(bad)
    with pytest.raises(CheckpointError, match=r"not an official HGNetv2 hgnetv2_b2 state dict"):
        official_hgnetv2_state_dict(official, name="hgnetv2_b2")
    with pytest.raises(CheckpointError, match=r"use_lab=False.*unexpected, e\.g\. \['stem\.stem1\.lab\."):
        official_hgnetv2_state_dict(official, use_lab=False)
    with pytest.raises(CheckpointError, match="remove the 'backbone.' prefix"):
        official_hgnetv2_state_dict({f"backbone.{k}": v for k, v in official.items()})
    with pytest.raises(CheckpointError, match="missing"):
        infer_hgnetv2({k: v for k, v in official.items() if not k.startswith("stages.3.")})


def test_freezing_options():
    def frozen(backbone):
        return {name for name, p in backbone.named_parameters() if not p.requires_grad}

    def parts(names):
        return {".".join(n.split(".")[:2]) if n.startswith("stages") else "stem" for n in names}

    assert not frozen(HGNetv2Backbone("hgnetv2_b0"))
    assert parts(frozen(HGNetv2Backbone("hgnetv2_b0", freeze_stem=True))) == {"stem"}
    two = HGNetv2Backbone("hgnetv2_b0", frozen_stages=2, freeze_stem=True)
    assert parts(frozen(two)) == {"stem", "stages.0", "stages.1"}
    assert "stem.stem1.lab.scale" in frozen(two) and "stages.2.downsample.conv.weight" not in frozen(two)
    everything = HGNetv2Backbone("hgnetv2_b0", frozen_stages=4)
    assert len(frozen(everything)) == len(list(everything.parameters()))
    # freeze_norm: every batch norm fixed, its tensors buffers; convolutions and affine blocks still train.
    trained = HGNetv2Backbone("hgnetv2_b0")
    fixed = HGNetv2Backbone("hgnetv2_b0", norm="frozen_bn")
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in trained.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in fixed.modules()) == norms > 0
    assert not any(".bn." in name for name, _ in fixed.named_parameters())
    assert all(p.requires_grad for p in fixed.parameters())
    assert all(p.numel() == 1 for n, p in trained.named_parameters() if ".lab." in n)
    with pytest.raises(ValueError, match="frozen_stages must be in 0..4"):
        HGNetv2Backbone("hgnetv2_b0", frozen_stages=5)


def test_levels_and_padding_masks():
    torch.manual_seed(0)
    backbone = HGNetv2Backbone("hgnetv2_b0", strides=(16, 32)).eval()
    assert backbone.strides == [16, 32] and backbone.num_channels == [512, 1024]
    assert len(backbone.stages) == 4
    images = torch.randn(2, 3, 70, 90)
    padding_mask = torch.zeros(2, 70, 90, dtype=torch.bool)
    padding_mask[1, :, 45:] = True
    images[1, :, :, 45:] = 0
    with torch.no_grad():
        levels = backbone(images, padding_mask)
    assert [tuple(level.features.shape) for level in levels] == [(2, 512, 5, 6), (2, 1024, 3, 3)]
    for level in levels:
        assert torch.equal(level.mask, downsample_mask(padding_mask, level.features.shape[-2:]))
    assert not levels[0].mask[0].any()
    assert levels[0].mask[1, :, 3:].all() and not levels[0].mask[1, :, :3].any()
    shallow = HGNetv2Backbone("hgnetv2_b0", strides=(4, 8))
    assert len(shallow.stages) == 2 and shallow.num_channels == [64, 256]
    with pytest.raises(ValueError, match="HGNetv2 strides must be increasing values from"):
        HGNetv2Backbone("hgnetv2_b0", strides=(8, 64))
    with pytest.raises(ValueError, match=r"unknown HGNetv2 variant 'B4'.*did you mean 'hgnetv2_b4'"):
        HGNetv2Backbone("B4")


def test_weights_files_official_and_timm(tmp_path):
    official = official_weights(True)
    path = tmp_path / "PPHGNetV2_B0_stage1.pth"
    torch.save({k: v.float() for k, v in official.items()}, path)
    loaded = HGNetv2Backbone("hgnetv2_b0", weights_path=path, norm="frozen_bn")
    torch.testing.assert_close(loaded.stem.stem1.lab.scale, official["stem.stem1.lab.scale"].float())
    key = "stages.3.blocks.0.aggregation.1.bn.running_var"
    torch.testing.assert_close(loaded.state_dict()[key], official[key].float())
    # A timm checkpoint (safetensors) of the same variant: its classifier head is left out.
    timm_model = timm.create_model("hgnetv2_b0", num_classes=5)
    timm_state = timm_model.state_dict()
    assert any(k.startswith("head.") for k in timm_state)
    save_file({k: v.contiguous() for k, v in timm_state.items()}, tmp_path / "model.safetensors")
    from_timm = HGNetv2Backbone("hgnetv2_b0", strides=(16, 32), weights_path=tmp_path / "model.safetensors")
    key = "stages.2.blocks.1.layers.2.conv2.conv.weight"
    torch.testing.assert_close(from_timm.state_dict()[key], timm_state[key])
    with pytest.raises(CheckpointError, match=r"B0_stage1\.pth: not an official HGNetv2 hgnetv2_b1"):
        HGNetv2Backbone("hgnetv2_b1", weights_path=path)
    with pytest.raises(CheckpointError, match=r"use_lab=False.*unexpected.*lab"):
        HGNetv2Backbone("hgnetv2_b0", use_lab=False, weights_path=path)
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="broken.safetensors: not a readable safetensors file"):
        HGNetv2Backbone("hgnetv2_b0", weights_path=tmp_path / "broken.safetensors")


def test_config_builds_it_and_names_bad_keys():
    assert HGNETV2_NAMES == BACKBONE_NAMES
    base = ["model.backbone.type=hgnetv2", "model.backbone.name=hgnetv2_b0"]
    backbone = build_backbone(load_config(overrides=[*base, "model.num_feature_levels=2"]).model)
    assert isinstance(backbone, HGNetv2Backbone) and backbone.strides == [16, 32]  # D-FINE-N
    assert backbone.use_lab and not any(not p.requires_grad for p in backbone.parameters())
    cfg = load_config(overrides=[*base, "model.num_feature_levels=3", "model.backbone.use_lab=false",
                                 "model.backbone.norm=frozen_bn", "model.backbone.freeze_stem=true"])
    backbone = build_backbone(cfg.model)
    assert backbone.strides == [8, 16, 32] and backbone.num_channels == [256, 512, 1024]
    assert not backbone.use_lab and not any(".lab." in k for k in backbone.state_dict())
    assert isinstance(backbone.stem.stem1.bn, FrozenBatchNorm2d)
    assert not backbone.stem.stem1.conv.weight.requires_grad
    assert backbone.stages[0].blocks[0].layers[0].conv.weight.requires_grad
    large = load_config(overrides=["model.backbone.type=hgnetv2", "model.backbone.name=hgnetv2_b4",
                                   "model.num_feature_levels=3"])
    large = build_backbone(large.model)  # D-FINE-L's variant: no affine blocks by default
    assert not large.use_lab and large.num_channels == [512, 1024, 2048]

    name_error = r"'model\.backbone\.name' is '{}'; an hgnetv2 backbone is one of: hgnetv2_b0, .*{}"
    with pytest.raises(ConfigError, match=name_error.format("B4", "did you mean 'hgnetv2_b4'")):
        load_config(overrides=["model.backbone.type=hgnetv2", "model.backbone.name=B4"])
    with pytest.raises(ConfigError, match=name_error.format("resnet50", "hgnetv2_b6$")):
        load_config(overrides=["model.backbone.type=hgnetv2"])
    only = r"'model\.backbone\.{}' applies to 'model\.backbone\.type: {}"
    with pytest.raises(ConfigError, match=only.format("use_lab", "hgnetv2'")):
        load_config(overrides=["model.backbone.use_lab=true"])
    with pytest.raises(ConfigError, match=r"'model\.backbone\.pretrained' is not available for hgnetv2"):
        load_config(overrides=[*base, "model.backbone.pretrained=true"])
    with pytest.raises(ConfigError, match=r"'model\.backbone\.timm_kwargs' applies to the timm and vit"):
        load_config(overrides=[*base, "model.backbone.timm_kwargs.drop_path_rate=0.1"])
    with pytest.raises(ConfigError, match=only.format("dilation", "resnet'")):
        load_config(overrides=[*base, "model.backbone.dilation=true"])


@pytest.mark.parametrize("norm", ["batch_norm", "frozen_bn"])
def test_learnable_affine_blocks_fold_into_the_norm_and_a_clamp(norm):
    """`s * relu(z) + b` as `max(s z + b, b)` (s >= 0) or `min(s z + b, b)` (s < 0): the folded
    backbone computes the same maps, with scales of both signs and zero."""
    torch.manual_seed(0)
    backbone = HGNetv2Backbone("hgnetv2_b0", strides=ALL_STRIDES, use_lab=True, norm=norm).eval()
    labs = [m for m in backbone.modules() if type(m).__name__ == "LearnableAffineBlock"]
    with torch.no_grad():
        for index, lab in enumerate(labs):
            lab.scale.fill_((-1.5, 0.0, 0.7, 2.0)[index % 4])
            lab.bias.normal_(0, 0.5)
        for module in backbone.modules():
            if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.3)
                module.bias.normal_(0, 0.3)
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = backbone.feature_maps(images)
        assert fold_learnable_affine_blocks(backbone) == len(labs) == 30
        assert fold_learnable_affine_blocks(backbone) == 0
        clamps = [m for m in backbone.modules() if isinstance(m, AffineClamp)]
        assert len(clamps) == 30 and {c.lower for c in clamps} == {True, False}
        folded = backbone.feature_maps(images)
        assert fold_conv_norm_units(backbone) > 0  # the PyTorch fast path folds the norms after
        fused = backbone.feature_maps(images)
    for want, got, got_fused in zip(expected, folded, fused, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_fused, want, rtol=1e-4, atol=1e-4)
