"""D-FINE-S, D-FINE-M and DEIM-D-FINE-N against the official code through `load_official`, beyond the
D-FINE-N of test_dfine_parity.py: D-FINE-S (HGNetv2-B0 on three levels, width 256) on 288 x 352 images,
D-FINE-M (HGNetv2-B2, 4 decoder layers) on 320 x 288 and DEIM-D-FINE-N (SiLU heads, the MAL loss; the
loader is told `recipe="deim"`, which the weights cannot tell) on 256 x 320.

The fixtures in tests/fixtures/dfine_variants/ were written by make_fixtures.py there, which runs the
official Peterande/D-FINE and ShihuaHuang95/DEIM code (not imported here). The checks and the near-tie
rule are those of test_dfine_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_lab.checkpoints import load_official
from detr_lab.models.build import build_criterion, build_postprocess
from detr_lab.models.queries import mixed

from factories import (
    FIXTURES,
    aligned_rows,
    max_error,
    near_tie_alignment,
    official_anchor_proposals,
    official_batch,
    rtdetr_fixture_state,
    run_with_selection,
)

ATOL = 1e-4
TIE = 1e-5
VARIANTS = FIXTURES / "dfine_variants"
# What each official config says: backbone, levels, width, decoder layers, activation, classification loss.
EXPECTED = {
    "dfine_s": ("hgnetv2_b0", 3, 256, 3, "relu", "vfl"),
    "dfine_m": ("hgnetv2_b2", 3, 256, 4, "relu", "vfl"),
    "deim_dfine_n": ("hgnetv2_b0", 2, 128, 3, "silu", "mal"),
}


def official_name(name: str) -> str:
    return name.replace("_aux_", "_").replace("_enc_0", "_enc")


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def variant(request):
    fixture = torch.load(VARIANTS / f"{request.param}.pt", weights_only=True)
    model, cfg = load_official(rtdetr_fixture_state(fixture), **fixture["load_official_overrides"])
    images, padding_mask = official_batch(fixture)
    return request.param, fixture, model, cfg, images, padding_mask


def test_inferred_config(variant):
    name, _, _, cfg, _, _ = variant
    m = cfg.model
    found = (m.backbone.name, m.num_feature_levels, m.hidden_dim, m.decoder.num_layers, m.decoder.activation,
             cfg.loss.terms[0])  # fmt: skip
    assert found == EXPECTED[name]
    assert m.mlp_activation == m.decoder.activation


def test_eval_outputs_float32_and_float64(variant, monkeypatch):
    _, fixture, model, _, images, padding_mask = variant
    outputs, selected = run_with_selection(model, images, padding_mask)
    expected = fixture["outputs"]
    order = near_tie_alignment(
        outputs["pred_boxes"], expected["pred_boxes"], fixture["encoder_topk_scores_float64"][:, :-1]
    )
    assert max_error(aligned_rows(outputs["pred_boxes"], order), expected["pred_boxes"]) < ATOL
    assert max_error(aligned_rows(outputs["pred_logits"], order), expected["pred_logits"]) < ATOL
    assert selected.gather(1, order).tolist() == fixture["encoder_topk_indices"].tolist()
    monkeypatch.setattr(mixed, "encoder_proposals", official_anchor_proposals(fixture))  # see there
    try:
        outputs, selected = run_with_selection(model.double(), images.double(), padding_mask)
    finally:
        model.float()
    assert max_error(outputs["pred_logits"], fixture["outputs_float64"]["pred_logits"]) < 1e-9
    assert max_error(outputs["pred_boxes"], fixture["outputs_float64"]["pred_boxes"]) < 1e-9
    assert selected.tolist() == fixture["encoder_topk_indices_float64"].tolist()


def test_train_outputs_matching_and_every_loss_term(variant):
    _, fixture, model, cfg, images, padding_mask = variant
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    try:
        outputs, _ = run_with_selection(model, images, padding_mask)
    finally:
        model.eval()
    expected = fixture["train_outputs"]
    scores = fixture["encoder_topk_scores_float64"][:, :-1]
    order = near_tie_alignment(
        outputs["enc_outputs"]["pred_boxes"], expected["enc_aux_outputs"][0]["pred_boxes"], scores
    )
    errors = {}
    layers = [*zip(outputs["aux_outputs"], expected["aux_outputs"], strict=True), (outputs, expected)]
    for layer, (ours, theirs) in enumerate(layers):
        for key in ("pred_logits", "pred_boxes", "pred_corners", "ref_points"):
            errors[f"{key}_{layer}"] = max_error(aligned_rows(ours[key], order), theirs[key])
    for group, theirs in (
        ("enc_outputs", expected["enc_aux_outputs"][0]),
        ("pre_outputs", expected["pre_outputs"]),
    ):
        for key in ("pred_logits", "pred_boxes"):
            errors[f"{key}_{group}"] = max_error(aligned_rows(outputs[group][key], order), theirs[key])
    assert max(errors.values()) < ATOL, errors
    criterion = build_criterion(cfg.model, cfg.loss)
    union, _, _, _ = criterion.union_of_matchings(outputs, fixture["targets"])
    for b, (queries, targets) in enumerate(union):
        position = {int(q): k for k, q in enumerate(order[b].tolist())}
        ours = sorted(zip([position[int(q)] for q in queries], targets.tolist(), strict=True))
        official_q, official_t = fixture["matcher_indices_go"][b]
        assert ours == sorted(zip(official_q.tolist(), official_t.tolist(), strict=True))
    losses = criterion(outputs, fixture["targets"])
    for name, value in fixture["losses"].items():
        assert losses[official_name(name)].item() == pytest.approx(float(value), rel=1e-4), name
    weights = {official_name(n): w for n, w in fixture["weight_dict"].items()}
    total = sum(weights[name] * losses[name] for name in weights)
    assert total.item() == pytest.approx(float(fixture["total_loss"]), rel=1e-4)


def test_postprocessed_detections_are_the_official_set(variant):
    _, fixture, model, cfg, images, padding_mask = variant
    outputs, _ = run_with_selection(model, images, padding_mask)
    results = build_postprocess(cfg.model)(outputs, fixture["orig_sizes"])
    label2category = torch.tensor(fixture["label2category"])
    for ours, theirs in zip(results, fixture["postprocessed"], strict=True):
        categories = label2category[ours["labels"]]
        for i in range(len(ours["scores"])):
            same = (theirs["labels"] == categories[i]) & ((theirs["scores"] - ours["scores"][i]).abs() <= TIE)
            assert same.any(), (i, categories[i], ours["scores"][i])
            assert (theirs["boxes"][same] - ours["boxes"][i]).abs().amax(-1).min() < 1e-3
        assert sorted(categories.tolist()) == sorted(theirs["labels"].tolist())
