"""Contrastive denoising queries (DINO, Zhang et al. 2022, arXiv:2203.03605, section 3.3).

During training, every ground-truth object is copied into `groups` denoising groups, each holding a
positive query (box noised by less than `box_noise_scale` x half its size) and a negative query
(noised by between 1 and 2 times that), with `label_noise_ratio / 2` of the labels flipped to a random
class. The positive queries learn to reconstruct their object (losses with known indices, no
matching); negatives learn "no object". This follows `prepare_for_cdn` of the official
IDEA-Research/DINO code (models/dino/dn_components.py).

Layout along the query axis (`P = pad_size = 2 * groups * group_size`, `group_size` = most objects in
an image of the batch): group g occupies `[2 g S, 2 (g + 1) S)` with its positives first and its
negatives next (S = group_size), object j of an image at offset j; slots of images with fewer objects
are padding (zero content, box (0.5, 0.5, 0.5, 0.5)). The matching queries follow at `P..P+Q`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detr_lab.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from detr_lab.models.queries.query_set import QuerySet
from detr_lab.models.transformer import inverse_sigmoid

DINO_LOGIT_EPS = 1e-3  # the official DINO inverse_sigmoid clamp


@dataclass(frozen=True)
class DenoisingLayout:
    """Where the denoising queries sit: `groups` groups of `2 * group_size` queries, `pad_size` in all."""

    groups: int
    group_size: int

    @property
    def pad_size(self) -> int:
        return 2 * self.groups * self.group_size

    def positive_indices(self, num_objects: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """(query index, target index) of every positive query of an image with `num_objects` objects,
        each int64 `[groups * num_objects]`, group by group."""
        objects = torch.arange(num_objects, dtype=torch.int64, device=device)
        starts = torch.arange(self.groups, dtype=torch.int64, device=device) * 2 * self.group_size
        queries = (starts[:, None] + objects[None]).flatten()
        return queries, objects.repeat(self.groups)


def num_denoising_groups(dn_number: int, max_objects: int) -> int:
    """The official group count: with `n = 2 * dn_number`, `n // (2 * max_objects)` when `n >= 100`,
    `n` itself when `n < 100`, and at least 1 (also 1 when no image has objects)."""
    if max_objects == 0:
        return 1
    total = 2 * dn_number
    groups = total // (2 * max_objects) if total >= 100 else total
    return max(groups, 1)


def denoising_attn_mask(
    layout: DenoisingLayout, num_queries: int, device: torch.device | None = None
) -> Tensor:
    """Decoder self-attention mask, bool `[P + Q, P + Q]`, True = may NOT attend.

    Matching queries (the last Q) do not see any denoising query; a denoising group sees itself and
    the matching queries but no other group.
    """
    pad, size = layout.pad_size, 2 * layout.group_size
    total = pad + num_queries
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True
    for group in range(layout.groups):
        rows = slice(group * size, (group + 1) * size)
        mask[rows, : group * size] = True
        mask[rows, (group + 1) * size : pad] = True
    return mask


def noise_boxes(
    boxes: Tensor, negative: Tensor, scale: float, generator: torch.Generator | None = None
) -> Tensor:
    """Shift each corner of normalized cxcywh boxes `[N, 4]` by a random fraction of half the box size.

    Positives (`negative` False, bool `[N]`) move by `|u| * scale * size / 2` with u in [0, 1);
    negatives by `(1 + u) * scale * size / 2`; random sign per coordinate; corners clamped to [0, 1].
    Returns `[N, 4]` normalized cxcywh.
    """
    corners = cxcywh_to_xyxy(boxes)
    half = boxes[:, 2:].repeat(1, 2) / 2  # (N, 4): w/2, h/2, w/2, h/2
    sign = torch.randint(0, 2, boxes.shape, generator=generator, device=boxes.device).to(boxes.dtype) * 2 - 1
    part = torch.rand(boxes.shape, generator=generator, device=boxes.device, dtype=boxes.dtype)
    part = part + negative[:, None].to(boxes.dtype)
    corners = (corners + part * sign * half * scale).clamp(0.0, 1.0)
    return xyxy_to_cxcywh(corners)


class ContrastiveDenoising(nn.Module):
    """Makes the denoising queries from the targets.

    Args:
        embed_dim: model width d. num_classes: real classes (labels are flipped into 0..C-1).
        dn_number: the query budget (see `num_denoising_groups`). label_noise_ratio: labels flip with
        probability `label_noise_ratio / 2`. box_noise_scale: see `noise_boxes`.

    Attributes: `label_embed` (`nn.Embedding(num_classes + 1, d)`, DINO's `label_enc`; the last row is
    never used by a query but kept as the official layout has it).
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        dn_number: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 0.4,
    ) -> None:
        super().__init__()
        if dn_number <= 0 or label_noise_ratio < 0 or box_noise_scale < 0:
            raise ValueError(
                f"denoising needs dn_number > 0 and non-negative noise, got dn_number={dn_number}, "
                f"label_noise_ratio={label_noise_ratio}, box_noise_scale={box_noise_scale}"
            )
        self.num_classes = num_classes
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.label_embed = nn.Embedding(num_classes + 1, embed_dim)

    def forward(
        self, targets: list[dict], num_queries: int, generator: torch.Generator | None = None
    ) -> QuerySet:
        """Denoising queries for a batch.

        Args:
            targets: B dicts with `labels` int64 `[N_i]` (0..C-1) and `boxes` `[N_i, 4]` normalized cxcywh.
            num_queries: matching queries that will follow (the mask covers them).
        Returns:
            `QuerySet`: queries `[B, P, d]`, reference boxes `[B, P, 4]`, attn_mask `[P + Q, P + Q]`,
            meta `{"dn_layout": DenoisingLayout}` (P may be 0 when no image has objects).
        Raises:
            RuntimeError: a label outside 0..num_classes-1 (on a GPU, a device-side assertion).
        """
        device, dtype = self.label_embed.weight.device, self.label_embed.weight.dtype  # float64 models too
        counts = [len(t["labels"]) for t in targets]
        batch, max_objects = len(targets), max(counts, default=0)
        layout = DenoisingLayout(num_denoising_groups(self.dn_number, max_objects), max_objects)
        labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.int64)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=dtype)
        if labels.numel():  # checked on the device: no host read in the training step
            torch._assert_async(
                ((labels >= 0) & (labels < self.num_classes)).all(),
                f"denoising: target labels must be in 0..{self.num_classes - 1}",
            )
        copies = 2 * layout.groups  # positive and negative copy of each group
        labels = labels.repeat(copies)
        boxes = boxes.repeat(copies, 1)
        total = sum(counts)
        negative = (torch.arange(copies, device=device) % 2 == 1).repeat_interleave(total)
        if self.label_noise_ratio > 0 and labels.numel():
            flip = torch.rand(labels.shape, generator=generator, device=device) < self.label_noise_ratio * 0.5
            random_labels = torch.randint(
                0, self.num_classes, labels.shape, generator=generator, device=device
            )
            labels = torch.where(flip, random_labels, labels)
        if self.box_noise_scale > 0 and boxes.numel():
            boxes = noise_boxes(boxes, negative, self.box_noise_scale, generator)
        # The official queries carry the logit of the box (clamped at 1e-3): the same values here.
        boxes = inverse_sigmoid(boxes, eps=DINO_LOGIT_EPS).sigmoid()

        width = self.label_embed.embedding_dim
        queries = torch.zeros(batch, layout.pad_size, width, device=device, dtype=dtype)
        reference = torch.full((batch, layout.pad_size, 4), 0.5, device=device, dtype=dtype)
        if labels.numel():
            image = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(counts)]).repeat(
                copies
            )
            slot = torch.cat([torch.arange(n, device=device) for n in counts])
            slot = torch.cat([slot + layout.group_size * copy for copy in range(copies)])
            queries = queries.index_put((image, slot), self.label_embed(labels))
            reference = reference.index_put((image, slot), boxes)
        mask = denoising_attn_mask(layout, num_queries, device)
        return QuerySet(queries, reference, mask, {"dn_layout": layout})
