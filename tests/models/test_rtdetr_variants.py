"""RT-DETR variants against the official lyuwenyu/RT-DETR code through `load_official`, beyond the R18vd of
test_rtdetr_parity.py: RT-DETRv2 R50vd (frozen batch norm, CSP expansion 1.0, 6 decoder layers) on
288 x 384 images, RT-DETR v1 R18vd (`rtdetr_pytorch`, Deformable DETR's attention) on 352 x 288 images,
RT-DETRv2 R34vd with per-level sampling points [4, 4, 2] and 100 queries on 288 x 320 images, and
RT-DETRv2 R18vd with discrete sampling (`_dsp`) on square 320 x 320 images (the official discrete
sampling clamps x by the map's height, so it agrees with a correct clamp on square maps only).

The fixtures in tests/fixtures/rtdetr_variants/ were written by make_fixtures.py there, which runs the
official code (not imported here): key spec, weights seed and overrides, images, and the official eval
outputs in float32 and float64. The weights are rebuilt from the spec, reach detr_lab through
`load_official` (told only what weights cannot tell: `load_official_overrides`) and the architecture is
inferred; the tests check that inference against each official config.

Row order: the float64 runs compare row by row within 1e-9 (given the official float32 anchors; 1e-7
for v1, which stores none), selection included. In float32, proposals
whose official float64 scores agree within 1e-5 may come out of the top-k in either order (their
consecutive gaps are near the float32 error), so float32 rows are aligned inside such near-tie groups
(by their boxes) before comparing within 1e-4; the selected positions must then be the official ones.
"""

from __future__ import annotations

import pytest
import torch

from detr_lab.checkpoints import load_official
from detr_lab.models.queries import mixed
from detr_lab.models.two_stage import encoder_proposals

from factories import (
    FIXTURES,
    aligned_rows,
    anchors_within_float32_ulps,
    max_error,
    near_tie_alignment,
    official_anchor_proposals,
    official_batch,
    rtdetr_fixture_state,
    run_with_selection,
)

ATOL = 1e-4
TIE = 1e-5
VARIANTS = FIXTURES / "rtdetr_variants"

# What each official config says, for the inferred config to match: backbone (name, norm), neck
# (expansion, depth_mult), decoder (layers, cross attention, points, level points, sampling), queries.
EXPECTED = {
    "rtdetrv2_r50vd": {
        "backbone": ("resnet50", "frozen_bn"),
        "neck": (1.0, 1.0),
        "decoder": (6, "deformable_v2", 4, None, "default"),
        "num_queries": 300,
    },
    "rtdetr_r18vd": {
        "backbone": ("resnet18", "batch_norm"),
        "neck": (0.5, 1.0),
        "decoder": (3, "deformable", 4, None, "default"),
        "num_queries": 300,
    },
    "rtdetrv2_r34vd_points442_q100": {
        "backbone": ("resnet34", "batch_norm"),
        "neck": (0.5, 1.0),
        "decoder": (4, "deformable_v2", 4, [4, 4, 2], "default"),
        "num_queries": 100,
    },
    "rtdetrv2_r18vd_dsp": {
        "backbone": ("resnet18", "batch_norm"),
        "neck": (0.5, 1.0),
        "decoder": (3, "deformable_v2", 4, None, "discrete"),
        "num_queries": 300,
    },
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def variant(request):
    fixture = torch.load(VARIANTS / f"{request.param}.pt", weights_only=True)
    model, cfg = load_official(rtdetr_fixture_state(fixture), **fixture["load_official_overrides"])
    # No padding: the fixtures store no (all-False) mask.
    no_padding = torch.zeros(len(fixture["images_uint8"]), *fixture["eval_spatial_size"], dtype=torch.bool)
    images, padding_mask = official_batch({**fixture, "padding_mask": no_padding})
    return request.param, fixture, model, cfg, images, padding_mask


def test_fixtures_are_the_expected_official_runs(variant):
    name, fixture, _, _, images, _ = variant
    assert fixture["name"] == name and fixture["official_repo"] == "lyuwenyu/RT-DETR"
    assert list(images.shape[-2:]) == fixture["eval_spatial_size"]
    assert fixture["outputs"]["pred_logits"].shape[:2] == (2, EXPECTED[name]["num_queries"])
    # The fixture's top-K boundary is safe, so any faithful implementation selects the same proposals.
    assert fixture["topk_boundary_gap"] >= fixture["topk_gap_required"]


def test_inferred_config_is_the_official_recipe(variant):
    name, _, model, cfg, _, _ = variant
    expected, m = EXPECTED[name], cfg.model
    assert (m.backbone.type, m.backbone.name, m.backbone.norm) == ("resnet_vd", *expected["backbone"])
    assert (m.neck.type, m.neck.options["expansion"], m.neck.options["depth_mult"]) == (
        "hybrid_encoder",
        *expected["neck"],
    )
    assert (m.neck.options["ffn_dim"], m.neck.options["encoder_levels"], m.ffn_dim) == (1024, [2], 1024)
    d = m.decoder
    assert (d.num_layers, d.cross_attention, d.num_points, d.level_points, d.sampling) == expected["decoder"]
    assert (m.query_source, m.num_queries, m.num_classes, m.num_detections) == (
        "iou_aware",
        expected["num_queries"],
        80,
        300,
    )
    assert (m.encoder.num_layers, m.denoising.enabled) == (0, True)
    assert model.position_encoding is None and model.transformer.level_embed is None
    assert cfg.data.augment.mean == [0.0, 0.0, 0.0] and cfg.data.augment.std == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("name", [name for name in sorted(EXPECTED) if name != "rtdetr_r18vd"])
def test_anchors_are_the_official_ones(name):
    fixture = torch.load(VARIANTS / f"{name}.pt", weights_only=True)
    height, width = fixture["eval_spatial_size"]
    shapes = torch.tensor([[-(-height // s), -(-width // s)] for s in (8, 16, 32)])
    length = int(shapes.prod(-1).sum())
    ours, _ = encoder_proposals(torch.zeros(1, length, dtype=torch.bool), shapes, shapes.flip(-1)[None])
    official = fixture["state_dict_overrides"]["decoder.anchors"]
    assert anchors_within_float32_ulps(ours, official, ulps=2)


def test_eval_outputs_match_in_float64_row_by_row(variant, monkeypatch):
    _, fixture, model, _, images, padding_mask = variant
    # RT-DETR v1 stores no anchors (its official code makes them at run time): this machine's float32
    # anchors then stand, and an ulp of them moves the float64 outputs by up to about 3e-8.
    tolerance = 1e-7
    if "decoder.anchors" in fixture["state_dict_overrides"]:
        monkeypatch.setattr(mixed, "encoder_proposals", official_anchor_proposals(fixture))
        tolerance = 1e-9
    try:
        outputs, selected = run_with_selection(model.double(), images.double(), padding_mask)
    finally:
        model.float()
    expected = fixture["outputs_float64"]
    errors = {key: max_error(outputs[key], expected[key]) for key in ("pred_logits", "pred_boxes")}
    assert max(errors.values()) < tolerance, errors
    assert selected.tolist() == fixture["encoder_topk_indices_float64"].tolist()


def test_eval_outputs_and_selection_match_in_float32(variant):
    _, fixture, model, _, images, padding_mask = variant
    outputs, selected = run_with_selection(model, images, padding_mask)
    expected = fixture["outputs"]
    scores = fixture["encoder_topk_scores_float64"][:, :-1]
    order = near_tie_alignment(outputs["pred_boxes"], expected["pred_boxes"], scores)
    keys = ("pred_logits", "pred_boxes")
    errors = {key: max_error(aligned_rows(outputs[key], order), expected[key]) for key in keys}
    assert max(errors.values()) < ATOL, errors
    # The same encoder positions, in the official order up to near-ties.
    assert selected.gather(1, order).tolist() == fixture["encoder_topk_indices"].tolist()
