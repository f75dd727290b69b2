"""DINO parts on tiny models: denoising queries and mask, the group rule, denoising losses, the
switches (mixed query selection, look-forward-twice, denoising) and training steps of each
combination the issue lists (deformable DINO, plain and ACT encoders, plain DETR with anchors)."""

from __future__ import annotations

import pytest
import torch

from detr_lab.config import ConfigError, load_config
from detr_lab.models.build import build_criterion, build_model
from detr_lab.models.detector import Detector
from detr_lab.models.queries.denoising import (
    ContrastiveDenoising,
    DenoisingLayout,
    denoising_attn_mask,
    num_denoising_groups,
)
from detr_lab.models.queries.embedding import box_sine_embedding

from factories import tiny_overrides

TINY = tiny_overrides(
    "model.encoder.act.q_hashes=4",
    dropout=0.0, encoder__num_points=2, decoder__num_points=2, backbone__frozen_stages=4, num_classes=5,
    classification="sigmoid",
)
DINO = [
    "model.query_source=mixed_selection",
    "model.box_refine=true",
    "model.share_heads=true",
    "model.look_forward_twice=true",
    "model.denoising.enabled=true",
    "model.denoising.dn_number=4",
    "model.position_temperature=20",
]
DEFORMABLE = ["model.encoder.attention=deformable", "model.decoder.cross_attention=deformable"]
HEIGHT, WIDTH = 64, 96


def _cfg(*overrides: str):
    return load_config(overrides=[*TINY, *DINO, *overrides])


def _batch(empty: tuple[int, ...] = ()):
    torch.manual_seed(0)
    images = torch.randn(2, 3, HEIGHT, WIDTH)
    padding_mask = torch.zeros(2, HEIGHT, WIDTH, dtype=torch.bool)
    padding_mask[1, 40:, :] = True
    padding_mask[1, :, 72:] = True
    images[padding_mask[:, None].expand_as(images)] = 0
    targets = [
        {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.2]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])},
    ]
    for i in empty:
        targets[i] = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    return images, padding_mask, targets


# ---------------------------------------------------------------------------------- denoising parts
def test_denoising_mask_blocks():
    # 2 groups of 2 objects: rows/cols 0-3 group 0 (positives 0-1, negatives 2-3), 4-7 group 1,
    # then 3 matching queries. 1 = may NOT attend.
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(denoising_attn_mask(DenoisingLayout(groups=2, group_size=2), 3), expected)
    three = denoising_attn_mask(DenoisingLayout(groups=3, group_size=1), 2)  # middle group sees only itself
    assert three[2:4, 2:4].logical_not().all() and three[2:4, :2].all() and three[2:4, 4:6].all()
    assert not three[2:4, 6:].any()
    assert not denoising_attn_mask(DenoisingLayout(groups=1, group_size=0), 4).any()  # no objects


@pytest.mark.parametrize(
    ("dn_number", "max_objects", "groups"),
    [
        (100, 0, 1),
        (100, 1, 100),
        (100, 3, 33),
        (100, 7, 14),
        (100, 150, 1),
        (50, 10, 5),
        (10, 5, 20),
        (4, 2, 8),
    ],
)
def test_number_of_groups_follows_the_official_rule(dn_number, max_objects, groups):
    # 2 * dn_number queries; divided by 2 * max_objects only when that budget is at least 100
    assert num_denoising_groups(dn_number, max_objects) == groups


def test_zero_noise_positive_queries_reconstruct_the_ground_truth():
    _, _, targets = _batch()
    dn = ContrastiveDenoising(32, 5, dn_number=4, label_noise_ratio=0.0, box_noise_scale=0.0)
    made = dn(targets, num_queries=6)
    layout = made.meta["dn_layout"]
    # a budget of 2 x 4 < 100 queries: 8 groups whatever the object count (the official rule)
    assert (layout.groups, layout.group_size, layout.pad_size) == (8, 2, 32)
    assert made.queries.shape == (2, 32, 32) and made.reference_points.shape == (2, 32, 4)
    assert made.attn_mask.shape == (38, 38)
    for image, target in enumerate(targets):
        queries, objects = layout.positive_indices(len(target["labels"]))
        torch.testing.assert_close(made.reference_points[image, queries], target["boxes"][objects])
        torch.testing.assert_close(made.queries[image, queries], dn.label_embed(target["labels"][objects]))
        negatives = queries + layout.group_size  # same boxes: zero noise also for negatives' base
        torch.testing.assert_close(made.reference_points[image, negatives], target["boxes"][objects])
    # image 1 has one object: its second slot of every half-group is padding
    assert not made.queries[1, 1].any() and torch.equal(made.reference_points[1, 1], torch.full((4,), 0.5))


def test_box_noise_keeps_positives_closer_than_negatives():
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.4]]).repeat(200, 1)
    targets = [{"labels": torch.zeros(200, dtype=torch.int64), "boxes": boxes}]
    dn = ContrastiveDenoising(32, 5, dn_number=100, label_noise_ratio=0.0, box_noise_scale=0.4)
    made = dn(targets, num_queries=3, generator=torch.Generator().manual_seed(0))
    assert made.meta["dn_layout"].groups == 1
    positives, negatives = made.reference_points[0, :200], made.reference_points[0, 200:]
    corner_shift = lambda b: (b[:, :2] - b[:, 2:] / 2 - 0.3).abs()  # noqa: E731 (x0, y0) moved from 0.3
    assert corner_shift(positives).max() <= 0.4 * 0.2 + 1e-6  # < scale x half size
    assert corner_shift(negatives).min() >= 0.4 * 0.2 - 1e-6  # >= scale x half size


def test_label_noise_flips_about_the_configured_share():
    targets = [{"labels": torch.zeros(2000, dtype=torch.int64), "boxes": torch.full((2000, 4), 0.5)}]
    dn = ContrastiveDenoising(8, 5, dn_number=1, label_noise_ratio=0.5, box_noise_scale=0.0)
    made = dn(targets, 1, generator=torch.Generator().manual_seed(0))
    # flipped with probability 0.25, to a random class of 5 (0 again in a fifth of the cases)
    changed = (made.queries[0] != dn.label_embed.weight[0]).any(-1).float().mean().item()
    assert 0.17 < changed < 0.23


def test_perfect_denoising_predictions_have_zero_box_loss():
    cfg = _cfg(*DEFORMABLE)
    criterion = build_criterion(cfg.model, cfg.loss)
    _, _, targets = _batch()
    layout = DenoisingLayout(groups=3, group_size=2)
    boxes = torch.full((2, layout.pad_size, 4), 0.5)
    for image, target in enumerate(targets):
        queries, objects = layout.positive_indices(len(target["labels"]))
        boxes[image, queries] = target["boxes"][objects]
    dn_out = {"pred_logits": torch.zeros(2, layout.pad_size, 5), "pred_boxes": boxes}
    outputs = {
        "pred_logits": torch.zeros(2, 6, 5),
        "pred_boxes": torch.full((2, 6, 4), 0.5),
        "aux_outputs": [{"pred_logits": torch.zeros(2, 6, 5), "pred_boxes": torch.full((2, 6, 4), 0.5)}],
        "dn_outputs": {**dn_out, "aux_outputs": [dict(dn_out)]},
        "dn_meta": layout,
    }
    losses = criterion(outputs, targets)
    for suffix in ("_dn", "_dn_0"):
        assert losses[f"loss_bbox{suffix}"].item() == pytest.approx(0.0, abs=1e-7)
        assert losses[f"loss_giou{suffix}"].item() == pytest.approx(0.0, abs=1e-6)
        assert losses[f"loss_ce{suffix}"].item() > 0
    shifted = dict(outputs, dn_outputs={**dn_out, "pred_boxes": boxes + 0.01, "aux_outputs": [dict(dn_out)]})
    # 3 objects x 4 coordinates x 0.01 per group, normalized by objects x groups
    assert criterion(shifted, targets)["loss_bbox_dn"].item() == pytest.approx(0.04, rel=1e-4)


# ----------------------------------------------------------------------------------------- switches
def test_dino_preset_builds_the_parts():
    model = build_model(_cfg(*DEFORMABLE).model)
    assert isinstance(model, Detector) and model.denoising is not None
    assert model.denoising.label_embed.weight.shape == (6, 32)
    assert model.query_source.content.weight.shape == (6, 32)
    assert model.position_encoding.temperature == 20 and model.position_encoding.offset == 0
    assert model.transformer.decoder.norm is not None


@pytest.mark.parametrize(
    "bad",
    [
        ["model.query_source=learned_points", "model.box_refine=false"],
        ["model.box_refine=false"],
        ["model.classification=softmax"],
        ["model.query_source=proposals"],
    ],
)
def test_switches_need_the_anchor_decoder(bad):
    match = "model.query_source|model.box_refine|model.classification|model.share_heads|model.denoising"
    with pytest.raises(ConfigError, match=match):
        _cfg(*DEFORMABLE, *bad)


def test_denoising_off_changes_nothing_at_inference():
    images, padding_mask, targets = _batch()
    with_dn = build_model(_cfg(*DEFORMABLE).model).eval()
    without = build_model(_cfg(*DEFORMABLE, "model.denoising.enabled=false").model).eval()
    state = {k: v for k, v in with_dn.state_dict().items() if not k.startswith("denoising.")}
    without.load_state_dict(state)
    with torch.no_grad():
        a = with_dn(images, padding_mask, targets=targets)
        b = without(images, padding_mask)
    assert "dn_outputs" not in a and "dn_meta" not in a
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key]) and torch.equal(a["enc_outputs"][key], b["enc_outputs"][key])
        assert torch.equal(a["aux_outputs"][0][key], b["aux_outputs"][0][key])


def test_denoising_queries_do_not_change_the_matching_queries_outputs():
    # The mask hides the denoising groups from the matching queries: same outputs in train mode.
    images, padding_mask, targets = _batch()
    model = build_model(_cfg(*DEFORMABLE).model).train()
    torch.manual_seed(1)
    with_dn = model(images, padding_mask, targets=targets)
    plain = model(images, padding_mask)
    assert with_dn["dn_outputs"]["pred_logits"].shape == (2, with_dn["dn_meta"].pad_size, 5)
    torch.testing.assert_close(with_dn["pred_boxes"], plain["pred_boxes"], atol=1e-5, rtol=0)
    torch.testing.assert_close(with_dn["pred_logits"], plain["pred_logits"], atol=1e-5, rtol=0)


def test_look_forward_twice_changes_gradients_not_outputs():
    images, padding_mask, _ = _batch()
    results = []
    for lft in ("true", "false"):
        torch.manual_seed(0)
        model = build_model(_cfg(*DEFORMABLE, f"model.look_forward_twice={lft}").model).eval()
        # the box head starts at zero offsets (no gradient into the queries): give it some weights
        torch.nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.1)
        outputs = model(images, padding_mask)
        outputs["pred_boxes"].sum().backward()
        grad = model.transformer.decoder.layers[0].ffn.linear2.weight.grad.clone()
        results.append((outputs["pred_boxes"].detach(), grad))
    (boxes_on, grad_on), (boxes_off, grad_off) = results
    assert torch.equal(boxes_on, boxes_off)
    assert not torch.allclose(grad_on, grad_off)


def test_box_sine_embedding_order_and_values():
    box = torch.tensor([[0.25, 0.5, 0.125, 1.0]])  # cx, cy, w, h
    embedding = box_sine_embedding(box, 4, temperature=10000.0)
    # blocks y, x, w, h; first channel of each block: sin(2 pi * coordinate)
    first = embedding.view(4, 4)[:, 0]
    expected = torch.sin(2 * torch.pi * torch.tensor([0.5, 0.25, 0.125, 1.0]))
    torch.testing.assert_close(first, expected, atol=1e-6, rtol=0)
    assert embedding.view(4, 4)[1, 1].item() == pytest.approx(
        torch.cos(torch.tensor(torch.pi / 2)).item(), abs=1e-6
    )


# ------------------------------------------------------------------------------------ training steps
COMBINATIONS = {
    "dino_deformable_4_levels": [*DEFORMABLE, "model.num_feature_levels=4"],
    "plain_encoder_deformable_decoder": [
        "model.decoder.cross_attention=deformable",
        "model.num_feature_levels=2",
    ],
    "act_encoder": [
        "model.encoder.attention=act",
        "model.num_feature_levels=1",
        "model.query_source=learned_anchors",
    ],
    "plain_detr_dn": ["model.query_source=learned_anchors", "model.look_forward_twice=false"],
    "learned_anchors_unshared": [
        *DEFORMABLE, "model.query_source=learned_anchors", "model.share_heads=false"
    ],
    "no_denoising": [*DEFORMABLE, "model.denoising.enabled=false", "model.num_feature_levels=2"],
}


# every combination with objects; empty images (one, or the whole batch) on DINO and on plain DETR
STEPS = [(name, ()) for name in sorted(COMBINATIONS)] + [
    (name, empty) for name in ("dino_deformable_4_levels", "plain_detr_dn") for empty in ((1,), (0, 1))
]


@pytest.mark.parametrize(("name", "empty"), STEPS, ids=[f"{n}-{len(e)}_empty" for n, e in STEPS])
def test_training_step(name, empty):
    cfg = _cfg(*COMBINATIONS[name])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    criterion = build_criterion(cfg.model, cfg.loss)
    images, padding_mask, targets = _batch(empty)
    outputs = model(images, padding_mask, targets=targets)
    losses = criterion(outputs, targets)
    total = criterion.total_loss(losses)
    assert torch.isfinite(total)
    if cfg.model.denoising.enabled:
        assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_ce_dn_0"} <= set(losses)
        assert (losses["loss_bbox_dn"].item() > 0) == (len(empty) < 2)
    total.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing[:5]  # the same parameters take part in every step (DDP-safe)
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    torch.optim.AdamW([p for _, p in trainable], lr=1e-4).step()
