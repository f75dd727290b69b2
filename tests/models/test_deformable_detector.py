"""Deformable DETR pieces: reference points and box refinement in the decoder, two-stage proposals,
extra feature levels, the official initialisation, and the builder's choices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detr_lab.config import load_config
from detr_lab.models.attention.deformable import MultiScaleDeformableAttention
from detr_lab.models.attention.plain import PlainAttention
from detr_lab.models.build import build_model
from detr_lab.models.position import SinePositionEncoding
from detr_lab.models.transformer import Decoder, DecoderLayer, inverse_sigmoid, refine_boxes
from detr_lab.models.two_stage import TwoStageQueries, encoder_proposals, proposal_sine_embedding

from factories import tiny_overrides

D = 32
TINY = tiny_overrides(
    classification="sigmoid", encoder__attention="deformable", decoder__cross_attention="deformable",
    num_feature_levels=4,
)


class RecordingAttention(nn.Module):
    """Returns zeros and remembers the reference points of each call."""

    def __init__(self):
        super().__init__()
        self.reference_points = []

    def forward(self, query, key, value, **kwargs):
        self.reference_points.append(kwargs["reference_points"])
        return torch.zeros_like(query)


# ------------------------------------------------------------------------- reference points
def test_inverse_sigmoid_is_finite_and_inverts_the_sigmoid():
    x = torch.tensor([-0.5, 0.0, 0.25, 0.5, 0.9, 1.0, 1.5])
    logits = inverse_sigmoid(x)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[2:5].sigmoid(), x[2:5])
    assert logits[0] == logits[1] == math.log(1e-5 / 1) and logits[5] == logits[6] == math.log(1 / 1e-5)


def test_refine_boxes_moves_points_and_boxes_in_logit_space():
    deltas = torch.tensor([[0.5, -1.0, 0.2, -0.3]])
    point = torch.tensor([[0.3, 0.6]])
    box = torch.tensor([[0.3, 0.6, 0.2, 0.1]])
    expected_centre = torch.tensor([[math.log(0.3 / 0.7) + 0.5, math.log(0.6 / 0.4) - 1.0]]).sigmoid()
    from_point = refine_boxes(deltas, point)
    torch.testing.assert_close(from_point[:, :2], expected_centre)
    torch.testing.assert_close(from_point[:, 2:], deltas[:, 2:].sigmoid())  # sizes from the deltas alone
    from_box = refine_boxes(deltas, box)
    torch.testing.assert_close(
        from_box[:, 2:], torch.tensor([[math.log(0.25) + 0.2, math.log(1 / 9) - 0.3]]).sigmoid()
    )
    torch.testing.assert_close(refine_boxes(torch.zeros(1, 4), box), box)
    with pytest.raises(ValueError, match="end in 2 or 4"):
        refine_boxes(deltas, torch.rand(1, 3))


def _decoder(num_layers=3):
    torch.manual_seed(0)
    attentions = [RecordingAttention() for _ in range(num_layers)]
    layers = [
        DecoderLayer(self_attn=PlainAttention(D, 4), cross_attn=attention, embed_dim=D, ffn_dim=48)
        for attention in attentions
    ]
    return Decoder(layers), attentions


def test_decoder_scales_reference_points_to_each_level():
    decoder, attentions = _decoder(num_layers=1)
    queries, query_pos, memory = torch.randn(2, 5, D), torch.randn(2, 5, D), torch.randn(2, 7, D)
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [0.5, 1.0]]])  # (B, levels, (x, y))
    points = torch.rand(2, 5, 2)
    decoded = decoder(queries, query_pos, memory, memory, reference_points=points, valid_ratios=ratios)
    seen = attentions[0].reference_points[0]
    assert tuple(seen.shape) == (2, 5, 2, 2)
    torch.testing.assert_close(seen[1, 3, 0], points[1, 3] * torch.tensor([0.5, 0.75]))
    torch.testing.assert_close(seen[1, 3, 1], points[1, 3] * torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(seen[0], points[:, :, None].expand(-1, -1, 2, -1)[0])
    assert decoded.references[0] is points
    boxes = torch.rand(2, 5, 4)
    decoder(queries, query_pos, memory, memory, reference_points=boxes, valid_ratios=ratios)
    scaled = attentions[0].reference_points[1]
    torch.testing.assert_close(scaled[1, 0, 0], boxes[1, 0] * torch.tensor([0.5, 0.75, 0.5, 0.75]))


def test_box_refinement_feeds_each_layer_the_previous_boxes_detached():
    decoder, attentions = _decoder(num_layers=3)
    heads = nn.ModuleList(nn.Linear(D, 4) for _ in range(3))
    queries, query_pos, memory = torch.randn(1, 4, D), torch.randn(1, 4, D), torch.randn(1, 6, D)
    ratios = torch.ones(1, 1, 2)
    points = torch.rand(1, 4, 2, requires_grad=True)
    decoded = decoder(
        queries, query_pos, memory, memory, reference_points=points, valid_ratios=ratios, box_heads=heads
    )
    assert [tuple(r.shape) for r in decoded.references] == [(1, 4, 2), (1, 4, 4), (1, 4, 4)]
    for layer in (1, 2):
        previous = decoded.references[layer - 1]
        expected = refine_boxes(heads[layer - 1](decoded.hidden[layer - 1]), previous)
        torch.testing.assert_close(decoded.references[layer], expected)
        assert not decoded.references[layer].requires_grad
        torch.testing.assert_close(attentions[layer].reference_points[0][:, :, 0], expected)
    without = decoder(queries, query_pos, memory, memory, reference_points=points, valid_ratios=ratios)
    assert all(r is points for r in without.references)
    with pytest.raises(ValueError, match="one box head per decoder layer"):
        decoder(
            queries,
            query_pos,
            memory,
            memory,
            reference_points=points,
            valid_ratios=ratios,
            box_heads=heads[:2],
        )
    with pytest.raises(ValueError, match="valid ratios"):
        decoder(queries, query_pos, memory, memory, reference_points=points)


# -------------------------------------------------------------------------------- two-stage
def test_encoder_proposals_centre_a_box_on_every_valid_token():
    shapes = torch.tensor([[2, 4], [1, 2]])
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, [3, 7, 9]] = True  # image 1: last column of each level is padding
    sizes = torch.tensor([[[4, 2], [2, 1]], [[3, 2], [1, 1]]])  # (image, level) -> valid (width, height)
    proposals, valid = encoder_proposals(mask, shapes, sizes)
    boxes = proposals.sigmoid()
    # image 0, level 0, token (y=1, x=2): centre (2.5 / 4, 1.5 / 2), size 0.05
    torch.testing.assert_close(boxes[0, 6], torch.tensor([2.5 / 4, 1.5 / 2, 0.05, 0.05]))
    # image 1 has 3 valid columns on level 0 and 1 on level 1: centres normalized by them
    torch.testing.assert_close(boxes[1, 4], torch.tensor([0.5 / 3, 1.5 / 2, 0.05, 0.05]))
    torch.testing.assert_close(boxes[1, 8], torch.tensor([0.5, 0.5, 0.1, 0.1]))
    assert valid[1, :, 0].tolist() == [True, True, True, False, True, True, True, False, True, False]
    assert torch.isinf(proposals[1, 9]).all() and torch.isinf(proposals[1, 3]).all()
    # a centre within 0.01 of the border is not a usable proposal
    wide = torch.tensor([[1, 100]])
    unpadded = torch.zeros(1, 100, dtype=torch.bool)
    proposals, valid = encoder_proposals(unpadded, wide, torch.tensor([[[100, 1]]]))
    assert valid[0, :, 0].tolist() == [False] + [True] * 98 + [False]
    assert torch.isinf(proposals[0, 0]).all()


def test_proposal_sine_embedding_formula():
    proposals = torch.tensor([[[0.3, -1.2, 0.0, 2.0]]])
    num_feats = 8
    embedding = proposal_sine_embedding(proposals, num_feats)
    assert tuple(embedding.shape) == (1, 1, 4 * num_feats)
    for coordinate in range(4):
        angle = 2 * math.pi * torch.sigmoid(proposals[0, 0, coordinate]).item()
        for i in range(num_feats):
            frequency = 10000 ** (2 * (i // 2) / num_feats)
            expected = math.sin(angle / frequency) if i % 2 == 0 else math.cos(angle / frequency)
            assert embedding[0, 0, coordinate * num_feats + i].item() == pytest.approx(expected, abs=1e-6)


def test_two_stage_selection_keeps_the_best_scores():
    queries = TwoStageQueries(D, num_queries=2)
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 0.0, 1.0, 0.5]])
    boxes = torch.arange(32.0).view(2, 4, 4).requires_grad_()
    chosen = queries.select(scores, boxes)
    torch.testing.assert_close(chosen, torch.stack([boxes[0, [1, 3]], boxes[1, [0, 2]]]).detach())
    assert not chosen.requires_grad
    query_pos, content = queries.queries(chosen)
    assert tuple(query_pos.shape) == tuple(content.shape) == (2, 2, D)
    with pytest.raises(ValueError, match="at least num_queries=3 encoder tokens, got 2"):
        TwoStageQueries(D, num_queries=3).select(scores[:, :2], boxes[:, :2])


# --------------------------------------------------------------------------- detector parts
def test_extra_levels_follow_the_deepest_backbone_level():
    cfg = load_config(overrides=TINY)
    model = build_model(cfg.model).eval()
    assert model.backbone.strides == [8, 16, 32] and model.num_levels == 4
    assert [proj[0].in_channels for proj in model.neck.input_proj] == [128, 256, 512, 512]
    assert model.neck.input_proj[3][0].stride == (2, 2) and model.neck.input_proj[3][0].kernel_size == (3, 3)
    projections = model.neck.input_proj
    assert all(isinstance(proj[1], nn.GroupNorm) and proj[1].num_groups == 32 for proj in projections)
    images = torch.randn(1, 3, 96, 128)
    mask = torch.zeros(1, 96, 128, dtype=torch.bool)
    mask[:, 40:, 64:] = True
    features, masks, pos = model.feature_levels(images, mask)
    assert [tuple(f.shape[-2:]) for f in features] == [(12, 16), (6, 8), (3, 4), (2, 2)]
    # the extra level's mask is the image mask resized (nearest: pixels (0|48, 0|64))
    assert masks[3].tolist() == [[[False, False], [False, True]]]
    assert masks[2][0, -1].tolist() == [False, False, True, True]
    c5 = model.backbone(images, mask)[-1].features
    torch.testing.assert_close(features[3], model.neck.input_proj[3](c5))
    assert (
        isinstance(model.position_encoding, SinePositionEncoding) and model.position_encoding.offset == -0.5
    )
    torch.testing.assert_close(pos[3], model.position_encoding(masks[3]))


def test_initialisation_follows_the_official_model():
    torch.manual_seed(0)
    model = build_model(load_config(overrides=TINY).model)
    prior = -math.log((1 - 0.01) / 0.01)
    assert model.class_embed.out_features == 3 and torch.allclose(
        model.class_embed.bias, torch.full((3,), prior)
    )
    last = model.bbox_embed.layers[-1]
    assert last.weight.abs().sum() == 0 and last.bias.tolist() == [0, 0, -2, -2]
    source = model.query_source
    assert source.query_embed.weight.shape == (6, 64) and source.reference_points_head.bias.abs().sum() == 0
    assert model.transformer.decoder.norm is None and model.transformer.level_embed.shape == (4, D)
    attention = model.transformer.encoder.layers[0].self_attn
    assert (
        isinstance(attention, MultiScaleDeformableAttention)
        and attention.attention_weights.weight.abs().sum() == 0
    )
    assert (attention.num_levels, attention.num_points) == (4, 4)
    for proj in model.neck.input_proj:
        assert proj[0].bias.abs().sum() == 0

    refine = build_model(load_config(overrides=[*TINY, "model.box_refine=true"]).model)
    assert len(refine.class_embed) == len(refine.bbox_embed) == 2
    assert refine.bbox_embed[0].layers[-1].bias.tolist() == [0, 0, -2, -2]
    assert refine.bbox_embed[1].layers[-1].bias.abs().sum() == 0
    assert refine.bbox_embed[0] is not refine.bbox_embed[1]
    two_stage = build_model(
        load_config(overrides=[*TINY, "model.box_refine=true", "model.query_source=proposals"]).model
    )
    assert len(two_stage.class_embed) == 3 and two_stage.query_source is not None
    assert all(head.layers[-1].bias.abs().sum() == 0 for head in two_stage.bbox_embed)
    assert not hasattr(two_stage, "query_embed") and not hasattr(two_stage, "reference_points_head")


def test_builder_picks_the_head_and_inputs_from_the_attention():
    sigmoid = tiny_overrides(classification="sigmoid")  # one level, plain attention
    detr_act = build_model(load_config(overrides=[*sigmoid, "model.encoder.attention=act"]).model)
    assert detr_act.query_spec.box_dim == 0 and isinstance(detr_act.neck.input_proj[0], nn.Conv2d)
    assert detr_act.transformer.level_embed is None and detr_act.position_encoding.offset == 0
    assert isinstance(detr_act.transformer.decoder.norm, nn.LayerNorm)
    assert detr_act.class_embed.out_features == 3  # sigmoid head on DETR: no "no object" logit
    plain_levels = build_model(load_config(overrides=[*sigmoid, "model.num_feature_levels=2"]).model)
    assert plain_levels.query_spec.box_dim == 0 and plain_levels.backbone.strides == [16, 32]
    assert isinstance(
        plain_levels.neck.input_proj[1][1], nn.GroupNorm
    ) and plain_levels.transformer.level_embed.shape == (2, D)
    single = build_model(
        load_config(overrides=[*TINY, "model.num_feature_levels=1", "model.encoder.attention=plain"]).model
    )
    assert single.query_spec.box_dim == 2 and single.backbone.strides == [32]
    assert single.transformer.decoder.layers[0].cross_attn.num_levels == 1
    assert isinstance(single.transformer.encoder.layers[0].self_attn, PlainAttention)
