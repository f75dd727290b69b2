"""Fine-grained distribution refinement (FDR) of D-FINE (Peng et al. 2024, "D-FINE: Redefine Regression
Task in DETRs as Fine-grained Distribution Refinement"; official code Peterande/D-FINE, `src/zoo/dfine`).

Instead of a box delta, every decoder layer predicts, for each of the four edges of a box, a
distribution over `reg_max + 1` bins. A bin n stands for the edge offset W(n) of the non-uniform
weighting function (`weighting_function`); the expected offset (`integral`) moves the edge of the
*initial* box (the first layer's box) by `offset * size / reg_scale` beyond half the box size
(`distance_to_box`). Each layer adds its logits to the previous layer's (the residual keeps the
gradient), so the distributions are refined layer by layer. The location-quality estimator
(`LocationQuality`, LQE) adds a score from the top-k probabilities of each edge's distribution to
the class logits.

Boxes are normalized cxcywh inside the model; distances are in units of `size / reg_scale` of the
initial box (`box_to_distance` turns target boxes into the bin targets of the FGL loss).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detr_lab.boxes import xyxy_to_cxcywh
from detr_lab.models.detector import MLP
from detr_lab.models.transformer import inverse_sigmoid


def weighting_function(reg_max: int, up: Tensor | float, reg_scale: Tensor | float) -> Tensor:
    """The bin values W(0..reg_max) (D-FINE Eq. 3), `[reg_max + 1]`.

    With a = |up| * |reg_scale| and step s = (a + 1) ** (2 / (reg_max - 2)): W(0) = -2a,
    W(reg_max) = 2a, W(reg_max / 2) = 0, and in between W grows as +-(s ** k - 1), k = 1 .. reg_max/2 - 1,
    away from the centre: fine bins near 0, coarse ones at the ends.

    Args:
        reg_max: bins - 1 (even, >= 4). up, reg_scale: scalars or one-element tensors (D-FINE's
            `up` 0.5 and `reg_scale` 4); the result takes their dtype and device (float32 for numbers).
    Raises:
        ValueError: an odd `reg_max` or one below 4.
    """
    if reg_max < 4 or reg_max % 2:
        raise ValueError(f"reg_max must be an even number >= 4, got {reg_max}")
    up = torch.as_tensor(up, dtype=torch.float32 if not torch.is_tensor(up) else None).reshape(-1)[:1]
    reg_scale = torch.as_tensor(reg_scale).reshape(-1)[:1].to(up)
    bound = up.abs() * reg_scale.abs()  # (1,)
    step = (bound + 1) ** (2 / (reg_max - 2))
    exponents = torch.arange(1, reg_max // 2, device=up.device, dtype=up.dtype)  # 1 .. reg_max/2 - 1
    right = step**exponents - 1  # (reg_max/2 - 1,)
    return torch.cat((-2 * bound, -right.flip(0), torch.zeros_like(bound), right, 2 * bound))


def integral(corner_logits: Tensor, project: Tensor) -> Tensor:
    """Expected edge offsets: softmax over each edge's bins, dotted with W.

    Args:
        corner_logits: `[..., 4 * (reg_max + 1)]`, edges in the order left, top, right, bottom.
        project: W, `[reg_max + 1]` (`weighting_function`).
    Returns:
        `[..., 4]` offsets in units of `size / reg_scale`.
    """
    bins = project.shape[0]
    probabilities = corner_logits.reshape(*corner_logits.shape[:-1], 4, bins).softmax(-1)
    return probabilities @ project.to(probabilities.dtype)


def distance_to_box(reference: Tensor, distances: Tensor, reg_scale: Tensor | float) -> Tensor:
    """Boxes whose edges lie `0.5 * reg_scale + d` units of `size / reg_scale` from the centre.

    Args:
        reference: `[..., 4]` normalized cxcywh (the initial boxes).
        distances: `[..., 4]` (left, top, right, bottom) offsets from `integral`.
        reg_scale: D-FINE's `reg_scale` (its absolute value is used).
    Returns:
        `[..., 4]` normalized cxcywh; all-zero distances give back `reference`.
    """
    reg_scale = reg_scale.abs() if torch.is_tensor(reg_scale) else abs(reg_scale)
    unit = reference[..., 2:] / reg_scale  # (..., 2): (w, h) / reg_scale
    half = 0.5 * reg_scale
    top_left = reference[..., :2] - (half + distances[..., :2]) * unit
    bottom_right = reference[..., :2] + (half + distances[..., 2:]) * unit
    return xyxy_to_cxcywh(torch.cat((top_left, bottom_right), dim=-1))


@torch.no_grad()
def box_to_distance(
    reference: Tensor,
    target_xyxy: Tensor,
    reg_max: int,
    reg_scale: Tensor | float,
    up: Tensor | float,
    *,
    eps: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """The FGL targets of matched boxes: each edge's offset as a position between two bins.

    Args:
        reference: `[K, 4]` normalized cxcywh initial boxes. target_xyxy: `[K, 4]` normalized xyxy.
        reg_max, reg_scale, up: as `weighting_function`.
        eps: the bin index is clamped to `[0, reg_max - eps]`.
    Returns:
        (bin `[4K]` float: index of the bin left of the offset, clamped; weight_right `[4K]`,
        weight_left `[4K]`: the linear interpolation weights of that bin's right and left
        neighbours, summing to 1). Offsets left of W(0) put all weight on bin 0, offsets at or right of
        W(reg_max) all on the last bin; edges in the order left, top, right, bottom per box.
    """
    reg_scale_abs = reg_scale.abs() if torch.is_tensor(reg_scale) else abs(reg_scale)
    unit = reference[:, 2:] / reg_scale_abs + 1e-16  # (K, 2)
    centre = reference[:, :2]
    offsets = torch.cat(
        ((centre - target_xyxy[:, :2]) / unit, (target_xyxy[:, 2:] - centre) / unit), dim=-1
    ) - 0.5 * reg_scale_abs  # (K, 4): left, top, right, bottom
    offsets = offsets.reshape(-1)
    values = weighting_function(reg_max, up, reg_scale).to(offsets)
    left = (values[None, :] <= offsets[:, None]).sum(1) - 1  # (4K,) index of the bin left of it
    inside = (left >= 0) & (left < reg_max)
    safe = left.clamp(0, reg_max - 1)
    left_gap = (offsets - values[safe]).abs()
    right_gap = (values[safe + 1] - offsets).abs()
    weight_right = torch.where(inside, left_gap / (left_gap + right_gap), (left >= reg_max).to(offsets))
    weight_left = 1.0 - weight_right
    bins = torch.where(left < 0, torch.zeros_like(offsets), left.to(offsets))
    bins = torch.where(left >= reg_max, torch.full_like(offsets, reg_max - 0.1), bins)
    return bins.clamp(0, reg_max - eps), weight_right, weight_left


class LocationQuality(nn.Module):
    """D-FINE's location-quality estimator (LQE): a score from the sharpness of the edge distributions.

    For each edge it takes the top-`k` probabilities and their mean (4 * (k + 1) statistics), and a
    2-layer MLP (`reg_conf`, hidden 64) maps them to one logit added to every class logit.
    Its last layer starts at zero, so it starts as the identity.

    Args:
        reg_max: bins - 1. k: probabilities kept per edge (official 4). hidden_dim: the MLP's width.
        activation: the MLP's ("relu"; DEIM "silu").
    """

    def __init__(self, reg_max: int, *, k: int = 4, hidden_dim: int = 64, activation: str = "relu") -> None:
        super().__init__()
        self.reg_max = reg_max
        self.k = k
        self.reg_conf = MLP(4 * (k + 1), hidden_dim, 1, 2, activation=activation)
        nn.init.zeros_(self.reg_conf.layers[-1].weight)
        nn.init.zeros_(self.reg_conf.layers[-1].bias)

    def forward(self, logits: Tensor, corner_logits: Tensor) -> Tensor:
        """Class logits `[B, Q, C]` and corner logits `[B, Q, 4 * (reg_max + 1)]` -> `[B, Q, C]`."""
        batch, queries, _ = corner_logits.shape
        probabilities = corner_logits.reshape(batch, queries, 4, self.reg_max + 1).softmax(-1)
        top = probabilities.topk(self.k, dim=-1).values  # (B, Q, 4, k)
        statistics = torch.cat((top, top.mean(-1, keepdim=True)), dim=-1)  # (B, Q, 4, k + 1)
        return logits + self.reg_conf(statistics.reshape(batch, queries, -1))


class DistributionRefinement(nn.Module):
    """The decoder's box refinement by distributions (FDR) and its heads, one set per decoder layer.

    Used by `Decoder.forward` (as `refiner`) and by the detector's predictions:

    - layer 0: `pre_box_head` refines the query boxes as a plain delta (`sigmoid(delta + logit(box))`),
      giving the *initial* boxes every later distance is measured from (detached);
    - layer i: `box_heads[i](queries_i + queries_{i-1}.detach())` adds corner logits to those of layer
      i - 1 (not detached); the integral of the sum against W gives layer i's box around the initial
      box; its detached copy is layer i + 1's reference box;
    - `quality_heads[i]` (LQE) adjusts layer i's class logits (None when off).

    Args:
        embed_dim: d. num_layers: decoder layers. reg_max: bins - 1 (official 32). reg_scale: the
            curvature of W (official 4). up: its range (official 0.5). quality: use the LQE.
        logit_eps: clamp of the logit in layer 0's delta refinement (official 1e-5).
        activation: of the box heads' MLPs; quality_activation: of the LQE's (DEIM: both "silu").

    `up` and `reg_scale` are stored as frozen one-element parameters (the official checkpoints hold
    them as `decoder.up` / `decoder.reg_scale`).
    """

    def __init__(
        self,
        embed_dim: int,
        num_layers: int,
        *,
        reg_max: int = 32,
        reg_scale: float = 4.0,
        up: float = 0.5,
        quality: bool = True,
        logit_eps: float = 1e-5,
        activation: str = "relu",
        quality_activation: str = "relu",
    ) -> None:
        super().__init__()
        weighting_function(reg_max, up, reg_scale)  # validates reg_max
        self.reg_max = reg_max
        self.logit_eps = logit_eps
        self.up = nn.Parameter(torch.tensor([float(up)]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([float(reg_scale)]), requires_grad=False)
        self.pre_box_head = MLP(embed_dim, embed_dim, 4, 3, activation=activation)
        self.box_heads = nn.ModuleList(
            MLP(embed_dim, embed_dim, 4 * (reg_max + 1), 3, activation=activation) for _ in range(num_layers)
        )
        self.quality_heads = (
            nn.ModuleList(LocationQuality(reg_max, activation=quality_activation) for _ in range(num_layers))
            if quality
            else None
        )
        for head in (self.pre_box_head, *self.box_heads):
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    def project(self) -> Tensor:
        """W `[reg_max + 1]` for the current `up` and `reg_scale`."""
        return weighting_function(self.reg_max, self.up, self.reg_scale)

    def begin(self) -> dict:
        """A fresh refinement state for one decoder pass."""
        return {"project": self.project(), "boxes": [], "corners": [], "initial": None}

    def step(self, index: int, queries: Tensor, reference: Tensor, state: dict) -> Tensor:
        """Refine after decoder layer `index`.

        Args:
            queries: the layer's output `[B, Q, d]`. reference: the normalized cxcywh boxes `[B, Q, 4]`
                the layer attended around (detached).
            state: from `begin`; gains this layer's boxes and corner logits.
        Returns:
            the next layer's reference boxes `[B, Q, 4]` (detached).
        """
        if index == 0:
            pre_boxes = (self.pre_box_head(queries) + inverse_sigmoid(reference, self.logit_eps)).sigmoid()
            state["pre_boxes"] = pre_boxes
            state["initial"] = pre_boxes.detach()
            corners = self.box_heads[0](queries)
        else:
            corners = self.box_heads[index](queries + state["previous"]) + state["corners"][-1]
        boxes = distance_to_box(state["initial"], integral(corners, state["project"]), self.reg_scale)
        state["previous"] = queries.detach()
        state["corners"].append(corners)
        state["boxes"].append(boxes)
        return boxes.detach()

    def adjust_logits(self, index: int, logits: Tensor, corners: Tensor) -> Tensor:
        """Layer `index`'s class logits `[B, Q, C]` after the LQE (unchanged without it)."""
        return logits if self.quality_heads is None else self.quality_heads[index](logits, corners)


def split_queries(values: Sequence[Tensor], pad: int) -> tuple[list[Tensor], list[Tensor]]:
    """Per-layer `[B, P + Q, ...]` tensors -> (the first `pad` queries, the rest) of each."""
    return [v[:, :pad] for v in values], [v[:, pad:] for v in values]
