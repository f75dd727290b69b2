"""The extension points: a new neck, loss term, matching cost and query source is one function or
file plus one table line, with no edit elsewhere, and the assembled detector trains with it."""

from __future__ import annotations

import pytest
import torch
from toy_loss import area_term
from toy_neck import DeepestLevelNeck

from detr_lab.config import ConfigError, load_config
from detr_lab.models import matcher as matcher_module
from detr_lab.models.build import build_criterion, build_model
from detr_lab.models.loss_terms import LOSS_TERMS, LossTerm
from detr_lab.models.necks import NECKS
from detr_lab.models.queries import QUERY_SOURCES, QuerySourceSpec

from factories import tiny_batch, tiny_overrides


def _train_step(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    criterion = build_criterion(cfg.model, cfg.loss)
    images, padding_mask, targets = tiny_batch()
    targets = [{**t, "labels": t["labels"] % cfg.model.num_classes} for t in targets]
    losses = criterion(model(images, padding_mask, targets=targets), targets)
    total = criterion.total_loss(losses)
    total.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return model, criterion, losses


def test_a_toy_neck_and_a_toy_loss_term_train_a_step(monkeypatch):
    monkeypatch.setitem(NECKS, "deepest", "toy_neck:build")  # the one table line of the neck
    monkeypatch.setitem(LOSS_TERMS, "area", LossTerm(area_term, ("loss_area",), {"loss_area": 3.0}))
    with pytest.raises(ConfigError, match="'model.neck.type' is 'deepst'.*did you mean 'deepest'"):
        load_config(overrides=tiny_overrides(neck__type="deepst"))
    misspelt = tiny_overrides("model.neck.options.chanels=8", neck__type="simple_pyramid")
    misspelt = load_config(overrides=misspelt)  # a neck option is checked against its builder's
    with pytest.raises(ValueError, match="'model.neck.options.chanels' is not an option.*options: channels"):
        build_model(misspelt.model)  # not silently ignored
    cfg = load_config(
        overrides=tiny_overrides(
            "loss.terms=[labels,boxes,area]", "loss.weights.loss_area=4.0", neck__type="deepest"
        )
    )
    model, criterion, losses = _train_step(cfg)
    assert isinstance(model.neck, DeepestLevelNeck)
    assert model.neck.gain.grad is not None and model.neck.gain.grad != 0
    assert model.neck.gain.detach().item() != 1.0  # the optimizer step moved the neck's own parameter
    # The new term runs on every group with its suffix and takes the configured weight (4, not 3).
    assert {"loss_area", "loss_area_0"} <= set(losses) and losses["loss_area"] > 0
    assert criterion.weight_dict["loss_area"] == criterion.weight_dict["loss_area_0"] == 4.0
    misspelt = tiny_overrides("loss.terms=[labels,boxes,area]", "loss.weights.loss_aera=4")
    misspelt = load_config(overrides=misspelt)
    with pytest.raises(ValueError, match=r"'loss.weights' names \['loss_aera'\]"):
        build_criterion(misspelt.model, misspelt.loss)  # not silently ignored
    expected = sum(losses[name] * weight for name, weight in criterion.weight_dict.items())
    torch.testing.assert_close(criterion.total_loss(losses), expected)


def test_a_toy_matching_cost_changes_the_matching(monkeypatch):
    def centre_x_cost(inputs):  # one function: |x - x'| of the box centres
        return (inputs.boxes[:, None, 0] - inputs.target_boxes[None, :, 0]).abs()

    monkeypatch.setitem(matcher_module.MATCHING_COSTS, "centre_x", centre_x_cost)  # one table line
    only_centre = load_config(overrides=tiny_overrides(
        "loss.cost_class=0", "loss.cost_bbox=0", "loss.cost_giou=0", "loss.extra_costs.centre_x=1"
    ))  # fmt: skip
    matcher = build_criterion(only_centre.model, only_centre.loss).matcher
    boxes = torch.tensor([[[0.9, 0.1, 0.1, 0.1], [0.2, 0.9, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]]])
    outputs = {"pred_logits": torch.zeros(1, 3, 3), "pred_boxes": boxes}
    target_boxes = torch.tensor([[0.21, 0.1, 0.5, 0.5], [0.88, 0.9, 0.5, 0.5]])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": target_boxes}]
    ((queries, matched),) = matcher(outputs, targets)
    assert dict(zip(queries.tolist(), matched.tolist(), strict=True)) == {0: 1, 1: 0}  # by centre x alone
    with pytest.raises(ValueError, match=r"'loss.extra_costs' names \['nope'\]"):
        matcher_module.HungarianMatcher(extra_costs={"nope": 1.0})


def test_a_new_query_source_is_one_table_line(monkeypatch):
    # An existing module under a new name with other properties: the spec alone decides the decoder,
    # the head's box parametrisation, the groups and the config checks.
    spec = QuerySourceSpec("detr_lab.models.queries.anchors:build", box_dim=4, position_from_boxes=True,
                           needs_refinement=True, final_decoder_norm=True, sine_offset=0.0)  # fmt: skip
    monkeypatch.setitem(QUERY_SOURCES, "toy_anchors", spec)
    overrides = tiny_overrides("model.query_source=toy_anchors", classification="sigmoid")
    with pytest.raises(ConfigError, match="'model.query_source: toy_anchors' needs 'model.box_refine: true'"):
        load_config(overrides=overrides)
    cfg = load_config(overrides=[*overrides, "model.box_refine=true"])
    model, _, losses = _train_step(cfg)
    assert model.query_pos_head is not None and model.transformer.decoder.norm is not None
    assert "loss_ce_enc" not in losses and "loss_giou_0" in losses


def test_loss_weights_and_costs_that_would_be_ignored_or_overridden_are_refused():
    for overrides, message in [
        (["loss.weights.loss_ce=9"], r"'loss.weights.loss_ce': set 'loss.class_weight' instead"),
        (["loss.weights.class_weight=9"], r"'loss.weights.class_weight': set 'loss.class_weight' instead"),
        (["loss.terms=[vfl,boxes]", "loss.weights.loss_vfl=-1", "model.classification=sigmoid"],
         "must be >= 0"),
        (["loss.extra_costs.class=100"], r"'loss.extra_costs' names \['class'\]"),
    ]:
        cfg = load_config(overrides=tiny_overrides(*overrides))
        with pytest.raises(ValueError, match=message):
            build_criterion(cfg.model, cfg.loss)


def test_a_neck_builder_collecting_options_in_named_kwargs_gets_them(monkeypatch):
    import toy_neck

    seen = {}

    def build(*, in_channels, hidden_dim, **options):
        seen.update(options)
        return toy_neck.DeepestLevelNeck(in_channels[-1], hidden_dim)

    monkeypatch.setattr(toy_neck, "build_collecting", build, raising=False)
    monkeypatch.setitem(NECKS, "collecting", "toy_neck:build_collecting")
    cfg = load_config(overrides=tiny_overrides("model.neck.options.scale=2.0", neck__type="collecting"))
    build_model(cfg.model)
    assert seen["scale"] == 2.0
