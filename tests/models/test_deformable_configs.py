"""The Deformable DETR configs: the official recipe, its variants, and the CPU demo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_lab.config import config_to_dict, load_config
from detr_lab.engine.optim import build_param_groups
from detr_lab.models.build import build_criterion, build_model

from factories import architecture_differences, official_reference, tiny_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_MODEL = tiny_overrides(num_queries=8, num_classes=None)  # classes: the YAML's


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "lr_multipliers":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize(
    ("name", "official"),
    [
        ("detr_r50", "detr_r50"),
        ("deformable", "deformable_detr_r50"),
        ("deformable_refine_two_stage", "deformable_detr_r50_refine_twostage"),
    ],
)
def test_recipe_matches_the_official_checkpoint(name, official):
    """The model section is the architecture detr_lab infers from the official checkpoint's keys and
    shapes (tests/fixtures), and the loss weights are those of the official code's `weight_dict`."""
    cfg = load_config(CONFIGS / f"{name}.yaml")
    inferred, weight_dict = official_reference(official)
    assert architecture_differences(cfg, inferred) == {}
    loss = cfg.loss
    assert (loss.class_weight, loss.bbox_weight, loss.giou_weight) == (
        weight_dict["loss_ce"],
        weight_dict["loss_bbox"],
        weight_dict["loss_giou"],
    )
    aux_layers = {key.rsplit("_", 1)[1] for key in weight_dict if key.rsplit("_", 1)[1].isdigit()}
    assert len(aux_layers) == cfg.model.decoder.num_layers - 1 and cfg.model.aux_loss


def test_optimisation_is_the_official_training_recipe():
    """The argparse defaults of the official Deformable DETR `main.py` (fundamentalvision/Deformable-DETR):
    lr 2e-4, lr_backbone 2e-5, lr_linear_proj_mult 0.1 on sampling_offsets and reference_points,
    weight_decay 1e-4, clip_max_norm 0.1, lr_drop 40, epochs 50 (not recoverable from a checkpoint)."""
    optim = load_config(CONFIGS / "deformable.yaml").optim
    assert (optim.lr, optim.lr_backbone, optim.weight_decay, optim.clip_grad_norm) == (2e-4, 2e-5, 1e-4, 0.1)
    assert optim.lr_multipliers == {"sampling_offsets": 0.1, "reference_points": 0.1}
    assert (optim.lr_drop_epochs, optim.lr_drop_factor) == ([40], 0.1)
    assert load_config(CONFIGS / "deformable.yaml").trainer.max_epochs == 50


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("deformable_single_scale", {"model.num_feature_levels": 1}),
        ("deformable_single_scale_dc5", {"model.num_feature_levels": 1, "model.backbone.dilation": True}),
        ("deformable_refine", {"model.box_refine": True}),
        (
            "deformable_refine_two_stage",
            {
                "model.box_refine": True,
                "model.query_source": "proposals",
                "optim.lr_multipliers": {"sampling_offsets": 0.1},  # no reference-point layer
            },
        ),
    ],
)
def test_variants_change_only_their_option(name, changes):
    base = _flat(config_to_dict(load_config(CONFIGS / "deformable.yaml")))
    variant = _flat(config_to_dict(load_config(CONFIGS / f"{name}.yaml")))
    differences = {key: value for key, value in variant.items() if base[key] != value}
    assert differences == {**changes, "trainer.output_dir": f"runs/{name}"}


@pytest.mark.parametrize("name", ["deformable", "deformable_refine_two_stage"])
def test_lr_multipliers_match_the_parameters_they_name(name):
    cfg = load_config(CONFIGS / f"{name}.yaml", overrides=TINY_MODEL)
    groups = {group["name"]: group for group in build_param_groups(build_model(cfg.model), cfg.optim)}
    offsets = groups["default*sampling_offsets"]
    assert (
        offsets["lr"] == pytest.approx(2e-5) and len(offsets["param_names"]) == 2 * 3
    )  # weight+bias, 3 layers
    if name == "deformable":
        assert groups["default*reference_points"]["param_names"] == [
            "query_source.reference_points_head.weight",
            "query_source.reference_points_head.bias",
        ]
    else:
        assert not any("reference_points" in group for group in groups)
    assert groups["backbone"]["lr"] == pytest.approx(2e-5)


def test_demo_config_builds_and_runs_on_the_cpu():
    cfg = load_config(CONFIGS / "demo_deformable.yaml")
    detr_demo = load_config(CONFIGS / "demo_detr.yaml")
    assert (cfg.data, cfg.trainer.accelerator) == (detr_demo.data, "cpu")
    assert cfg.data.dataset == "synthetic" and not cfg.model.backbone.pretrained
    assert (cfg.model.encoder.attention, cfg.model.decoder.cross_attention) == ("deformable", "deformable")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    criterion = build_criterion(cfg.model, cfg.loss)
    images = torch.randn(2, 3, 128, 160)
    outputs = model(images, torch.zeros(2, 128, 160, dtype=torch.bool))
    assert tuple(outputs["pred_logits"].shape) == (2, cfg.model.num_queries, cfg.model.num_classes)
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}] * 2
    assert torch.isfinite(criterion.total_loss(criterion(outputs, targets)))
