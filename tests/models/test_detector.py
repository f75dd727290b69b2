from __future__ import annotations

import pytest
import torch

from detr_lab.config import load_config
from detr_lab.models.build import build_criterion, build_model

from factories import tiny_batch, tiny_overrides

TINY = tiny_overrides(encoder__num_layers=2, num_queries=10, num_classes=5)


def test_each_image_is_detected_on_its_own():
    """In eval mode an image's outputs do not depend on the other images of its batch (their content or
    padding): no attention, norm or reshape mixes the batch."""
    torch.manual_seed(0)
    model = build_model(load_config(overrides=TINY).model).eval()
    images, padding_mask, _ = tiny_batch()
    others = torch.randn_like(images[1:])
    other_mask = torch.zeros_like(padding_mask[1:])
    other_mask[:, 32:, :] = True
    with torch.no_grad():
        together = model(images, padding_mask)
        swapped = model(torch.cat([images[:1], others]), torch.cat([padding_mask[:1], other_mask]))
        alone = model(images[:1], padding_mask[:1])
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(swapped[key][0], together[key][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone[key][0], together[key][0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(swapped["pred_logits"][1], together["pred_logits"][1])


def test_tiny_model_forward_backward():
    cfg = load_config(overrides=TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    criterion = build_criterion(cfg.model, cfg.loss)
    images, padding_mask, targets = tiny_batch()
    outputs = model(images, padding_mask)
    assert tuple(outputs["pred_logits"].shape) == (2, 10, 6)
    assert tuple(outputs["pred_boxes"].shape) == (2, 10, 4)
    assert len(outputs["aux_outputs"]) == 1
    assert tuple(outputs["aux_outputs"][0]["pred_logits"].shape) == (2, 10, 6)
    assert "memory" not in outputs

    total = criterion.total_loss(criterion(outputs, targets))
    assert torch.isfinite(total)
    total.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in (
        "query_source.query_embed.weight",
        "class_embed.weight",
        "bbox_embed.layers.0.weight",
        "neck.input_proj.0.weight",
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


def test_projection_neck_checks_projection_count():
    from detr_lab.models.necks.projection import InputProjections

    with pytest.raises(ValueError, match="one input projection per backbone level"):
        InputProjections([], num_backbone_levels=1)
