"""D-FINE's distribution refinement parts and losses, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from detr_lab.models.classification import classification_strategy
from detr_lab.models.distribution import (
    LocationQuality,
    box_to_distance,
    distance_to_box,
    integral,
    weighting_function,
)
from detr_lab.models.loss_terms import (
    TermInputs,
    decoupled_distillation_term,
    fine_grained_localization_term,
    matchability_term,
)


def test_weighting_function_by_hand_for_reg_max_8():
    # a = up * reg_scale = 0.5 * 4 = 2; step s = (a + 1) ** (2 / (8 - 2)) = 3 ** (1 / 3)
    s = 3 ** (1 / 3)
    expected = [-4, -(s**3 - 1), -(s**2 - 1), -(s - 1), 0, s - 1, s**2 - 1, s**3 - 1, 4]
    values = weighting_function(8, 0.5, 4.0)
    assert values.shape == (9,)
    assert values.tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[1] == pytest.approx(-2.0)  # s ** 3 - 1 = a: the inner ends reach +-up * reg_scale


def test_weighting_function_official_size_is_symmetric_and_increasing():
    values = weighting_function(32, torch.tensor([0.5]), torch.tensor([4.0]))
    assert values.shape == (33,)
    assert torch.allclose(values, -values.flip(0))
    assert (values.diff() > 0).all()
    assert values[16] == 0 and values[0] == -4 and values[-1] == 4
    with pytest.raises(ValueError, match="even"):
        weighting_function(7, 0.5, 4.0)


def test_integral_is_the_expected_bin_value():
    project = torch.tensor([-1.0, 0.0, 2.0])  # reg_max 2 (not a D-FINE size: the integral does not care)
    logits = torch.full((1, 4 * 3), -1e4)
    logits[0, 2] = 0.0  # edge 0: all mass on bin 2 -> 2
    logits[0, 3 + 0] = logits[0, 3 + 1] = 0.0  # edge 1: half on -1, half on 0 -> -0.5
    logits[0, 6 + 1] = 0.0  # edge 2: 0
    logits[0, 9:12] = 0.0  # edge 3: uniform -> (-1 + 0 + 2) / 3
    assert integral(logits, project)[0].tolist() == pytest.approx([2.0, -0.5, 0.0, 1 / 3])


def test_distance_to_box_by_hand_and_its_inverse():
    reference = torch.tensor([[0.5, 0.4, 0.2, 0.1]])  # cx, cy, w, h
    # reg_scale 4: edges at 0.5 * 4 + d units of (w, h) / 4 from the centre; zero distances: the box itself
    unchanged = distance_to_box(reference, torch.zeros(1, 4), 4.0)
    assert unchanged.tolist()[0] == pytest.approx([0.5, 0.4, 0.2, 0.1])
    box = distance_to_box(reference, torch.tensor([[1.0, 0.0, 0.0, 2.0]]), 4.0)[0]
    # left edge 0.5 - 3 * 0.05 = 0.35, right 0.5 + 2 * 0.05 = 0.6, top 0.4 - 2 * 0.025 = 0.35,
    # bottom 0.4 + 4 * 0.025 = 0.5
    assert box.tolist() == pytest.approx([0.475, 0.425, 0.25, 0.15])
    target_xyxy = torch.tensor([[0.35, 0.35, 0.6, 0.5]])
    values = weighting_function(32, 0.5, 4.0)
    bins, right, left = box_to_distance(reference, target_xyxy, 32, 4.0, 0.5)
    recovered = values[bins.long()] * left + values[bins.long() + 1] * right
    assert recovered.tolist() == pytest.approx([1.0, 0.0, 0.0, 2.0], abs=1e-5)
    assert (left + right).tolist() == pytest.approx([1.0] * 4)
    assert bins[1].item() == 16 and right[1].item() == pytest.approx(0.0, abs=1e-4)  # offset 0: centre bin


def test_box_to_distance_outside_the_range_goes_to_the_end_bins():
    reference = torch.tensor([[0.5, 0.5, 0.1, 0.1]])
    far = torch.tensor([[0.0, 0.49, 0.51, 1.0]])  # left edge 20 units out; bottom 18 units
    bins, right, left = box_to_distance(reference, far, 32, 4.0, 0.5)
    assert bins[0].item() == pytest.approx(31.9) and right[0].item() == 1.0 and left[0].item() == 0.0
    # a point-sized target at the centre: every offset 0 - 2 = -2, between two bins left of the centre
    near = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    bins, right, left = box_to_distance(reference, near, 32, 4.0, 0.5)
    assert (bins < 16).all() and torch.allclose(left + right, torch.ones(4))


def fgl_inputs(corners: torch.Tensor, reference: torch.Tensor, target: torch.Tensor, pred: torch.Tensor):
    predictions = {
        "pred_logits": torch.zeros(1, 1, 3, dtype=corners.dtype),
        "pred_boxes": pred[None],
        "pred_corners": corners[None],
        "ref_points": reference[None],
    }
    targets = [{"labels": torch.tensor([0]), "boxes": target}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    return TermInputs(
        predictions,
        targets,
        indices,
        1.0,
        classification_strategy("sigmoid"),
        3,
        options={"reg_max": 32, "reg_scale": 4.0, "up": torch.tensor([0.5], dtype=corners.dtype)},
    )


def test_fgl_is_zero_for_a_perfect_distribution():
    # float64, so that each offset lands on its bin (float32 leaves ~1e-6 of weight on a neighbour)
    values = weighting_function(32, torch.tensor([0.5], dtype=torch.float64), 4.0)
    reference = torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)
    distances = values[[10, 16, 20, 5]]  # every edge exactly on a bin
    target = distance_to_box(reference, distances[None], 4.0)
    corners = torch.full((4, 33), -40.0, dtype=torch.float64)
    for edge, index in enumerate((10, 16, 20, 5)):
        corners[edge, index] = 0.0
    loss = fine_grained_localization_term(fgl_inputs(corners.reshape(1, -1), reference, target, target))
    assert loss["loss_fgl"].item() == pytest.approx(0.0, abs=1e-9)
    # an offset half-way between two bins: the best distribution puts half the mass on each, and
    # the loss is then the entropy ln 2 per edge, times the IoU (1 here) and 4 edges
    half = (values[[10, 16, 20, 5]] + values[[11, 17, 21, 6]]) / 2
    target = distance_to_box(reference, half[None], 4.0)
    for edge, index in enumerate((10, 16, 20, 5)):
        corners[edge, index + 1] = 0.0
    loss = fine_grained_localization_term(fgl_inputs(corners.reshape(1, -1), reference, target, target))
    assert loss["loss_fgl"].item() == pytest.approx(4 * math.log(2), rel=1e-4)


def test_ddf_zero_without_teacher_and_kl_by_hand():
    torch.set_default_dtype(torch.float64)  # the divergence is small: compare it without float32 rounding
    try:
        ddf_by_hand()
    finally:
        torch.set_default_dtype(torch.float32)


def ddf_by_hand():
    corners = torch.zeros(1, 2, 4 * 33)
    base = {
        "pred_logits": torch.zeros(1, 2, 3),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]]),
        "pred_corners": corners,
    }
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    sigmoid = classification_strategy("sigmoid")
    assert decoupled_distillation_term(TermInputs(base, targets, indices, 1.0, sigmoid, 3))["loss_ddf"] == 0
    teacher = torch.zeros(1, 2, 4 * 33)
    teacher[0, 1, 0] = math.log(2.0)  # query 1, edge 0: bin 0 twice as likely as each other bin
    logits = torch.full((1, 2, 3), -10.0)
    logits[0, 1, 2] = 0.0  # query 1's best class probability 0.5
    inputs = TermInputs(
        {**base, "teacher_corners": teacher, "teacher_logits": logits}, targets, indices, 1.0, sigmoid, 3
    )
    loss = decoupled_distillation_term(inputs)["loss_ddf"].item()
    # T = 5: teacher p = softmax(t / 5) over 33 bins, student uniform q = 1/33; KL(p || q) * 25 * 0.5
    t = torch.zeros(33)
    t[0] = math.log(2.0) / 5
    p = t.softmax(0)
    kl = (p * (p.log() - math.log(1 / 33))).sum().item()
    per_edge = [0.0] * 4 + [25 * 0.5 * kl, 0.0, 0.0, 0.0]  # query 0 matched (student = teacher: 0)
    # matched mean 0 (weight IoU 1, divergence 0), unmatched mean over query 1's 4 edges
    num_pos, num_neg = (4 * 8) ** 0.5, (4 * 8) ** 0.5  # 4 matched and 4 unmatched entries, 8 / B = 8
    expected = (0.0 * num_pos + sum(per_edge[4:]) / 4 * num_neg) / (num_pos + num_neg)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_mal_by_hand():
    logits = torch.tensor([[[0.0, 1.0], [-1.0, 2.0]]])  # B=1, Q=2, C=2
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    target = torch.tensor([[0.5, 0.5, 0.2, 0.4]])  # IoU with query 0: 0.04 / 0.08 = 0.5
    inputs = TermInputs(
        {"pred_logits": logits, "pred_boxes": boxes},
        [{"labels": torch.tensor([1]), "boxes": target}],
        [(torch.tensor([0]), torch.tensor([0]))],
        1.0,
        classification_strategy("sigmoid"),
        2,
        options={"gamma": 1.5},
    )
    loss = matchability_term(inputs)["loss_mal"].item()

    def bce(x, y):
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # (query 0, class 1) is the positive: target 0.5 ** 1.5, weight 1; negatives: target 0, weight p^1.5
    terms = [
        sig(0.0) ** 1.5 * bce(0.0, 0.0),
        1.0 * bce(1.0, 0.5**1.5),
        sig(-1.0) ** 1.5 * bce(-1.0, 0.0),
        sig(2.0) ** 1.5 * bce(2.0, 0.0),
    ]
    # mean over queries, summed over classes and images, times Q / num_boxes = 2
    expected = (sum(terms) / 2) * 2 / 1.0
    assert loss == pytest.approx(expected, rel=1e-6)


def test_location_quality_starts_as_identity_and_reads_the_top_probabilities():
    lqe = LocationQuality(32)
    logits = torch.randn(2, 5, 3)
    corners = torch.randn(2, 5, 4 * 33)
    assert torch.equal(lqe(logits, corners), logits)
    with torch.no_grad():
        lqe.reg_conf.layers[-1].bias.fill_(0.25)
    assert torch.allclose(lqe(logits, corners), logits + 0.25)
