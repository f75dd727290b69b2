"""Parity with the official DETR (facebookresearch/detr) on the reference fixture.

The fixture holds the official model's outputs, matching, losses and detections for synthetic
weights rebuilt here from the stored key spec; the weights reach detr_lab through `load_official`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_lab.checkpoints import load_official
from detr_lab.models.build import build_criterion, build_postprocess

from factories import official_batch

pytestmark = pytest.mark.slow  # full-size R50 DETR built and run

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def parity(synth_weights):
    fixture = torch.load(FIXTURES / "detr_r50.pt", weights_only=True)
    state = synth_weights.synth_state_dict(dict(fixture["state_dict_spec"]), fixture["weights_seed"])
    model, cfg = load_official(state)
    images, padding_mask = official_batch(fixture)
    with torch.no_grad():
        outputs = model(images, padding_mask)
    return fixture, cfg, model, outputs


def test_inferred_config_is_the_official_r50(parity):
    _, cfg, model, _ = parity
    m = cfg.model
    assert (m.backbone.name, m.backbone.dilation, m.hidden_dim, m.ffn_dim) == ("resnet50", False, 256, 2048)
    assert (m.encoder.num_layers, m.decoder.num_layers, m.num_queries, m.num_classes) == (6, 6, 100, 91)
    assert not model.training


def test_outputs_match_every_layer(parity):
    fixture, _, _, outputs = parity
    expected = fixture["outputs"]
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs[key], expected[key], atol=1e-4, rtol=0)
    assert len(outputs["aux_outputs"]) == len(expected["aux_outputs"]) == 5
    for ours, theirs in zip(outputs["aux_outputs"], expected["aux_outputs"], strict=True):
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=0)


def test_matcher_indices_identical(parity):
    fixture, cfg, _, outputs = parity
    indices = build_criterion(cfg.model, cfg.loss).matcher(outputs, fixture["targets"])
    assert len(indices) == len(fixture["matcher_indices"])
    for (queries, targets), (ref_queries, ref_targets) in zip(
        indices, fixture["matcher_indices"], strict=True
    ):
        assert queries.tolist() == ref_queries.tolist()
        assert targets.tolist() == ref_targets.tolist()


def test_every_loss_term_and_total(parity):
    fixture, cfg, _, outputs = parity
    criterion = build_criterion(cfg.model, cfg.loss)
    losses = criterion(outputs, fixture["targets"])
    assert set(losses) == set(fixture["losses"])
    for name, expected in fixture["losses"].items():
        assert losses[name].item() == pytest.approx(expected, rel=1e-4, abs=1e-6), name
    assert criterion.weight_dict == fixture["weight_dict"]
    assert criterion.total_loss(losses).item() == pytest.approx(fixture["total_loss"], rel=1e-4)


def test_postprocessed_detections(parity):
    fixture, cfg, _, outputs = parity
    results = build_postprocess(cfg.model)(outputs, fixture["orig_sizes"])
    for ours, theirs in zip(results, fixture["postprocessed"], strict=True):
        assert ours["labels"].tolist() == theirs["labels"].tolist()
        torch.testing.assert_close(ours["scores"], theirs["scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-3, rtol=0)
