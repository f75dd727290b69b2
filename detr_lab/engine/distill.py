"""Multi-task knowledge distillation (MTKD) of an ACT student from a plain-attention teacher.

ACT (Zheng et al., arXiv:2011.09315) replaces the encoder self-attention of a trained DETR by
adaptive clustering attention; MTKD then fine-tunes the ACT model (the student, initialised from the
teacher's weights) with its own Hungarian loss plus three distillation tasks against the frozen
original model (the teacher), on the same images:

- feature mimicking: mean squared error between the student's and the teacher's encoder outputs
  (`memory`), over the real (non-padded) tokens;
- box distillation: L1 and generalized IoU between the boxes that the student and the teacher
  predict *for the same query index* (the object queries are shared, so query i of the student is
  the counterpart of query i of the teacher: no matching is needed);
- class distillation: KL divergence from the teacher's class distribution of each query to the
  student's (softmax over the classes and "no object"; per-class Bernoulli for sigmoid heads).

Each term is averaged over the queries of the batch (all queries, with or without an object), and
repeated for every auxiliary decoder layer (suffix `_0`, `_1`, ...) when `aux_layers` is set, as the
Hungarian loss is. The terms are returned unweighted; `weight_dict` holds the weights.

    distiller = build_distiller(cfg)            # None unless cfg.distill.enabled
    outputs = model(images, padding_mask, return_memory=True)
    losses = distiller(outputs, images, padding_mask)
    total = criterion.total_loss(hungarian) + distiller.total_loss(losses)

The teacher is loaded with `load_checkpoint` (safe, weights-only loading), put in eval mode with
gradients off, and held by a plain Python object: it is not a submodule of the training system, so
it is neither optimized nor saved in the student's checkpoints.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from detr_lab.boxes import cxcywh_to_xyxy
from detr_lab.checkpoints import load_checkpoint, load_state_exactly
from detr_lab.config import Config, ConfigError, DistillConfig, ModelConfig
from detr_lab.models.classification import classification_strategy

FEATURE_TERM = "loss_feat"
CLASS_TERM = "loss_kd_ce"
BOX_L1_TERM = "loss_kd_bbox"
BOX_GIOU_TERM = "loss_kd_giou"


# ---------------------------------------------------------------------------------------- terms
def masked_feature_mse(student: Tensor, teacher: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Mean squared error of encoder outputs `[B, S, d]` over the real tokens and channels.

    `padding_mask` bool `[B, S]`, True = padding (those tokens are left out). Returns a scalar; zero
    when every token is padding.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student memory {tuple(student.shape)} and teacher memory {tuple(teacher.shape)} differ: "
            "feature mimicking needs the same feature map and width"
        )
    squared = (student - teacher.to(student.dtype)).pow(2).sum(-1)  # (B, S)
    if padding_mask is None:
        return squared.mean() / student.shape[-1]
    real = (~padding_mask).to(squared.dtype)
    return (squared * real).sum() / (real.sum().clamp(min=1) * student.shape[-1])


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU of corresponding xyxy boxes `[N, 4]` and `[N, 4]` -> `[N]` (not pairwise)."""
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(-1)
    union = area1 + area2 - inter
    enclosing = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).prod(-1)
    eps = torch.finfo(boxes1.dtype).eps
    return inter / union.clamp(min=eps) - (enclosing - union) / enclosing.clamp(min=eps)


def box_distillation(student_boxes: Tensor, teacher_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """L1 (summed over the 4 coordinates) and 1 - GIoU between same-index boxes, mean over queries.

    Boxes `[B, Q, 4]` normalized cxcywh.
    """
    student = student_boxes.reshape(-1, 4)
    teacher = teacher_boxes.reshape(-1, 4).to(student.dtype)
    l1 = (student - teacher).abs().sum(-1).mean()
    giou = paired_generalized_box_iou(cxcywh_to_xyxy(student), cxcywh_to_xyxy(teacher))
    return l1, (1 - giou).mean()


def class_distillation(student_logits: Tensor, teacher_logits: Tensor, classification: str) -> Tensor:
    """KL(teacher || student) of each query's class distribution, mean over queries.

    Logits `[B, Q, C]`: softmax over the C entries (classes + "no object"), or, for sigmoid heads,
    the sum over classes of the Bernoulli KL divergences (`Classification.distillation`).

    Raises:
        ValueError: an unknown classification name.
    """
    strategy = classification_strategy(classification)
    kl = strategy.distillation(student_logits.float(), teacher_logits.float())
    return kl.mean().to(student_logits.dtype)


class DistillationLoss(nn.Module):
    """The MTKD terms between student and teacher outputs (unweighted), and their weights.

    Args:
        classification: "softmax" or "sigmoid" (the heads of both models).
        feature_weight, class_kl_weight, box_l1_weight, box_giou_weight: weights of `loss_feat`,
            `loss_kd_ce`, `loss_kd_bbox`, `loss_kd_giou` (a zero weight drops the term).
        num_aux_layers: auxiliary decoder layers whose predictions are distilled too (suffix `_i`).
    """

    def __init__(
        self,
        *,
        classification: str,
        feature_weight: float = 1.0,
        class_kl_weight: float = 1.0,
        box_l1_weight: float = 5.0,
        box_giou_weight: float = 2.0,
        num_aux_layers: int = 0,
    ) -> None:
        super().__init__()
        self.classification = classification
        self.num_aux_layers = num_aux_layers
        prediction_weights = {
            CLASS_TERM: class_kl_weight,
            BOX_L1_TERM: box_l1_weight,
            BOX_GIOU_TERM: box_giou_weight,
        }
        weights = {FEATURE_TERM: feature_weight, **prediction_weights}
        for layer in range(num_aux_layers):
            weights.update({f"{name}_{layer}": weight for name, weight in prediction_weights.items()})
        self.weight_dict = {name: weight for name, weight in weights.items() if weight > 0}

    def prediction_terms(self, student: dict, teacher: dict) -> dict[str, Tensor]:
        """Class and box terms of one decoder layer: `pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]`."""
        for name in ("pred_logits", "pred_boxes"):
            if student[name].shape != teacher[name].shape:
                raise ValueError(
                    f"student {name} {tuple(student[name].shape)} and teacher {name} "
                    f"{tuple(teacher[name].shape)} differ: distillation pairs the same query index"
                )
        l1, giou = box_distillation(student["pred_boxes"], teacher["pred_boxes"])
        kl = class_distillation(student["pred_logits"], teacher["pred_logits"], self.classification)
        return {CLASS_TERM: kl, BOX_L1_TERM: l1, BOX_GIOU_TERM: giou}

    def forward(self, student: dict, teacher: dict) -> dict[str, Tensor]:
        """Unweighted terms from two output dicts of `model(images, padding_mask, return_memory=True)`.

        Both dicts hold `pred_logits`, `pred_boxes`, `aux_outputs`, `memory` `[B, S, d]` and
        `memory_padding_mask` bool `[B, S]` (True = padding). The teacher's should carry no gradient.
        Returns `loss_feat`, `loss_kd_ce`, `loss_kd_bbox`, `loss_kd_giou` and the last three
        suffixed `_i` for the first `num_aux_layers` auxiliary layers.
        """
        for name in ("memory", "memory_padding_mask"):
            if name not in student or name not in teacher:
                raise ValueError(f"distillation needs '{name}': call the models with return_memory=True")
        memory_mse = masked_feature_mse(student["memory"], teacher["memory"], student["memory_padding_mask"])
        losses = {FEATURE_TERM: memory_mse}
        losses.update(self.prediction_terms(student, teacher))
        student_aux, teacher_aux = student.get("aux_outputs") or [], teacher.get("aux_outputs") or []
        if min(len(student_aux), len(teacher_aux)) < self.num_aux_layers:
            raise ValueError(
                f"distilling {self.num_aux_layers} auxiliary layers, but the student has "
                f"{len(student_aux)} and the teacher {len(teacher_aux)}"
            )
        for layer in range(self.num_aux_layers):
            terms = self.prediction_terms(student_aux[layer], teacher_aux[layer])
            losses.update({f"{name}_{layer}": value for name, value in terms.items()})
        return losses

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum of the terms of `weight_dict` present in `losses` (zero if none)."""
        terms = [losses[name] * weight for name, weight in self.weight_dict.items() if name in losses]
        if not terms:
            return next(iter(losses.values())).new_zeros(()) if losses else torch.zeros(())
        return torch.stack(terms).sum()


# ------------------------------------------------------------------------------------ teacher
def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter; returns `model`."""
    model.eval()
    model.requires_grad_(False)
    return model


def check_compatible(student: ModelConfig, teacher: ModelConfig, source: str) -> None:
    """The options distillation pairs across the two models must agree (ConfigError naming the key)."""
    for key in ("num_classes", "num_queries", "classification", "hidden_dim"):
        mine, theirs = getattr(student, key), getattr(teacher, key)
        if mine != theirs:
            raise ConfigError(
                f"distill.teacher_checkpoint {source}: teacher 'model.{key}' is {theirs!r}, the student's "
                f"is {mine!r}; distillation pairs predictions by query index, so they must agree"
            )


class Distiller:
    """A frozen teacher and the MTKD loss; call it with the student's outputs and the batch.

    Not an `nn.Module` on purpose: the teacher stays out of the student's module tree (and so out of
    its optimizer, `state_dict` and checkpoints). The teacher follows the batch's device on first use.

    Args:
        teacher: a detector returning `memory` with `return_memory=True` (frozen here).
        loss: the `DistillationLoss`.
    """

    def __init__(self, teacher: nn.Module, loss: DistillationLoss) -> None:
        self.teacher = freeze(teacher)
        self.loss = loss

    @property
    def weight_dict(self) -> dict[str, float]:
        return self.loss.weight_dict

    def teacher_outputs(self, images: Tensor, padding_mask: Tensor) -> dict:
        """Teacher predictions and memory for images `[B, 3, H, W]`, padding_mask bool `[B, H, W]`."""
        parameter = next(self.teacher.parameters(), None)
        if parameter is not None and parameter.device != images.device:
            self.teacher.to(images.device)
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(images, padding_mask, return_memory=True)

    def __call__(self, student_outputs: dict, images: Tensor, padding_mask: Tensor) -> dict[str, Tensor]:
        """Unweighted MTKD terms (see `DistillationLoss.forward`) for the student's outputs on this batch."""
        return self.loss(student_outputs, self.teacher_outputs(images, padding_mask))

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        return self.loss.total_loss(losses)


def distilled_aux_layers(distill: DistillConfig, student: ModelConfig, teacher: ModelConfig) -> int:
    """Auxiliary decoder layers distilled: those both models predict from (none without `aux_layers`)."""
    if not distill.aux_layers:
        return 0
    student_aux = student.decoder.num_layers - 1 if student.aux_loss else 0
    teacher_aux = teacher.decoder.num_layers - 1 if teacher.aux_loss else 0
    return min(student_aux, teacher_aux)


def build_distillation_loss(
    distill: DistillConfig, model: ModelConfig, aux_layers: int = 0
) -> DistillationLoss:
    """The loss of `distill`'s weights for heads of type `model.classification`."""
    return DistillationLoss(
        classification=model.classification,
        feature_weight=distill.feature_weight,
        class_kl_weight=distill.class_kl_weight,
        box_l1_weight=distill.box_l1_weight,
        box_giou_weight=distill.box_giou_weight,
        num_aux_layers=aux_layers,
    )


def load_teacher(path: str | os.PathLike, student: ModelConfig) -> tuple[nn.Module, ModelConfig]:
    """The frozen teacher of `distill.teacher_checkpoint` (any file `load_checkpoint` reads) and its
    model config.

    Raises:
        ConfigError: the teacher's classes, queries, head type or width differ from the student's.
        CheckpointError: the file is missing or unreadable.
    """
    loaded = load_checkpoint(path)
    check_compatible(student, loaded.config.model, str(path))
    return freeze(loaded.model), loaded.config.model


def init_student(student: nn.Module, teacher: nn.Module, source: str) -> None:
    """Copy every teacher weight into the student; the two must have exactly the same tensors
    (an ACT student of a plain-attention teacher does: ACT adds no parameters).

    Raises:
        CheckpointError: naming the tensors that are missing, unexpected or of another shape.
    """
    load_state_exactly(student, teacher.state_dict(), f"student initialised from teacher {source}")


def build_distiller(cfg: Config) -> Distiller | None:
    """The `Distiller` of `cfg.distill`, or None when distillation is off."""
    distill = cfg.distill
    if not distill.enabled:
        return None
    if not distill.teacher_checkpoint:
        raise ConfigError("'distill.enabled' is true but 'distill.teacher_checkpoint' is not set")
    teacher, teacher_cfg = load_teacher(distill.teacher_checkpoint, cfg.model)
    aux_layers = distilled_aux_layers(distill, cfg.model, teacher_cfg)
    return Distiller(teacher, build_distillation_loss(distill, cfg.model, aux_layers))
