"""Classification strategies: how class logits are made, scored, matched and turned into detections.

One object per strategy replaces string tests of `model.classification` across the model, the
criterion, the matcher, the post-processing and the distillation:

- `SoftmaxClassification` (DETR, Carion et al. 2020): `num_classes + 1` logits, the last one is
  "no object"; cross-entropy with a down-weighted "no object" class; one detection per query.
- `SigmoidFocalClassification` (Deformable DETR, DINO; focal loss of Lin et al. 2017): `num_classes`
  independent logits; focal loss summed over queries and classes and divided by the box count;
  the best (query, class) pairs of an image are its detections.

A new strategy is one class here plus one line in `CLASSIFICATIONS`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FOCAL_PRIOR = 0.01  # sigmoid heads start out predicting every class with this probability


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (Lin et al. 2017) of logits and 0/1 targets of the same shape."""
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


class SoftmaxClassification:
    """Softmax over `num_classes + 1` logits; index `num_classes` is "no object".

    Args:
        eos_coef: weight of the "no object" class in the cross-entropy (DETR: 0.1).
    """

    name = "softmax"

    def __init__(self, *, eos_coef: float = 0.1, **_: float) -> None:
        self.eos_coef = eos_coef

    @staticmethod
    def num_logits(num_classes: int) -> int:
        return num_classes + 1

    def class_head(self, hidden_dim: int, num_classes: int) -> nn.Linear:
        """`Linear(d, num_classes + 1)` with PyTorch's default initialisation."""
        return nn.Linear(hidden_dim, self.num_logits(num_classes))

    def loss(self, logits: Tensor, target_classes: Tensor, num_boxes: float | Tensor) -> Tensor:
        """Cross-entropy over all queries: logits `[B, Q, C + 1]`, target_classes int64 `[B, Q]`
        (`C` = "no object" for unmatched queries). `num_boxes` is not used (a mean over queries)."""
        weights = torch.ones(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        weights[-1] = self.eos_coef
        return F.cross_entropy(logits.transpose(1, 2), target_classes, weights)

    @staticmethod
    def match_cost(logits: Tensor, target_labels: Tensor) -> Tensor:
        """logits `[N, C + 1]`, target_labels int64 `[M]` -> `-p(target class)` `[N, M]`."""
        return -logits.softmax(-1)[:, target_labels]

    @staticmethod
    def probabilities(logits: Tensor) -> Tensor:
        """`[..., C + 1]` -> class probabilities `[..., C]` ("no object" dropped)."""
        return logits.softmax(-1)[..., :-1]

    @staticmethod
    def detections(logits: Tensor, boxes: Tensor, num_top: int) -> tuple[Tensor, Tensor, Tensor]:
        """Each query's best real class: -> scores `[B, Q]`, labels int64 `[B, Q]`, boxes `[B, Q, 4]`."""
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        return scores, labels, boxes

    @staticmethod
    def distillation(student: Tensor, teacher: Tensor) -> Tensor:
        """KL(teacher || student) of each query's softmax distribution: `[B, Q, C]` x 2 -> `[B, Q]`."""
        teacher_log = F.log_softmax(teacher, dim=-1)
        return (teacher_log.exp() * (teacher_log - F.log_softmax(student, dim=-1))).sum(-1)


class SigmoidFocalClassification:
    """Independent sigmoid per class with the focal loss; no "no object" logit.

    Args:
        focal_alpha, focal_gamma: the focal loss's alpha (negative: no class balancing) and gamma.
    """

    name = "sigmoid"

    def __init__(self, *, focal_alpha: float = 0.25, focal_gamma: float = 2.0, **_: float) -> None:
        self.alpha = focal_alpha
        self.gamma = focal_gamma

    @staticmethod
    def num_logits(num_classes: int) -> int:
        return num_classes

    def class_head(self, hidden_dim: int, num_classes: int) -> nn.Linear:
        """`Linear(d, num_classes)` whose bias starts at logit(0.01), the focal-loss prior."""
        head = nn.Linear(hidden_dim, num_classes)
        nn.init.constant_(head.bias, -math.log((1 - FOCAL_PRIOR) / FOCAL_PRIOR))
        return head

    def loss(self, logits: Tensor, target_classes: Tensor, num_boxes: float | Tensor) -> Tensor:
        """Focal loss of logits `[B, Q, C]` against one-hot targets (class `C` = all negative), summed
        and divided by `num_boxes`, as Deformable DETR (`mean(1).sum() * Q / num_boxes`)."""
        one_hot = torch.zeros(
            (*logits.shape[:2], logits.shape[-1] + 1), dtype=logits.dtype, device=logits.device
        )
        one_hot.scatter_(2, target_classes.unsqueeze(-1), 1)
        focal = sigmoid_focal_loss(logits, one_hot[..., :-1], alpha=self.alpha, gamma=self.gamma)
        return focal.mean(1).sum() / num_boxes * logits.shape[1]

    def match_cost(self, logits: Tensor, target_labels: Tensor) -> Tensor:
        """Focal cost difference `alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))` of the
        target class: logits `[N, C]`, target_labels int64 `[M]` -> `[N, M]` (Deformable DETR's matcher)."""
        prob = logits.sigmoid()
        negative = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        positive = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        return positive[:, target_labels] - negative[:, target_labels]

    @staticmethod
    def probabilities(logits: Tensor) -> Tensor:
        return logits.sigmoid()

    @staticmethod
    def detections(logits: Tensor, boxes: Tensor, num_top: int) -> tuple[Tensor, Tensor, Tensor]:
        """The `num_top` best (query, class) pairs of each image, best first:
        -> scores `[B, K]`, labels int64 `[B, K]`, boxes `[B, K, 4]` (K = min(num_top, Q * C))."""
        num_classes = logits.shape[-1]
        top = min(num_top, logits.shape[1] * num_classes)
        scores, flat_index = logits.sigmoid().flatten(1).topk(top, dim=1)  # (B, K): query * C + class
        labels = flat_index % num_classes
        query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
        return scores, labels, boxes.gather(1, query_index[..., None].expand(-1, -1, 4))

    @staticmethod
    def distillation(student: Tensor, teacher: Tensor) -> Tensor:
        """Sum over classes of the Bernoulli KL(teacher || student): `[B, Q, C]` x 2 -> `[B, Q]`."""
        teacher_p = teacher.sigmoid()
        positive = teacher_p * (F.logsigmoid(teacher) - F.logsigmoid(student))
        negative = (1 - teacher_p) * (F.logsigmoid(-teacher) - F.logsigmoid(-student))
        return (positive + negative).sum(-1)


Classification = SoftmaxClassification | SigmoidFocalClassification

# model.classification -> strategy class (constructed with the loss config's eos_coef / focal_* values).
CLASSIFICATIONS: dict[str, type] = {"softmax": SoftmaxClassification, "sigmoid": SigmoidFocalClassification}


def classification_strategy(name: str, **options: float) -> Classification:
    """The strategy called `name` with its options (`eos_coef`, `focal_alpha`, `focal_gamma`; each
    strategy reads its own and ignores the others).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in CLASSIFICATIONS:
        raise ValueError(f"classification must be one of {', '.join(CLASSIFICATIONS)}, got {name!r}")
    return CLASSIFICATIONS[name](**options)
