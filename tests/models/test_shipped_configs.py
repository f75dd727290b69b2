"""Every YAML under configs/ is built, not only loaded: at tiny width, each config's own parts
(backbone type, neck, attention variants, query source, heads, denoising, loss terms) make a model
and a criterion that run a training step and post-processing on a tiny batch."""

from __future__ import annotations

import pytest
import torch

from detr_lab.config import load_config
from detr_lab.models.build import build_criterion, build_model, build_postprocess

from factories import REPO, tiny_batch

CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))
# The width of every shipped config shrunk; depths cut to one encoder and two decoder layers.
SHRINK = [
    "model.hidden_dim=32", "model.num_heads=2", "model.ffn_dim=64", "model.num_queries=6",
    "model.decoder.num_layers=2", "model.backbone.pretrained=false",
    "model.backbone.weights_path=null", "model.denoising.dn_number=4",
]  # fmt: skip
# Each backbone at tiny width (no downloads: random weights).
TINY_BACKBONES = {
    "resnet": ["model.backbone.name=resnet18"],
    "resnet_vd": ["model.backbone.name=resnet18"],
    "hgnetv2": ["model.backbone.name=hgnetv2_b0"],
    "timm": ["model.backbone.timm_kwargs.dims=[8,16,32,64]", "model.backbone.timm_kwargs.depths=[1,1,1,1]",
             "model.backbone.name=convnext_atto"],  # fmt: skip
    "vit": ["model.backbone.name=vit_tiny_patch16_224", "model.backbone.timm_kwargs.embed_dim=32",
            "model.backbone.timm_kwargs.depth=1", "model.backbone.timm_kwargs.num_heads=2",
            "model.neck.options.channels=32"],  # fmt: skip
}


def _tiny(path):
    shipped = load_config(path)
    backbone = TINY_BACKBONES[shipped.model.backbone.type]
    if shipped.model.backbone.type == "resnet" and shipped.model.backbone.dilation:
        backbone = ["model.backbone.name=resnet50"]  # DC5 needs a bottleneck ResNet
    # One encoder layer, none where the config has none (RT-DETR: the hybrid-encoder neck encodes).
    layers = [f"model.encoder.num_layers={min(1, shipped.model.encoder.num_layers)}"]
    neck = [f"model.neck.options.{key}=64" for key in ("ffn_dim",) if key in shipped.model.neck.options]
    neck += [f"model.neck.options.{key}=32" for key in ("width",) if key in shipped.model.neck.options]
    evaluation = ["model.decoder.eval_layers=2"] if shipped.model.decoder.eval_layers else []
    return shipped, load_config(path, overrides=[*SHRINK, *layers, *backbone, *neck, *evaluation])


def test_every_shipped_config_is_covered():
    assert len(CONFIGS) >= 20 and {p.stem for p in CONFIGS} >= {"demo", "detr_r50", "dino_4scale"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_builds_and_trains_a_step(path):
    shipped, cfg = _tiny(path)
    m = cfg.model
    # Only widths, depths, query counts and the backbone size changed: the parts are the config's own.
    for key in ("query_source", "box_refine", "share_heads", "classification", "num_feature_levels"):
        assert getattr(m, key) == getattr(shipped.model, key), key
    assert (m.encoder.attention, m.decoder.cross_attention, m.neck.type) == (
        shipped.model.encoder.attention, shipped.model.decoder.cross_attention, shipped.model.neck.type
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(m).train()
    criterion = build_criterion(m, cfg.loss)
    images, padding_mask, targets = tiny_batch(height=128, width=160, padded_from_row=96, padded_from_col=128)
    targets = [{**t, "labels": t["labels"] % m.num_classes} for t in targets]
    outputs = model(images, padding_mask, targets=targets)
    losses = criterion(outputs, targets)
    assert set(criterion.weight_dict) <= set(losses)
    total = criterion.total_loss(losses)
    assert torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.class_embed.parameters())
    model.eval()
    with torch.no_grad():
        detections = build_postprocess(m)(model(images, padding_mask), torch.tensor([[128, 160]] * 2))
    assert len(detections) == 2 and all(torch.isfinite(d["boxes"]).all() for d in detections)
