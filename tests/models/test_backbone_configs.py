"""Backbone selection in the config: the ViT and ConvNeXt demo configs each train a step (Lightning, synthetic
set, tiny widths); ResNet-only and ViT-only keys are refused for other backbone types, naming the key."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from detr_lab.checkpoints import load_checkpoint
from detr_lab.config import ConfigError, load_config
from detr_lab.engine.trainer import train
from detr_lab.models.backbones import TimmBackbone, ViTBackbone
from detr_lab.models.build import build_model
from detr_lab.models.optimize import optimize_for_inference

from factories import tiny_overrides

# The demo configs at test size: a 2-image synthetic set of 64-pixel images, one training step.
TINY_RUN = tiny_overrides(
    "data.batch_size=2",
    "data.synthetic.num_train=2",
    "data.synthetic.num_val=2",
    "data.synthetic.image_size=64",
    "data.augment.train_scales=[48,64]",
    "data.augment.max_size=80",
    "data.augment.crop_prob=0.0",
    "data.augment.eval_size=64",
    "data.augment.eval_max_size=80",
    "trainer.max_steps=1",
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=2",  # no validation pass
    "trainer.log_every_n_steps=1",
    # the demo's backbone and classes stay
    backbone__name=None, backbone__pretrained=None, num_classes=None,
    num_heads=2, num_queries=5, decoder__num_layers=1,
)  # fmt: skip
DEMOS = {
    "demo_vit": (
        ViTBackbone,
        [
            "model.backbone.timm_kwargs.embed_dim=32",
            "model.backbone.timm_kwargs.depth=1",
            "model.backbone.timm_kwargs.num_heads=2",
            "model.neck.type=simple_pyramid", "model.neck.options.channels=16",
        ],
    ),
    "demo_convnext": (
        TimmBackbone,
        ["model.backbone.timm_kwargs.dims=[8,16,32,64]", "model.backbone.timm_kwargs.depths=[1,1,1,1]"],
    ),
}


class CaptureBackbone(Callback):
    """Keeps the training module and its backbone weights as they were before the first step."""

    def on_fit_start(self, trainer, module):
        self.module = module
        self.before = {k: v.detach().clone() for k, v in module.model.backbone.state_dict().items()}


@pytest.mark.parametrize("demo", list(DEMOS))
def test_demo_backbone_config_trains_a_step(demo, tmp_path):
    backbone_class, widths = DEMOS[demo]
    cfg = load_config(
        f"configs/{demo}.yaml",
        [*TINY_RUN, *widths, f"data.root={tmp_path}/data", f"trainer.output_dir={tmp_path}/run"],
    )
    assert cfg.model.num_feature_levels == 4
    torch.manual_seed(0)
    capture = CaptureBackbone()
    trainer = train(cfg, callbacks=[capture], progress_bar=False)
    assert trainer.global_step == 1
    model = capture.module.model
    assert isinstance(model.backbone, backbone_class)
    after = model.backbone.state_dict()
    changed = [k for k, v in capture.before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert changed, "the step did not update the backbone"
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    # The checkpoint rebuilds the same backbone from its stored config (timm_kwargs included) and,
    # optimized for inference, the model predicts as the trained one.
    loaded = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert isinstance(loaded.model.backbone, backbone_class)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 70, 90)
    padding_mask = torch.zeros(2, 70, 90, dtype=torch.bool)
    padding_mask[1, 40:] = True
    model.eval()
    with torch.no_grad():
        expected = model(images, padding_mask)
        got = loaded.model(images, padding_mask)
        optimized = optimize_for_inference(loaded.model)(images, padding_mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key])
        torch.testing.assert_close(optimized[key], expected[key], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("config", "backbone_class", "widths"),
    [
        ("deformable_convnext_t", TimmBackbone, DEMOS["demo_convnext"][1]),
        ("deformable_vit_b", ViTBackbone, DEMOS["demo_vit"][1]),
    ],
)
def test_coco_backbone_configs_build(config, backbone_class, widths):
    """The COCO recipes with timm backbones validate and build (pretrained off, tiny widths: no download)."""
    cfg = load_config(f"configs/{config}.yaml", [*widths, "model.backbone.pretrained=false"])
    assert cfg.model.backbone.timm_kwargs["drop_path_rate"] == 0.1
    model = build_model(cfg.model)
    assert isinstance(model.backbone, backbone_class) and len(model.neck.input_proj) == 4
    # The ViT gives one stride-16 map; its simple-pyramid neck makes the four levels.
    assert model.backbone.strides == ([16] if backbone_class is ViTBackbone else [8, 16, 32])
    pyramid = cfg.model.neck.type == "simple_pyramid"
    assert model.neck.num_levels == 4 and pyramid == (backbone_class is ViTBackbone)


@pytest.mark.parametrize("key", ["dilation=true", "frozen_stages=0", "norm=batch_norm"])
@pytest.mark.parametrize("backbone_type", ["timm", "vit"])
def test_resnet_only_keys_are_refused_for_other_types(backbone_type, key):
    name = key.split("=")[0]
    with pytest.raises(
        ConfigError, match=rf"'model\.backbone\.{name}' applies to 'model\.backbone\.type: resnet'"
    ):
        load_config(overrides=[f"model.backbone.type={backbone_type}", f"model.backbone.{key}"])


def test_backbone_type_rules():
    with pytest.raises(ConfigError, match=r"'model\.backbone\.pyramid_channels' was replaced by .*pyramid"):
        load_config(overrides=["model.backbone.type=timm", "model.backbone.pyramid_channels=64"])
    with pytest.raises(ConfigError, match=r"'model\.backbone\.name' is 'convnext_atto'; a resnet backbone"):
        load_config(overrides=["model.backbone.name=convnext_atto"])
    with pytest.raises(ConfigError, match=r"did you mean 'resnet50'"):
        load_config(overrides=["model.backbone.name=resnet05"])
    with pytest.raises(ConfigError, match=r"'convnext_tiy', not a timm model; did you mean"):
        load_config(overrides=["model.backbone.type=timm", "model.backbone.name=convnext_tiy"])
    with pytest.raises(ConfigError, match=r"'model\.backbone\.timm_kwargs' applies to the timm and vit"):
        load_config(overrides=["model.backbone.timm_kwargs.depth=2"])
    with pytest.raises(ConfigError, match=r"'model\.backbone\.dilation' \(DC5\) needs a bottleneck"):
        load_config(overrides=["model.backbone.name=resnet18", "model.backbone.dilation=true"])
    with pytest.raises(
        ConfigError,
        match=r"'model\.backbone\.type' is 'vgg'; expected one of: resnet, resnet_vd, timm, vit, hgnetv2",
    ):
        load_config(overrides=["model.backbone.type=vgg"])
    with pytest.raises(
        ConfigError, match="either 'model.backbone.pretrained' or 'model.backbone.weights_path'"
    ):
        load_config(overrides=["model.backbone.pretrained=true", "model.backbone.weights_path=x.pth"])
    with pytest.raises(ConfigError, match=r"'model\.backbone\.norm' is 'group_norm'"):
        load_config(overrides=["model.backbone.norm=group_norm"])
    # ResNet keys left unset take the ResNet defaults; the same keys set to null are fine for timm.
    cfg = load_config(overrides=["model.backbone.type=timm", "model.backbone.name=convnext_atto"])
    assert (cfg.model.backbone.dilation, cfg.model.backbone.frozen_stages, cfg.model.backbone.norm) == (
        None,
    ) * 3


def test_the_vit_pyramid_neck_trains_at_the_backbone_rate():
    """As when the pyramid was part of the ViT backbone: runs saved then keep their parameter groups."""
    from detr_lab.config import load_config as load
    from detr_lab.engine.optim import build_param_groups

    cfg = load("configs/demo_vit.yaml", [*DEMOS["demo_vit"][1], "optim.lr_backbone=1e-5"])
    model = build_model(cfg.model)
    groups = {group["name"]: group["param_names"] for group in build_param_groups(model, cfg.optim)}
    backbone = [name for group, names in groups.items() if group.startswith("backbone") for name in names]
    assert any(name.startswith("neck.pyramid.") for name in backbone)
    assert not any(name.startswith("neck.input_proj.") for name in backbone)
