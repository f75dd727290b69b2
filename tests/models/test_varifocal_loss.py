"""The varifocal loss term against the official RT-DETRv2 criterion: on the official model's training
outputs in `tests/fixtures/rtdetrv2_r18vd.pt` (shared reference fixture), the matcher, VFL and box
terms of every layer and the encoder proposals give the official values; and a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch

from detr_lab.models.criterion import SetCriterion
from detr_lab.models.groups import main_groups
from detr_lab.models.matcher import HungarianMatcher

from factories import FIXTURES

FIXTURE = torch.load(FIXTURES / "rtdetrv2_r18vd.pt", weights_only=True)


def _criterion() -> SetCriterion:
    """RT-DETRv2's official criterion settings: VFL (alpha 0.75, gamma 2) + boxes, weights 1 / 5 / 2;
    matcher costs class 2, L1 5, GIoU 2 with the focal class cost (alpha 0.25, gamma 2)."""
    matcher = HungarianMatcher(2.0, 5.0, 2.0, classification="sigmoid", focal_alpha=0.25, focal_gamma=2.0)
    return SetCriterion(
        80, matcher, classification="sigmoid", terms=["vfl", "boxes"],
        groups=main_groups(2, proposals="classes"), term_options={"vfl": {"alpha": 0.75, "gamma": 2.0}},
    )  # fmt: skip


def test_matching_and_every_term_match_the_official_criterion():
    train = FIXTURE["train_outputs"]
    outputs = {
        "pred_logits": train["pred_logits"], "pred_boxes": train["pred_boxes"],
        "aux_outputs": train["aux_outputs"], "enc_outputs": train["enc_aux_outputs"][0],
    }  # fmt: skip
    criterion = _criterion()
    indices = criterion.matcher(outputs, FIXTURE["targets"])
    for (queries, targets), (official_q, official_t) in zip(indices, FIXTURE["matcher_indices"], strict=True):
        assert queries.tolist() == official_q.tolist() and targets.tolist() == official_t.tolist()
    losses = criterion(outputs, FIXTURE["targets"])
    # Official names -> ours: `_aux_i` -> `_i`, `_enc_0` -> `_enc`.
    expected = {name.replace("_aux_", "_").replace("_enc_0", "_enc"): value
                for name, value in FIXTURE["losses"].items()}  # fmt: skip
    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(float(value), rel=1e-5), name
    official = FIXTURE["weight_dict"].items()
    weights = {n.replace("_aux_", "_").replace("_enc_0", "_enc"): w for n, w in official}
    assert criterion.weight_dict == weights


def test_varifocal_loss_by_hand():
    # One image, two queries, two classes; query 0 is matched to an object of class 1 at IoU 1/2.
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    target_box = torch.tensor([[0.5, 0.5, 0.2, 0.4]])  # contains the prediction: IoU 0.04 / 0.08
    criterion = SetCriterion(
        2, HungarianMatcher(classification="sigmoid"), classification="sigmoid", terms=["vfl"],
        num_aux_layers=0, term_options={"vfl": {"alpha": 0.75}},
    )  # fmt: skip
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    targets = [{"labels": torch.tensor([1]), "boxes": target_box}]
    value = criterion.layer_losses({"pred_logits": logits, "pred_boxes": boxes}, targets, 1.0, log=False,
                                   indices=indices)["loss_vfl"].item()  # fmt: skip

    def bce(x, t):
        p = 1 / (1 + math.exp(-x))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    def sig(x):
        return 1 / (1 + math.exp(-x))

    iou = 0.5
    terms = [  # (logit, soft target, weight): target iou for (query 0, class 1); 0.75 p^2 for negatives
        (0.5, 0.0, 0.75 * sig(0.5) ** 2), (-1.0, iou, iou),
        (2.0, 0.0, 0.75 * sig(2.0) ** 2), (0.0, 0.0, 0.75 * sig(0.0) ** 2),
    ]  # fmt: skip
    per_query = [terms[0][2] * bce(*terms[0][:2]) + terms[1][2] * bce(*terms[1][:2]),
                 terms[2][2] * bce(*terms[2][:2]) + terms[3][2] * bce(*terms[3][:2])]  # fmt: skip
    expected = sum(q / 2 for q in per_query) * 2 / 1.0  # mean over queries, summed, x Q / num_boxes
    assert value == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="'vfl' needs 'model.classification: sigmoid'"):
        SetCriterion(2, HungarianMatcher(), classification="softmax", terms=["vfl"])
