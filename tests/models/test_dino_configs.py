"""The DINO configs load, describe the official recipe, and build (the demo ones also train a step)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_lab.config import load_config
from detr_lab.engine.optim import build_optimizer
from detr_lab.models.build import build_criterion, build_model, build_postprocess
from detr_lab.models.detector import Detector

from factories import architecture_differences, official_reference

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_dino_4scale_is_the_official_recipe():
    """The model section is what detr_lab infers from the official DINO-4scale checkpoint's keys and
    shapes (tests/fixtures) and the loss weights those of the official `weight_dict`; the schedule
    (not recoverable from weights) is the official 12-epoch recipe of IDEA-Research/DINO."""
    cfg = load_config(CONFIGS / "dino_4scale.yaml")
    m, o = cfg.model, cfg.optim
    inferred, weight_dict = official_reference("dino_4scale_r50")
    assert architecture_differences(cfg, inferred) == {}
    assert (cfg.loss.class_weight, cfg.loss.bbox_weight, cfg.loss.giou_weight) == (
        weight_dict["loss_ce"], weight_dict["loss_bbox"], weight_dict["loss_giou"]
    )  # fmt: skip
    assert (m.denoising.enabled, m.denoising.dn_number) == (True, 100)
    assert (o.lr, o.lr_backbone, o.lr_multipliers, o.lr_drop_epochs, o.clip_grad_norm) == (
        1e-4,
        1e-5,
        {"sampling_offsets": 0.1},
        [11],
        0.1,
    )
    assert (cfg.data.batch_size, cfg.trainer.devices, cfg.trainer.max_epochs) == (2, "8", 12)
    assert load_config(CONFIGS / "dino_5scale.yaml").model.num_feature_levels == 5


@pytest.mark.parametrize("name", ["dino_4scale", "dino_5scale"])
def test_full_configs_build(name):
    cfg = load_config(CONFIGS / f"{name}.yaml", ["model.backbone.pretrained=false"])
    model = build_model(cfg.model)
    assert isinstance(model, Detector) and model.query_source.content.weight.shape == (900, 256)
    levels = cfg.model.num_feature_levels
    assert len(model.neck.input_proj) == levels and len(model.backbone.num_channels) == levels - 1
    build_optimizer(model, cfg.optim)  # every lr multiplier names a parameter
    assert build_postprocess(cfg.model).num_top == 300


@pytest.mark.parametrize("name", ["demo_dino", "demo_denoising"])
def test_demo_configs_train_a_step(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    criterion = build_criterion(cfg.model, cfg.loss)
    optimizer = build_optimizer(model, cfg.optim)
    images = torch.randn(2, 3, 96, 96)
    padding_mask = torch.zeros(2, 96, 96, dtype=torch.bool)
    targets = [
        {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.2, 0.3, 0.1, 0.1]])},
        {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.3]])},
    ]
    outputs = model(images, padding_mask, targets=targets)
    losses = criterion(outputs, targets)
    mixed = cfg.model.query_source == "mixed_selection"
    assert "loss_bbox_dn" in losses and ("loss_ce_enc" in losses) == mixed
    criterion.total_loss(losses).backward()
    optimizer.step()
