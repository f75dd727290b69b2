from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from detr_lab.boxes import cxcywh_to_xyxy, generalized_box_iou
from detr_lab.models.matcher import HungarianMatcher

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _random_outputs(batch=2, queries=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(batch, queries, classes + 1, generator=g),
        "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.1,
    }


def _random_targets(sizes, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "labels": torch.randint(0, classes, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.1,
        }
        for n in sizes
    ]


def test_obvious_assignment():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.3, 0.3], [0.8, 0.7, 0.2, 0.2]]])
    logits = torch.zeros(1, 3, 3)
    targets = [
        {"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.8, 0.7, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])}
    ]
    ((queries, matched),) = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert queries.tolist() == [0, 2] and matched.tolist() == [1, 0]
    assert queries.dtype == matched.dtype == torch.int64


def test_matching_reaches_the_brute_force_minimum():
    outputs = _random_outputs(batch=1, queries=5)
    targets = _random_targets([3])
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    ((queries, matched),) = matcher(outputs, targets)
    prob = outputs["pred_logits"][0].softmax(-1)
    boxes, target = outputs["pred_boxes"][0], targets[0]

    def cost(q, t):
        l1 = (boxes[q] - target["boxes"][t]).abs().sum()
        giou = generalized_box_iou(
            cxcywh_to_xyxy(boxes[q : q + 1]), cxcywh_to_xyxy(target["boxes"][t : t + 1])
        )[0, 0]
        return float(5 * l1 - prob[q, target["labels"][t]] - 2 * giou)

    best = min(
        sum(cost(q, t) for t, q in enumerate(assignment))
        for assignment in itertools.permutations(range(5), 3)
    )
    found = sum(cost(q, t) for q, t in zip(queries.tolist(), matched.tolist(), strict=True))
    assert found == pytest.approx(best, abs=1e-5)


def test_invariant_to_permuting_targets():
    outputs = _random_outputs(batch=2, queries=8)
    targets = _random_targets([4, 3])
    matcher = HungarianMatcher()
    reference = matcher(outputs, targets)
    permutations = [torch.tensor([2, 0, 3, 1]), torch.tensor([1, 2, 0])]
    permuted = [{k: t[k][p] for k in ("labels", "boxes")} for t, p in zip(targets, permutations, strict=True)]
    for (queries, matched), (p_queries, p_matched), perm in zip(
        reference, matcher(outputs, permuted), permutations, strict=True
    ):
        pairs = set(zip(queries.tolist(), matched.tolist(), strict=True))
        p_pairs = {(q, int(perm[t])) for q, t in zip(p_queries.tolist(), p_matched.tolist(), strict=True)}
        assert pairs == p_pairs


def test_images_without_targets():
    outputs = _random_outputs(batch=3)
    indices = HungarianMatcher()(outputs, _random_targets([0, 2, 0]))
    assert [len(q) for q, _ in indices] == [0, 2, 0]
    empty = HungarianMatcher()(outputs, _random_targets([0, 0, 0]))
    assert all(len(q) == 0 and len(t) == 0 for q, t in empty)


def test_non_finite_costs_raise():
    outputs = _random_outputs(batch=2)
    outputs["pred_logits"][1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite matching cost for image 1"):
        HungarianMatcher()(outputs, _random_targets([1, 2]))
    outputs = _random_outputs(batch=2)
    outputs["pred_boxes"][0, 2, 1] = float("inf")
    with pytest.raises(
        ValueError, match=r"non-finite values in outputs\['pred_boxes'\] for image\(s\) \[0\]"
    ):
        HungarianMatcher()(outputs, _random_targets([1, 2]))
    targets = _random_targets([1, 2])
    targets[1]["boxes"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]"):
        HungarianMatcher()(_random_outputs(batch=2), targets)


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 targets for a batch of 3"):
        HungarianMatcher()(_random_outputs(batch=3), _random_targets([1, 1]))
    with pytest.raises(ValueError, match="all matching costs are 0"):
        HungarianMatcher(0, 0, 0)
    with pytest.raises(ValueError, match="classification"):
        HungarianMatcher(classification="softmaxx")


@pytest.mark.parametrize("name", ["deformable_detr_r50", "deformable_detr_r50_refine_twostage"])
def test_focal_class_cost_matches_official_deformable_matching(name):
    fixture = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, classification="sigmoid")
    indices = matcher(fixture["outputs"], fixture["targets"])
    for (queries, matched), (ref_queries, ref_matched) in zip(
        indices, fixture["matcher_indices"], strict=True
    ):
        assert queries.tolist() == ref_queries.tolist() and matched.tolist() == ref_matched.tolist()


@pytest.mark.parametrize("classification", ["softmax", "sigmoid"])
def test_costs_are_float32_under_bf16_autocast(monkeypatch, classification):
    """bf16 outputs under bf16 autocast: the solver gets float32 costs, equal to the costs computed
    from the same values upcast to float64 (bf16 arithmetic would be off by ~1e-2)."""
    import detr_lab.models.matcher as matcher_module

    solved = []

    def spy(cost):
        solved.append(cost)
        return real_solver(cost)

    real_solver = matcher_module.linear_sum_assignment
    monkeypatch.setattr(matcher_module, "linear_sum_assignment", spy)
    matcher = HungarianMatcher(cost_class=2.0, classification=classification)
    outputs = {k: v.bfloat16() for k, v in _random_outputs(batch=1, queries=7).items()}
    targets = _random_targets([3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ((queries, matched),) = matcher(outputs, targets)
    (cost,) = solved
    assert cost.dtype == "float32"

    logits, boxes = outputs["pred_logits"][0].double(), outputs["pred_boxes"][0].double()
    target_boxes, labels = targets[0]["boxes"].double(), targets[0]["labels"]
    if classification == "softmax":
        class_cost = -logits.softmax(-1)[:, labels]
    else:
        prob = logits.sigmoid()
        negative = 0.75 * prob**2 * -(1 - prob + 1e-8).log()
        positive = 0.25 * (1 - prob) ** 2 * -(prob + 1e-8).log()
        class_cost = (positive - negative)[:, labels]
    expected = (5 * torch.cdist(boxes, target_boxes, p=1) + 2 * class_cost
                - 2 * generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(target_boxes)))
    torch.testing.assert_close(torch.from_numpy(cost).double(), expected, atol=1e-5, rtol=1e-5)
    assert len(queries) == len(matched) == 3
