"""Parity with the official Deformable DETR (fundamentalvision/Deformable-DETR) on its fixtures.

Each fixture holds the official model's outputs (every decoder layer and, for two-stage, the
encoder proposals), matching, losses and detections for synthetic weights rebuilt here from the
stored key spec; the weights reach detr_lab through `load_official`, which infers the architecture.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_lab.checkpoints import CheckpointWarning, load_official
from detr_lab.models.build import build_criterion, build_postprocess
from detr_lab.models.detector import Detector

from factories import (
    layer_errors,
    matching_against_official,
    max_error,
    official_batch,
    tie_tolerant_box_distances,
)

pytestmark = pytest.mark.slow  # full-size R50 Deformable DETR built and run

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = ("deformable_detr_r50", "deformable_detr_r50_refine_twostage")
ATOL = 1e-4


@pytest.fixture(scope="module", params=NAMES)
def parity(request, synth_weights):
    fixture = torch.load(FIXTURES / f"{request.param}.pt", weights_only=True)
    state = synth_weights.synth_state_dict(dict(fixture["state_dict_spec"]), fixture["weights_seed"])
    # The synthetic weights give every official alias of a shared head its own values; the converter
    # keeps the ones the official model ends up with and says so.
    with pytest.warns(CheckpointWarning, match="alias a shared head"):
        model, cfg = load_official(state)
    images, padding_mask = official_batch(fixture)
    with torch.no_grad():
        outputs = model(images, padding_mask)
    return request.param, fixture, cfg, model, outputs


def test_inferred_config_is_the_official_recipe(parity):
    name, _, cfg, model, _ = parity
    m = cfg.model
    refine = name.endswith("refine_twostage")
    assert isinstance(model, Detector) and not model.training
    assert (m.backbone.name, m.backbone.dilation, m.hidden_dim, m.ffn_dim, m.num_heads) == (
        "resnet50",
        False,
        256,
        1024,
        8,
    )
    assert (m.num_feature_levels, m.encoder.num_points, m.decoder.num_points) == (4, 4, 4)
    assert (m.encoder.num_layers, m.decoder.num_layers, m.num_queries, m.num_classes) == (6, 6, 300, 91)
    assert (m.classification, m.box_refine, m.query_source == "proposals") == ("sigmoid", refine, refine)
    assert (m.encoder.attention, m.decoder.cross_attention) == ("deformable", "deformable")
    assert (cfg.loss.cost_class, cfg.loss.class_weight, cfg.loss.focal_alpha) == (2, 2, 0.25)


def test_outputs_match_every_layer_and_the_proposals(parity):
    name, fixture, _, _, outputs = parity
    expected = fixture["outputs"]
    assert len(outputs["aux_outputs"]) == len(expected["aux_outputs"]) == 5
    errors = layer_errors(outputs, expected)
    assert ("enc_outputs" in outputs) == ("enc_outputs" in expected) == name.endswith("twostage")
    if "enc_outputs" in expected:
        for key in ("pred_logits", "pred_boxes"):
            assert outputs["enc_outputs"][key].shape == expected["enc_outputs"][key].shape
            errors[f"{key}_enc"] = max_error(outputs["enc_outputs"][key], expected["enc_outputs"][key])
    assert max(errors.values()) < ATOL, errors


def test_matcher_indices_identical(parity):
    _, fixture, cfg, _, outputs = parity
    ours, official = matching_against_official(cfg, outputs, fixture)
    assert len(ours) == len(official) == 2
    assert ours == official


def test_every_loss_term_and_total(parity):
    _, fixture, cfg, _, outputs = parity
    criterion = build_criterion(cfg.model, cfg.loss)
    losses = criterion(outputs, fixture["targets"])
    assert set(losses) == set(fixture["losses"])
    for name, expected in fixture["losses"].items():
        assert losses[name].item() == pytest.approx(expected, rel=1e-4, abs=1e-6), name
    # The official weight dict also lists `_enc` terms for one-stage models, which never occur.
    for name in losses:
        if name in fixture["weight_dict"]:
            assert criterion.weight_dict[name] == fixture["weight_dict"][name], name
    assert criterion.total_loss(losses).item() == pytest.approx(fixture["total_loss"], rel=1e-4)


def test_postprocessed_detections(parity):
    _, fixture, cfg, _, outputs = parity
    results = build_postprocess(cfg.model)(outputs, fixture["orig_sizes"])
    for ours, theirs in zip(results, fixture["postprocessed"], strict=True):
        assert ours["labels"].tolist() == theirs["labels"].tolist()
        torch.testing.assert_close(ours["scores"], theirs["scores"], atol=ATOL, rtol=0)
        # Equal scores of one class (float32 ties) may come out of top-k in either order: each box
        # must be the official box of the same rank or of a tied one.
        for rank, distance in enumerate(tie_tolerant_box_distances(ours, theirs, tie=1e-6)):
            assert distance < 1e-3, (rank, ours["boxes"][rank], distance)
