"""One training step of every attention combination the config allows, on tiny models.

Encoder self-attention {plain, deformable, act} x decoder cross-attention {plain, deformable}, over
1 to 4 feature levels, both classification heads, with box refinement and two-stage: each builds
from YAML-style overrides, gives outputs of the documented shapes, a finite loss whose gradient
reaches every trainable parameter (and is finite), and survives an optimizer step.
"""

from __future__ import annotations

import pytest
import torch

from detr_lab.config import load_config
from detr_lab.models.build import build_criterion, build_model, build_postprocess
from detr_lab.models.detector import Detector

from factories import tiny_batch, tiny_overrides

TINY = tiny_overrides(
    "model.encoder.act.q_hashes=4",
    encoder__num_points=2, decoder__num_points=3, num_queries=8, num_classes=5,
)
HEIGHT, WIDTH = 64, 96
STRIDES = {1: [32], 2: [16, 32], 3: [8, 16, 32], 4: [8, 16, 32, 64]}

# (encoder attention, decoder cross-attention, levels, classification, extra overrides)
COMBINATIONS = [
    ("plain", "plain", 2, "sigmoid", []),
    ("plain", "deformable", 1, "sigmoid", []),
    ("deformable", "plain", 4, "softmax", []),
    ("deformable", "deformable", 4, "sigmoid", []),
    ("deformable", "deformable", 2, "sigmoid", ["model.box_refine=true"]),
    ("deformable", "deformable", 4, "sigmoid", ["model.box_refine=true", "model.query_source=proposals"]),
    ("act", "plain", 1, "softmax", []),
    ("act", "deformable", 3, "sigmoid", []),
]


def _combination_id(encoder: str, decoder: str, levels: int, classification: str, extra: list[str]) -> str:
    options = [
        item.split("=")[0].rsplit(".", 1)[-1] for item in extra
    ]  # "model.box_refine=true" -> box_refine
    return "-".join([encoder, decoder, f"{levels}levels", classification, *options])


def _token_count(levels: int) -> int:
    return sum(-(-HEIGHT // s) * -(-WIDTH // s) for s in STRIDES[levels])


@pytest.mark.parametrize(
    ("encoder", "decoder", "levels", "classification", "extra"),
    COMBINATIONS,
    ids=[_combination_id(*combination) for combination in COMBINATIONS],
)
def test_train_step(encoder, decoder, levels, classification, extra):
    cfg = load_config(
        overrides=[
            *TINY,
            f"model.encoder.attention={encoder}",
            f"model.decoder.cross_attention={decoder}",
            f"model.num_feature_levels={levels}",
            f"model.classification={classification}",
            *extra,
        ]
    )
    two_stage = cfg.model.query_source == "proposals"
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    assert isinstance(model, Detector)
    criterion = build_criterion(cfg.model, cfg.loss)
    images, padding_mask, targets = tiny_batch(height=HEIGHT, width=WIDTH, padded_from_col=72)

    outputs = model(images, padding_mask, return_memory=True)
    num_logits = 5 if classification == "sigmoid" else 6
    assert tuple(outputs["pred_logits"].shape) == (2, 8, num_logits)
    assert tuple(outputs["pred_boxes"].shape) == (2, 8, 4)
    assert len(outputs["aux_outputs"]) == 1 and outputs["aux_outputs"][0]["pred_boxes"].shape == (2, 8, 4)
    tokens = _token_count(levels)
    assert tuple(outputs["memory"].shape) == (2, tokens, 32)
    assert ("enc_outputs" in outputs) == two_stage
    if two_stage:
        assert tuple(outputs["enc_outputs"]["pred_logits"].shape) == (2, tokens, num_logits)

    losses = criterion(outputs, targets)
    assert ("loss_ce_enc" in losses) == two_stage and "loss_giou_0" in losses
    total = criterion.total_loss(losses)
    assert torch.isfinite(total)
    total.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    without = [name for name, p in trainable.items() if p.grad is None]
    assert not without, f"parameters outside the graph: {without[:5]}"
    not_finite = [name for name, p in trainable.items() if not torch.isfinite(p.grad).all()]
    assert not not_finite, not_finite[:5]
    encoder_out = "output_proj" if encoder == "deformable" else "out_proj"
    decoder_value = "value_proj" if decoder == "deformable" else "v_proj"
    for name in (
        f"transformer.encoder.layers.0.self_attn.{encoder_out}.weight",
        f"transformer.decoder.layers.1.cross_attn.{decoder_value}.weight",
        "neck.input_proj.0.0.weight"
        if levels > 1 or "deformable" in (encoder, decoder)
        else "neck.input_proj.0.weight",
        "backbone.body.layer2.0.conv1.weight",
    ):
        assert trainable[name].grad.abs().sum() > 0, name
    assert "backbone.body.layer1.0.conv1.weight" not in trainable  # frozen as the reference models

    before = {name: p.detach().clone() for name, p in trainable.items()}
    torch.optim.AdamW(trainable.values(), lr=1e-3).step()
    assert any(not torch.equal(before[name], p) for name, p in trainable.items())
    model.eval()
    with torch.no_grad():
        detections = build_postprocess(cfg.model)(model(images, padding_mask), torch.tensor([[480, 640]] * 2))
    assert all(torch.isfinite(d["boxes"]).all() and len(d["scores"]) == len(d["labels"]) for d in detections)
