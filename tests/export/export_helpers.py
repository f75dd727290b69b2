"""Export tests: tiny checkpoints (random weights, hidden 32-64, resnet18) and a tiny synthetic set."""

from __future__ import annotations

import torch

from detr_lab.checkpoints import save_checkpoint
from detr_lab.config import load_config
from detr_lab.models.build import build_model

from factories import synthetic_data_yaml, tiny_overrides

CLASS_NAMES = ["circle", "square", "triangle", "cross", "ring", "star"]
CATEGORY_IDS = [1, 2, 3, 5, 8, 13]

DATA_YAML = synthetic_data_yaml(
    2, 4, augment="{{train_scales: [64], max_size: 96, eval_size: 64, eval_max_size: 96}}"
) + """
trainer: {{output_dir: {root}/run, accelerator: cpu}}
"""

TINY = tiny_overrides(
    "data.augment.eval_size=64", "data.augment.eval_max_size=96",
    num_classes=6, num_heads=2, dropout=0.0, num_queries=7,
)

# name -> (base config, extra overrides); hidden 64 where GroupNorm(32) meets 1x1 levels of 64 px images
VARIANTS = {
    "detr": ("configs/detr_r50.yaml", []),
    "deformable": ("configs/deformable.yaml", ["model.hidden_dim=64"]),
    "single_scale": ("configs/deformable_single_scale.yaml", []),
    "refine": ("configs/deformable_refine.yaml", ["model.hidden_dim=64", "model.num_feature_levels=2"]),
    "two_stage": ("configs/deformable_refine_two_stage.yaml", ["model.hidden_dim=64"]),
    "dino": ("configs/dino_4scale.yaml", ["model.hidden_dim=64", "model.ffn_dim=64"]),
}


def make_checkpoint(directory, variant: str, extra: list[str] | None = None, seed: int = 0):
    base, overrides = VARIANTS[variant]
    cfg = load_config(base, [*TINY, *overrides, *(extra or [])])
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    return save_checkpoint(directory / f"{variant}.ckpt", model, cfg, CATEGORY_IDS, CLASS_NAMES)
