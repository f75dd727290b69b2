from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from detr_lab.config import load_config
from detr_lab.models import criterion as criterion_module
from detr_lab.models.build import build_criterion, build_model
from detr_lab.models.criterion import SetCriterion, average_num_boxes
from detr_lab.models.matcher import HungarianMatcher

from factories import tiny_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _criterion(num_classes=2, num_aux_layers=0, **kwargs):
    return SetCriterion(num_classes, HungarianMatcher(), num_aux_layers=num_aux_layers, **kwargs)


def test_hand_computed_terms():
    outputs = {
        "pred_logits": torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]]),
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]])}]
    losses = _criterion()(outputs, targets)
    ce_matched = -math.log(math.exp(2) / (math.exp(2) + 2))  # query 0, class 0, weight 1
    ce_unmatched = -math.log(math.e / (math.e + 2))  # query 1, "no object", weight eos_coef 0.1
    assert losses["loss_ce"].item() == pytest.approx((ce_matched + 0.1 * ce_unmatched) / 1.1, rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.2, abs=1e-6)
    # prediction [0.4, 0.6]^2 inside target [0.4, 0.6] x [0.3, 0.7]: IoU 1/2, enclosing box = target
    assert losses["loss_giou"].item() == pytest.approx(0.5, abs=1e-6)
    assert losses["class_error"].item() == 0
    assert losses["cardinality_error"].item() == 0


def test_perfect_predictions_give_zero_box_losses():
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.7, 0.6, 0.3, 0.5]])
    logits = torch.full((1, 4, 4), -10.0)
    logits[0, 1, 2] = logits[0, 3, 0] = 10.0
    logits[0, 0, 3] = logits[0, 2, 3] = 10.0  # the other queries say "no object"
    pred_boxes = torch.tensor(
        [[[0.5, 0.5, 0.1, 0.1], [0.3, 0.4, 0.2, 0.1], [0.5, 0.5, 0.1, 0.1], [0.7, 0.6, 0.3, 0.5]]]
    )
    targets = [{"labels": torch.tensor([2, 0]), "boxes": boxes}]
    losses = _criterion(num_classes=3)({"pred_logits": logits, "pred_boxes": pred_boxes}, targets)
    assert losses["loss_bbox"].item() == 0
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_ce"].item() < 1e-6
    assert losses["class_error"].item() == 0 and losses["cardinality_error"].item() == 0


def test_batch_without_objects_trains():
    cfg = tiny_config(num_queries=5)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    criterion = build_criterion(cfg.model, cfg.loss)
    outputs = model(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    losses = criterion(outputs, empty)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    expected_ce = -outputs["pred_logits"].log_softmax(-1)[..., -1].mean()  # every query: "no object"
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    assert losses["class_error"].item() == 100
    total = criterion.total_loss(losses)
    assert torch.isfinite(total)
    total.backward()
    assert model.class_embed.weight.grad.abs().sum() > 0
    assert model.transformer.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.backbone.body.layer4[0].conv1.weight.grad.abs().sum() > 0


def test_weight_dict_and_total():
    weights = {"class_weight": 1.5, "loss_bbox": 4.0, "giou_weight": 3.0}  # config keys or value names
    criterion = _criterion(num_aux_layers=2, weights=weights)
    assert criterion.weight_dict == {
        "loss_ce": 1.5, "loss_bbox": 4.0, "loss_giou": 3.0,
        "loss_ce_0": 1.5, "loss_bbox_0": 4.0, "loss_giou_0": 3.0,
        "loss_ce_1": 1.5, "loss_bbox_1": 4.0, "loss_giou_1": 3.0,
    }  # fmt: skip
    losses = {"loss_ce": torch.tensor(2.0), "loss_bbox": torch.tensor(1.0), "loss_giou_1": torch.tensor(0.5)}
    losses["cardinality_error"] = torch.tensor(100.0)  # logged, not weighted
    assert criterion.total_loss(losses).item() == pytest.approx(2 * 1.5 + 4.0 + 0.5 * 3.0)
    assert "loss_ce_enc" in _criterion(two_stage=True).weight_dict
    with pytest.raises(ValueError, match="none of the weighted loss terms"):
        criterion.total_loss({"class_error": torch.tensor(1.0)})


def test_aux_layers_get_suffixed_terms():
    torch.manual_seed(0)
    layer = {"pred_logits": torch.randn(1, 4, 3), "pred_boxes": torch.rand(1, 4, 4) * 0.5 + 0.2}
    outputs = {**layer, "aux_outputs": [dict(layer), dict(layer)]}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    losses = _criterion(num_aux_layers=2)(outputs, targets)
    assert "class_error_0" not in losses
    for suffix in ("_0", "_1"):
        for name in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
            assert losses[name + suffix].item() == pytest.approx(losses[name].item()), name + suffix


def test_num_boxes_is_averaged_across_processes(monkeypatch):
    targets = [{"labels": torch.zeros(3, dtype=torch.int64)}]
    monkeypatch.setattr(criterion_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(criterion_module.dist, "all_reduce", lambda tensor: tensor.add_(5))  # other rank: 5
    assert average_num_boxes(targets, torch.device("cpu")) == 4.0
    monkeypatch.setattr(criterion_module.dist, "all_reduce", lambda tensor: tensor.add_(0))
    assert average_num_boxes([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1.0  # clamped


@pytest.mark.parametrize(
    ("name", "two_stage"), [("deformable_detr_r50", False), ("deformable_detr_r50_refine_twostage", True)]
)
def test_focal_terms_match_official_deformable_losses(name, two_stage):
    fixture = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, classification="sigmoid")
    criterion = SetCriterion(
        91, matcher, weights={"loss_ce": 2}, num_aux_layers=5, two_stage=two_stage, classification="sigmoid"
    )
    losses = criterion(fixture["outputs"], fixture["targets"])
    assert set(losses) == set(fixture["losses"])
    for term, expected in fixture["losses"].items():
        assert losses[term].item() == pytest.approx(expected, rel=1e-4, abs=1e-6), term
    assert criterion.total_loss(losses).item() == pytest.approx(fixture["total_loss"], rel=1e-4)


# ------------------------------------------------------------------------ given indices and terms
class _FixedMatcher:
    """A matcher that returns the indices it was given (whatever the predictions)."""

    def __init__(self, indices):
        self.indices = indices

    def __call__(self, outputs, targets):
        return self.indices


def _two_image_case():
    torch.manual_seed(3)
    outputs = {"pred_logits": torch.randn(2, 5, 4), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.2}
    targets = [
        {"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])},
    ]
    return outputs, targets


def test_given_indices_give_the_losses_of_a_matcher_returning_them():
    outputs, targets = _two_image_case()
    indices = [(torch.tensor([4, 1]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    hungarian = _criterion(num_classes=3)
    def pairs(index_pairs):
        return [set(zip(q.tolist(), t.tolist(), strict=True)) for q, t in index_pairs]

    # The given indices are not the Hungarian ones, so they must really be used.
    assert pairs(hungarian.matcher(outputs, targets)) != pairs(indices)
    fixed = SetCriterion(3, _FixedMatcher(indices), num_aux_layers=0)
    expected = fixed(outputs, targets)
    given = hungarian.layer_losses(outputs, targets, 3.0, log=True, indices=indices)
    assert set(given) == set(expected)
    for name, value in expected.items():
        assert given[name].item() == pytest.approx(value.item(), rel=1e-6), name
    matched = hungarian.layer_losses(outputs, targets, 3.0, log=True)
    assert matched["loss_bbox"].item() < given["loss_bbox"].item()  # Hungarian: the cheapest pairs


def test_perfect_prediction_with_given_indices_has_zero_box_loss():
    outputs, targets = _two_image_case()
    boxes = outputs["pred_boxes"].clone()
    boxes[0, 4], boxes[0, 1] = targets[0]["boxes"][1], targets[0]["boxes"][0]
    boxes[1, 2] = targets[1]["boxes"][0]
    outputs = {**outputs, "pred_boxes": boxes}
    criterion = _criterion(num_classes=3)
    indices = [(torch.tensor([4, 1]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    losses = criterion.layer_losses(outputs, targets, 3.0, log=False, indices=indices)
    assert losses["loss_bbox"].item() == 0
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    assert "class_error" not in losses  # log=False: the auxiliary-layer form
    swapped = [(torch.tensor([1, 4]), torch.tensor([1, 0])), indices[1]]
    assert criterion.layer_losses(outputs, targets, 3.0, log=False, indices=swapped)["loss_bbox"].item() > 0
    with pytest.raises(ValueError, match="one \\(query, target\\) pair per image"):
        criterion.layer_losses(outputs, targets, 3.0, log=False, indices=indices[:1])


def test_terms_are_chosen_by_name():
    outputs, targets = _two_image_case()
    criterion = _criterion(num_classes=3, num_aux_layers=1, terms=["boxes"])
    losses = criterion({**outputs, "aux_outputs": [dict(outputs)]}, targets)
    assert set(losses) == {"loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"}
    assert set(criterion.weight_dict) == {"loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"}
    labels_only = _criterion(num_classes=3, terms=["labels"])
    assert set(labels_only(outputs, targets)) == {"loss_ce", "class_error"}
    bad_cases = {
        ("labels", "boxs"): r"'loss.terms\[1\]' is 'boxs'.*did you mean 'boxes'",
        (): "'loss.terms' must name at least one",
        ("boxes", "boxes"): r"'loss.terms\[1\]' repeats 'boxes'",
    }
    for bad, message in bad_cases.items():
        with pytest.raises(ValueError, match=message):
            _criterion(terms=list(bad))


def test_config_loss_terms_are_validated_and_reach_the_criterion():
    from detr_lab.config import ConfigError

    assert set(load_config().loss.terms) == {"labels", "cardinality", "boxes"}
    cfg = load_config(overrides=["loss.terms=[labels,boxs]"])  # names are checked against the table
    with pytest.raises(ValueError, match=r"'loss.terms\[1\]' is 'boxs'.*did you mean 'boxes'"):
        build_criterion(cfg.model, cfg.loss)
    with pytest.raises(ConfigError, match=r"'loss.terms\[1\]' repeats 'labels'"):
        load_config(overrides=["loss.terms=[labels,labels]"])
    with pytest.raises(ConfigError, match="'loss.terms' must name at least one"):
        load_config(overrides=["loss.terms=[]"])
    cfg = load_config(overrides=["model.aux_loss=false", "loss.terms=[labels,boxes]"])
    criterion = build_criterion(cfg.model, cfg.loss)
    assert list(criterion.loss_terms) == ["labels", "boxes"]
