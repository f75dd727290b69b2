from __future__ import annotations

import pytest
import torch

from detr_lab.config import load_config
from detr_lab.models.build import build_criterion, build_model

from conftest import tiny_batch, tiny_overrides

TINY = tiny_overrides(encoder__num_layers=2, num_queries=10, num_classes=5)


def test_tiny_model_forward_backward():
    cfg = load_config(overrides=TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    criterion = build_criterion(cfg.model, cfg.loss)
    images, padding_mask, targets = tiny_batch()
    outputs = model(images, padding_mask)
    assert tuple(outputs["pred_logits"].shape) == (2, 10, 6)
    assert tuple(outputs["pred_boxes"].shape) == (2, 10, 4)
    assert ((outputs["pred_boxes"] >= 0) & (outputs["pred_boxes"] <= 1)).all()
    assert len(outputs["aux_outputs"]) == 1
    assert tuple(outputs["aux_outputs"][0]["pred_logits"].shape) == (2, 10, 6)
    assert "memory" not in outputs

    total = criterion.total_loss(criterion(outputs, targets))
    assert torch.isfinite(total)
    total.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in (
        "query_embed.weight",
        "class_embed.weight",
        "bbox_embed.layers.0.weight",
        "input_proj.0.weight",
        "transformer.encoder.layers.0.self_attn.q_proj.weight",
        "transformer.decoder.layers.1.cross_attn.v_proj.weight",
        "backbone.body.layer2.0.conv1.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert grads["backbone.body.layer1.0.conv1.weight"] is None  # frozen as DETR


def test_return_memory_gives_encoder_output_and_mask():
    cfg = load_config(overrides=TINY)
    model = build_model(cfg.model).eval()
    images, padding_mask, _ = tiny_batch()
    with torch.no_grad():
        outputs = model(images, padding_mask, return_memory=True)
    # stride 32: 64x96 -> 2x3 tokens sampled at pixels (0|32, 0|32|64); image 1 is valid on rows < 40
    # and columns < 64, so its last column of tokens is padding
    assert tuple(outputs["memory"].shape) == (2, 6, 32)
    assert outputs["memory_padding_mask"].tolist() == [[False] * 6, [False, False, True, False, False, True]]


def test_eval_outputs_are_deterministic_and_aux_can_be_disabled():
    cfg = load_config(overrides=[*TINY, "model.aux_loss=false"])
    model = build_model(cfg.model).eval()
    images, padding_mask, _ = tiny_batch()
    with torch.no_grad():
        first, second = model(images, padding_mask), model(images, padding_mask)
    torch.testing.assert_close(first["pred_logits"], second["pred_logits"])
    assert first["aux_outputs"] == []


def test_detector_checks_projection_count():
    from detr_lab.models.detector import Detector

    cfg = load_config(overrides=TINY)
    model = build_model(cfg.model)
    with pytest.raises(ValueError, match="one input projection per backbone level"):
        Detector(
            backbone=model.backbone,
            position_encoding=model.position_encoding,
            transformer=model.transformer,
            input_proj=[],
            num_classes=5,
            num_queries=10,
        )
