"""MTKD loss terms on hand-computed cases: masked feature MSE, class KL, box L1 / GIoU, weights."""

import math

import pytest
import torch

from detr_lab.engine.distill import (
    DistillationLoss,
    box_distillation,
    class_distillation,
    masked_feature_mse,
    paired_generalized_box_iou,
)

# KL((0.5, 0.5) || (0.75, 0.25)) = 0.5 ln(0.5 / 0.75) + 0.5 ln(0.5 / 0.25)
KL_HALF_VS_THREE_QUARTERS = 0.5 * math.log(2 / 3) + 0.5 * math.log(2)


def test_feature_mse_averages_over_real_tokens_only():
    student = torch.zeros(1, 3, 2)
    teacher = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [100.0, 100.0]]])
    padding = torch.tensor([[False, False, True]])
    # (1 + 1 + 4 + 4) / (2 tokens x 2 channels); the padded token's 100s are ignored.
    assert masked_feature_mse(student, teacher, padding).item() == pytest.approx(2.5)
    assert masked_feature_mse(student, teacher).item() == pytest.approx((10 + 2 * 100**2) / 6)
    with pytest.raises(ValueError, match="memory"):
        masked_feature_mse(student, teacher[:, :2])


def test_softmax_class_kl_from_teacher_to_student():
    teacher = torch.tensor([[[0.0, 0.0]]])  # p = (0.5, 0.5)
    student = torch.tensor([[[math.log(3.0), 0.0]]])  # p = (0.75, 0.25)
    assert class_distillation(student, teacher, "softmax").item() == pytest.approx(KL_HALF_VS_THREE_QUARTERS)
    assert class_distillation(teacher, teacher, "softmax").item() == pytest.approx(0.0, abs=1e-7)


def test_sigmoid_class_kl_is_a_sum_of_bernoulli_divergences():
    teacher = torch.tensor([[[0.0, 0.0]]])  # each class p = 0.5
    student = torch.tensor([[[math.log(3.0), 0.0]]])  # p = 0.75, 0.5
    assert class_distillation(student, teacher, "sigmoid").item() == pytest.approx(KL_HALF_VS_THREE_QUARTERS)
    with pytest.raises(ValueError, match="classification"):
        class_distillation(student, teacher, "argmax")


def test_box_terms_pair_the_same_query_index():
    teacher = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    student = teacher.clone()
    student[0, 0, 0] = 0.6  # shifted right by 0.1: IoU 0.02 / 0.06, enclosing box = union
    l1, giou = box_distillation(student, teacher)
    assert l1.item() == pytest.approx(0.1 / 2)  # summed over coordinates, averaged over 2 queries
    assert giou.item() == pytest.approx((1 - 1 / 3) / 2)
    left, right = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    disjoint = paired_generalized_box_iou(left, right)
    assert disjoint.item() == pytest.approx(0 - (3 - 2) / 3)  # IoU 0, enclosing 3, union 2


def test_weights_cover_aux_layers_and_drop_zero_weights():
    loss = DistillationLoss(classification="softmax", feature_weight=0.0, box_l1_weight=5.0, num_aux_layers=2)
    assert "loss_feat" not in loss.weight_dict
    assert loss.weight_dict["loss_kd_bbox_1"] == 5.0 and loss.weight_dict["loss_kd_giou"] == 2.0
    names = ("loss_kd_ce", "loss_kd_bbox", "loss_kd_giou")
    assert set(loss.weight_dict) == {f"{name}{suffix}" for name in names for suffix in ("", "_0", "_1")}
    losses = {name: torch.tensor(1.0) for name in loss.weight_dict} | {"loss_feat": torch.tensor(100.0)}
    assert loss.total_loss(losses).item() == pytest.approx(3 * (1.0 + 5.0 + 2.0))


def test_forward_needs_the_memory():
    loss = DistillationLoss(classification="softmax")
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.full((1, 2, 4), 0.5)}
    with pytest.raises(ValueError, match="return_memory=True"):
        loss(outputs, outputs)
