"""The backbone contract for every registered type (torchvision ResNet, timm ConvNeXt / Swin, plain ViT
with ViTDet's simple feature pyramid): levels, strides, channels and padding masks; timm weights from a
local file; the pyramid's resampling; padding kept out of the ViT's attention. Tiny widths, no downloads."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from detr_lab.config import load_config
from detr_lab.models.backbones import (
    Backbone,
    FeatureLevel,
    ResNetBackbone,
    TimmBackbone,
    ViTBackbone,
    pad_to_multiple,
)
from detr_lab.models.build import BACKBONES, build_backbone, build_neck
from detr_lab.models.necks.simple_pyramid import SimpleFeaturePyramid
from detr_lab.models.necks.simple_pyramid import build as build_simple_pyramid

TINY_CONVNEXT = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}
TINY_SWIN = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}
TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}

# type, name, timm_kwargs (as YAML overrides would give them)
BACKBONE_CASES = {
    "resnet": ("resnet", "resnet18", {}),
    "convnext": ("timm", "convnext_atto", TINY_CONVNEXT),
    "swin": ("timm", "swin_tiny_patch4_window7_224", TINY_SWIN),
    "vit": ("vit", "vit_tiny_patch16_224", TINY_VIT),
}
# Levels each type returns natively for 1..4 detector levels (the rest are the detector's strided convs).
NATIVE_STRIDES = {
    "resnet": {1: [32], 2: [16, 32], 3: [8, 16, 32], 4: [8, 16, 32]},
    "timm": {1: [32], 2: [16, 32], 3: [8, 16, 32], 4: [8, 16, 32]},
    "vit": {1: [32], 2: [16, 32], 3: [8, 16, 32], 4: [8, 16, 32, 64]},  # of its simple-pyramid neck
}


def overrides(case: str, levels: int) -> list[str]:
    backbone_type, name, kwargs = BACKBONE_CASES[case]
    items = [
        f"model.backbone.type={backbone_type}",
        f"model.backbone.name={name}",
        f"model.num_feature_levels={levels}",
        "model.hidden_dim=32",
        "model.num_heads=2",
    ]
    items += [f"model.backbone.timm_kwargs.{key}={value}" for key, value in kwargs.items()]
    if backbone_type == "vit":
        items += ["model.neck.type=simple_pyramid", "model.neck.options.channels=16"]
    return items


def test_registry_matches_the_config_choices():
    from dataclasses import fields

    from detr_lab.config import BackboneConfig

    (type_field,) = [f for f in fields(BackboneConfig) if f.name == "type"]
    expected = {"resnet", "resnet_vd", "timm", "vit", "hgnetv2"}
    assert set(BACKBONES) == set(type_field.metadata["choices"]) == expected


@pytest.mark.parametrize("levels", [1, 3, 4])
@pytest.mark.parametrize("case", list(BACKBONE_CASES))
def test_levels_strides_channels_and_masks(case, levels):
    """Each backbone's levels; for the ViT, the levels its simple-pyramid neck builds from its one map."""
    torch.manual_seed(0)
    cfg = load_config(overrides=overrides(case, levels)).model
    backbone = build_backbone(cfg)
    assert isinstance(backbone, Backbone)
    backbone_type = BACKBONE_CASES[case][0]
    strides, num_channels = backbone.strides, backbone.num_channels
    if backbone_type == "vit":
        assert (backbone.strides, backbone.num_channels) == ([16], [32])  # one map at the patch stride
        neck = build_neck(cfg, backbone)
        strides, num_channels = NATIVE_STRIDES["vit"][levels], [cfg.hidden_dim] * neck.num_levels
    assert strides == NATIVE_STRIDES[backbone_type][levels]
    assert len(num_channels) == len(strides)

    height, width = 72, 100  # divisible by none of the patch, window or deepest stride
    images = torch.randn(2, 3, height, width)
    padding_mask = torch.zeros(2, height, width, dtype=torch.bool)
    padding_mask[1, :, 50:] = True  # right half of image 1 is padding
    images[1, :, :, 50:] = 0
    out = backbone(images, padding_mask)
    if backbone_type == "vit":
        out = [FeatureLevel(*pair) for pair in zip(*neck(out, padding_mask), strict=True)]
    assert len(out) == len(strides)
    multiple = backbone.size_multiple
    padded_h, padded_w = math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple
    for level, stride, channels in zip(out, strides, num_channels, strict=True):
        # Every level covers the (padded) input: about ceil(H / stride) rows, ceil(W / stride) columns.
        assert level.features.shape[:2] == (2, channels)
        h, w = level.features.shape[-2:]
        assert (h, w) == (math.ceil(padded_h / stride), math.ceil(padded_w / stride)), (stride, h, w)
        assert torch.isfinite(level.features).all()
        assert level.mask.dtype == torch.bool and level.mask.shape == (2, h, w)
        # Image 0: only the pixels the backbone added (bottom / right) are padding.
        real_h, real_w = math.ceil(height / stride), math.ceil(width / stride)
        assert not level.mask[0, : real_h - 1, : real_w - 1].any()
        # Image 1: padding from column 50 on, in feature pixels.
        column = 50 / stride
        assert level.mask[1, :, math.ceil(column) :].all()
        assert not level.mask[1, : real_h - 1, : int(column)].any()


def test_pad_to_multiple_marks_added_pixels_as_padding():
    images = torch.ones(1, 3, 5, 7)
    padding_mask = torch.zeros(1, 5, 7, dtype=torch.bool)
    padded, mask = pad_to_multiple(images, padding_mask, 4)
    assert padded.shape == (1, 3, 8, 8) and mask.shape == (1, 8, 8)
    assert padded[..., :5, :7].eq(1).all() and padded[..., 5:, :].eq(0).all() and padded[..., 7:].eq(0).all()
    assert mask[0, 5:].all() and mask[0, :, 7:].all() and not mask[0, :5, :7].any()
    same, same_mask = pad_to_multiple(padded, mask, 4)
    assert same is padded and same_mask is mask


def test_simple_feature_pyramid_resamples_one_map():
    torch.manual_seed(0)
    pyramid = SimpleFeaturePyramid(8, 4, (4, 2, 1, 0.5), extra_pool=True)
    x = torch.randn(2, 8, 6, 10)
    levels = pyramid(x)
    assert [tuple(level.shape) for level in levels] == [
        (2, 4, 24, 40),
        (2, 4, 12, 20),
        (2, 4, 6, 10),
        (2, 4, 3, 5),
        (2, 4, 2, 3),
    ]
    # The extra level is the stride-2 subsampling of the last branch (kernel-1 max pooling, ViTDet's p6).
    torch.testing.assert_close(levels[4], levels[3][..., ::2, ::2])
    # Branch layouts: transposed convolutions up, max pooling down, then 1x1 and 3x3 convs without bias.
    kinds = [[type(m).__name__ for m in branch] for branch in pyramid.branches]
    tail = ["Conv2d", "LayerNorm2d", "Conv2d", "LayerNorm2d"]
    assert kinds[0] == ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d", *tail]
    assert kinds[1] == ["ConvTranspose2d", *tail] and kinds[2] == tail and kinds[3] == ["MaxPool2d", *tail]
    assert pyramid.branches[0][3].out_channels == 2 and pyramid.branches[1][0].out_channels == 4
    assert all(branch[-2].bias is None for branch in pyramid.branches)
    with pytest.raises(ValueError, match="decreasing"):
        SimpleFeaturePyramid(8, 4, (1, 2))


def test_vit_padding_content_does_not_reach_real_tokens():
    """Patches that are all padding are masked out as attention keys: whatever those pixels hold, the
    ViT's tokens of the other patches are unchanged (same grid, so the same position embeddings)."""
    torch.manual_seed(0)
    backbone = ViTBackbone("vit_tiny_patch16_224", model_kwargs=TINY_VIT).eval()
    images = torch.randn(2, 3, 64, 96)
    padding_mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    padding_mask[1, 32:, :] = True  # image 1: bottom two patch rows are padding
    padding_mask[1, :, 72:] = True  # and the last 1.5 patch columns (column 4 is half real)
    other = images.clone()
    other[1, :, 32:, :] = 5.0  # other content in the patches that are all padding
    other[1, :, :, 80:] = 5.0
    with torch.no_grad():
        tokens = backbone.vit_map(images, padding_mask)  # (B, C, 4, 6)
        tokens_other = backbone.vit_map(other, padding_mask)
        unmasked = backbone.vit_map(images, None)
        unmasked_other = backbone.vit_map(other, None)
    assert tokens.shape == (2, 32, 4, 6)
    torch.testing.assert_close(tokens[0], tokens_other[0])
    torch.testing.assert_close(tokens[1, :, :2, :5], tokens_other[1, :, :2, :5])
    torch.testing.assert_close(tokens[0], unmasked[0])  # no padding: no mask, same result
    # Without the mask the padding content does leak (so the check above can fail).
    assert not torch.allclose(unmasked[1, :, :2, :5], unmasked_other[1, :, :2, :5])
    mask = backbone.token_attention_mask(padding_mask)
    assert mask.shape == (2, 1, 1, 1 + 24) and mask[:, 0, 0, 0].all()  # the class token is a key
    real = mask[1, 0, 0, 1:].view(4, 6)
    assert real[:2, :5].all() and not real[2:].any() and not real[:, 5].any()


def test_vit_map_matches_timm_and_does_not_depend_on_the_batch():
    """Unpadded, the ViT map is timm's own forward (`forward_intermediates`, the reference). Padded in a
    batch with a larger image, an image's real tokens stay as alone: its position embeddings follow its
    own patch grid and padding patches are no keys."""
    torch.manual_seed(0)
    backbone = ViTBackbone("vit_tiny_patch16_224", model_kwargs=TINY_VIT).eval()
    alone = torch.randn(1, 3, 48, 80)  # a 3 x 5 patch grid
    with torch.no_grad():
        reference = backbone.vit.forward_intermediates(
            alone, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )[0]
        torch.testing.assert_close(backbone.vit_map(alone, None), reference)
        torch.testing.assert_close(
            backbone.vit_map(alone, torch.zeros(1, 48, 80, dtype=torch.bool)), reference
        )

        # In a batch with a 96 x 64 image: padded to 96 x 80 (a 6 x 5 grid), image 0's bottom is padding.
        images = torch.zeros(2, 3, 96, 80)
        padding_mask = torch.ones(2, 96, 80, dtype=torch.bool)
        images[0, :, :48, :80], padding_mask[0, :48, :80] = alone[0], False
        images[1, :, :96, :64], padding_mask[1, :96, :64] = torch.randn(3, 96, 64), False
        batched = backbone.vit_map(images, padding_mask)
    assert batched.shape == (2, 32, 6, 5)
    torch.testing.assert_close(batched[0, :, :3, :5], reference[0], atol=1e-5, rtol=1e-4)
    # The same batch with timm's own forward (embeddings for the batch grid, padding as keys) differs.
    with torch.no_grad():
        timm_batched = backbone.vit.forward_intermediates(
            images, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )[0]
    assert not torch.allclose(timm_batched[0, :, :3, :5], reference[0], atol=1e-3)


def test_timm_and_vit_weights_from_a_local_file(tmp_path):
    """A timm state dict saved from the full model (classifier included, as ImageNet checkpoints) loads
    through timm's own file mechanism; nothing is downloaded."""
    torch.manual_seed(1)
    reference = timm.create_model("convnext_atto", **TINY_CONVNEXT)
    path = tmp_path / "convnext_atto.pth"
    torch.save(reference.state_dict(), path)
    backbone = TimmBackbone("convnext_atto", weights_path=path, model_kwargs=TINY_CONVNEXT)
    loaded = dict(backbone.model.named_parameters())
    torch.testing.assert_close(
        loaded["model.stages.2.blocks.0.conv_dw.weight"], reference.stages[2].blocks[0].conv_dw.weight
    )
    torch.testing.assert_close(loaded["model.stem.0.weight"], reference.stem[0].weight)

    vit_reference = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)
    vit_path = tmp_path / "vit.pth"
    torch.save(vit_reference.state_dict(), vit_path)
    vit = ViTBackbone("vit_tiny_patch16_224", weights_path=vit_path, model_kwargs=TINY_VIT)
    torch.testing.assert_close(vit.vit.pos_embed, vit_reference.pos_embed)
    torch.testing.assert_close(vit.vit.blocks[0].attn.qkv.weight, vit_reference.blocks[0].attn.qkv.weight)

    with pytest.raises(ValueError, match=r"convnext_atto\.pth does not fit timm model 'convnext_atto'"):
        TimmBackbone(
            "convnext_atto", weights_path=path, model_kwargs={**TINY_CONVNEXT, "dims": [8, 16, 32, 48]}
        )
    with pytest.raises(ValueError, match="missing.pth: backbone weights file not found"):
        TimmBackbone("convnext_atto", weights_path=tmp_path / "missing.pth")


def test_pretrained_asks_timm_for_its_weights(monkeypatch):
    calls = []
    real = timm.create_model

    def recording(name, **kwargs):
        calls.append(kwargs)
        return real(name, **{**kwargs, "pretrained": False})  # no download in tests

    monkeypatch.setattr(timm, "create_model", recording)
    TimmBackbone("convnext_atto", pretrained=True, model_kwargs=TINY_CONVNEXT)
    assert calls[-1]["pretrained"] is True and "pretrained_cfg_overlay" not in calls[-1]
    with pytest.raises(ValueError, match="not both"):
        TimmBackbone("convnext_atto", pretrained=True, weights_path="x.pth")


def test_bad_backbone_arguments():
    with pytest.raises(ValueError, match="unknown timm model 'convnext_nope'"):
        TimmBackbone("convnext_nope")
    with pytest.raises(ValueError, match=r"strides \[4, 8, 16, 32\], not \[64\]"):
        TimmBackbone("convnext_atto", strides=(8, 64), model_kwargs=TINY_CONVNEXT)
    with pytest.raises(ValueError, match="use the 'vit' backbone type"):
        TimmBackbone("vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    with pytest.raises(ValueError, match="not a plain timm VisionTransformer"):
        ViTBackbone("convnext_atto", model_kwargs=TINY_CONVNEXT)
    with pytest.raises(ValueError, match=r"simple-pyramid strides .* got \(8, 128\)"):
        build_simple_pyramid(
            in_channels=[32], strides=[16], level_strides=(8, 128), hidden_dim=32, group_norm=True
        )
    with pytest.raises(ValueError, match="patch dropout"):
        ViTBackbone("vit_tiny_patch16_224", model_kwargs={**TINY_VIT, "patch_drop_rate": 0.5})
    assert isinstance(build_backbone(load_config(overrides=overrides("resnet", 1)).model), ResNetBackbone)
