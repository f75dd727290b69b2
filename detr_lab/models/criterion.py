"""The set loss: one criterion that loops over the prediction groups a detector declares.

A detector's outputs hold prediction groups (`detr_lab.models.groups`): the final decoder layer,
every auxiliary layer, the encoder proposals, the denoising queries. Each group says how its
predictions are paired with the targets (Hungarian matching, or indices given by the denoising
layout), whether it is class-agnostic, and the suffix of its loss names. For every group the
criterion computes the configured loss terms (`detr_lab.models.loss_terms.LOSS_TERMS`) on the
matched pairs; `weight_dict` holds the weight of every weighted value of every group, and
`total_loss` is their weighted sum. Follows `SetCriterion` of the official DETR, Deformable DETR and
DINO code (models/dino/dino.py for the proposal and denoising groups).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from detr_lab.errors import InputError
from detr_lab.models.classification import Classification, classification_strategy
from detr_lab.models.groups import PredictionGroup, group_predictions, main_groups
from detr_lab.models.loss_terms import DEFAULT_TERMS, LOSS_TERMS, Indices, LossTerm, TermInputs
from detr_lab.models.matcher import HungarianMatcher
from detr_lab.models.queries.denoising import DenoisingLayout

# Default weights of the values whose table entry names a config key (`LossTerm.weights`).
DEFAULT_WEIGHTS = {"class_weight": 1.0, "bbox_weight": 5.0, "giou_weight": 2.0}


def _all_processes(distributed: bool) -> bool:
    return distributed and dist.is_available() and dist.is_initialized()


def average_count(count: int, device: torch.device, distributed: bool = True) -> float | Tensor:
    """`count` averaged over the processes, at least 1: a float on one process or with `distributed`
    False (counted on the host, no synchronization, no collective call), a 0-d float32 tensor on
    `device` when distributed (all-reduced there and left on the device, so that no process waits to
    read it)."""
    if not _all_processes(distributed):
        return max(float(count), 1.0)
    total = torch.tensor([float(count)], device=device)
    dist.all_reduce(total)
    return torch.clamp(total / dist.get_world_size(), min=1)[0]


def average_num_boxes(targets: list[dict], device: torch.device, distributed: bool = True) -> float | Tensor:
    """Target boxes per process (averaged across processes when distributed and `distributed`), at
    least 1; with `distributed` False, the boxes of `targets` alone. See `average_count` for the type."""
    return average_count(sum(len(t["labels"]) for t in targets), device, distributed)


def select_terms(terms: Sequence[str]) -> dict[str, LossTerm]:
    """The table entries of `terms`, in order.

    Raises:
        ValueError: no terms, a repeated name, or one not in `LOSS_TERMS` (the message names the
            `loss.terms` entry and the closest known name).
    """
    if not terms:
        raise InputError(f"'loss.terms' must name at least one of: {', '.join(LOSS_TERMS)}")
    for i, name in enumerate(terms):
        if name not in LOSS_TERMS:
            close = difflib.get_close_matches(str(name), list(LOSS_TERMS), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise InputError(f"'loss.terms[{i}]' is {name!r}; expected one of: {', '.join(LOSS_TERMS)}{hint}")
        if name in terms[:i]:
            raise InputError(f"'loss.terms[{i}]' repeats {name!r}")
    return {name: LOSS_TERMS[name] for name in terms}


class SetCriterion(nn.Module):
    """Set-prediction loss over the declared prediction groups.

    Args:
        num_classes: real classes; with softmax, "no object" is logit `num_classes`.
        matcher: the `HungarianMatcher`.
        classification: a strategy of `detr_lab.models.classification` (it holds `eos_coef` or the
            focal `alpha` / `gamma`) or its name (default options).
        terms: names of `LOSS_TERMS` to compute.
        weights: weights overriding the table's defaults, by weighted value (`loss_ce`, a new term's
            `loss_area`) or by the `LossConfig` key a table entry names (`class_weight`, `bbox_weight`,
            `giou_weight`; defaults 1, 5, 2).
        groups: the prediction groups the model declares (`detr_lab.models.groups`); None: the main,
            auxiliary and (with `two_stage`) proposal groups.
        num_aux_layers: auxiliary decoder layers (groups `_0`, `_1`, ...) when `groups` is not given.
        two_stage: also a class-agnostic proposal group (`_enc`), when `groups` is not given.
        term_options: term name -> its own options (e.g. `{"vfl": {"alpha": 0.75, "gamma": 2.0}}`).
        union_matching: D-FINE's GO-LSD: the terms whose table entry has `union` (boxes, FGL, DDF)
            use, on every Hungarian group, the union of the matchings of all Hungarian groups (each
            query keeps the target it was matched to most often), normalized by the union's size;
            the other terms keep each group's own matching (official `DFINECriterion._get_go_indices`).

    Values (unweighted): the terms' values per group with the group's suffix: `loss_ce`, `loss_bbox`
    (L1 of normalized cxcywh), `loss_giou` (1 - GIoU), both box terms summed over matched pairs and
    divided by the average number of target boxes (denoising: times the number of groups);
    `class_error` (final layer only), `cardinality_error`, `loss_xy`, `loss_hw` are logged, never weighted.

    Raises:
        ValueError: an unknown classification or term name (the message names it), no terms, or a
            weight for a value no selected term gives.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        *,
        classification: str | Classification = "softmax",
        terms: Sequence[str] = DEFAULT_TERMS,
        weights: Mapping[str, float] | None = None,
        groups: Sequence[PredictionGroup] | None = None,
        num_aux_layers: int = 5,
        two_stage: bool = False,
        term_options: Mapping[str, Mapping[str, float]] | None = None,
        union_matching: bool = False,
    ) -> None:
        super().__init__()
        self.union_matching = union_matching
        if isinstance(classification, str):
            classification = classification_strategy(classification)
        self.loss_terms = select_terms(list(terms))
        for name, term in self.loss_terms.items():
            if term.sigmoid_only and classification.name != "sigmoid":
                raise InputError(f"loss term {name!r} needs 'model.classification: sigmoid'")
        self.term_options = {name: dict(options) for name, options in (term_options or {}).items()}
        # Options of a known term that is not selected stay unused, so that a config switches terms (vfl
        # -> mal) by `loss.terms` alone; a name no term has is a mistake.
        unknown_options = sorted(set(self.term_options) - set(LOSS_TERMS))
        if unknown_options:
            raise InputError(
                f"'loss.term_options' names {unknown_options}, no loss term; known: {', '.join(LOSS_TERMS)}"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.classification = classification
        if groups is None:
            groups = main_groups(num_aux_layers, proposals="agnostic" if two_stage else None)
        self.groups = tuple(groups)
        given = dict(weights or {})
        weighted = {value for term in self.loss_terms.values() for value in term.weights}
        unknown = sorted(set(given) - weighted - set(DEFAULT_WEIGHTS))
        if unknown:
            raise InputError(
                f"'loss.weights' names {unknown}, no weighted value of the selected terms "
                f"{list(self.loss_terms)} (their values: {sorted(weighted)})"
            )
        negative = sorted(name for name, weight in given.items() if not weight >= 0)
        if negative:
            raise InputError(f"loss weights must be >= 0 (and finite); {negative} are not")
        base: dict[str, float] = {}
        for term in self.loss_terms.values():
            for value, default in term.weights.items():
                if isinstance(default, str):  # a LossConfig key: its value, else its schema default
                    default = given.get(default, DEFAULT_WEIGHTS[default])
                base[value] = float(given.get(value, default))
        self.weight_dict: dict[str, float] = {}
        for group in self.groups:
            for term in self.loss_terms.values():
                if group.kind in term.groups:
                    self.weight_dict.update({value + group.suffix: base[value] for value in term.weights})

    # ----------------------------------------------------------------------------------- forward
    def layer_losses(
        self,
        outputs: dict,
        targets: list[dict],
        num_boxes: float | Tensor,
        *,
        log: bool,
        indices: Indices | None = None,
        kind: str = "main",
        union: tuple[Indices, float, dict] | None = None,
    ) -> dict[str, Tensor]:
        """Every configured term for one set of predictions (unsuffixed names).

        Args:
            outputs: `pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]` normalized cxcywh.
            targets: B dicts with `labels` int64 `[N_i]`, `boxes` `[N_i, 4]` normalized cxcywh.
            num_boxes: the normalizer of the box terms (see `average_num_boxes`).
            log: also return the final layer's logging-only values (`class_error`).
            indices: B pairs (query indices int64 `[K_i]`, target indices int64 `[K_i]`) that
                replace the Hungarian matching, e.g. for denoising queries built from known targets;
                None runs the matcher.
            kind: the group kind (terms apply to the kinds their table entry lists).
            union: (indices, normalizer, context) of the union matching, used by the terms whose
                entry has `union` (see `union_matching`); the context reaches every term.
        """
        if indices is None:
            indices = self.matcher(outputs, targets)
        elif len(indices) != len(targets):
            raise ValueError(
                f"indices must hold one (query, target) pair per image: got {len(indices)} "
                f"for {len(targets)} targets"
            )
        context = union[2] if union is not None else {}
        losses: dict[str, Tensor] = {}
        for name, term in self.loss_terms.items():
            if kind in term.groups:
                own = not (term.union and union is not None)
                inputs = TermInputs(
                    outputs,
                    targets,
                    indices if own else union[0],
                    num_boxes if own else union[1],
                    self.classification,
                    self.num_classes,
                    log,
                    options=self.term_options.get(name, {}),
                    context=context,
                )
                losses.update(term.fn(inputs))
        return losses

    def group_losses(
        self,
        group: PredictionGroup,
        outputs: dict,
        targets: list[dict],
        num_boxes: float | Tensor,
        union: tuple[Indices, float, dict, dict] | None = None,
    ) -> dict[str, Tensor]:
        """The terms of one declared group, suffixed; zeros when a denoising group has no predictions
        (evaluation, or no image with objects), as the official DINO criterion. `union`: from
        `union_matching` (the union's indices, normalizer and context, and every Hungarian group's
        own matching by suffix)."""
        predictions = group_predictions(outputs, group)
        if group.class_agnostic:
            targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
        indices = None
        if union is not None and group.matching == "hungarian":
            indices = union[3].get(group.suffix)
        if group.matching == "denoising":
            layout = outputs.get("dn_meta")
            if predictions is None or layout is None:
                zero = outputs["pred_logits"].new_zeros(())
                names = [
                    v for term in self.loss_terms.values() if group.kind in term.groups for v in term.values
                ]
                return {name + group.suffix: zero for name in names}
            if not isinstance(layout, DenoisingLayout):
                raise TypeError(f"dn_meta must be a DenoisingLayout, got {type(layout).__name__}")
            device = predictions["pred_logits"].device
            indices = [layout.positive_indices(len(t["labels"]), device) for t in targets]
            num_boxes = num_boxes * layout.groups
        elif predictions is None:
            return {}
        shared = None
        if union is not None:  # denoising groups keep their own pairs, and read the context
            shared = union[:3] if group.matching == "hungarian" else (indices, num_boxes, union[2])
        terms = self.layer_losses(
            predictions, targets, num_boxes, log=group.log, indices=indices, kind=group.kind, union=shared
        )
        return {name + group.suffix: value for name, value in terms.items()}

    def union_of_matchings(
        self, outputs: Mapping, targets: list[dict], distributed: bool = True
    ) -> tuple[Indices, float | Tensor, dict, dict]:
        """D-FINE's union matching over the Hungarian groups (see `union_matching`); `distributed` as
        in `forward`.

        Returns:
            (union indices per image, their count averaged over processes (>= 1), the context for the
            terms (`union_pairs`, `main_queries`), each Hungarian group's own matching by suffix).
        """
        own: dict[str, Indices] = {}
        for group in self.groups:
            predictions = group_predictions(outputs, group)
            if group.matching != "hungarian" or predictions is None:
                continue
            group_targets = targets
            if group.class_agnostic:
                group_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            own[group.suffix] = self.matcher(predictions, group_targets)
        union = []
        for image in range(len(targets)):
            pairs = torch.cat(
                [torch.stack((indices[image][0], indices[image][1]), dim=1) for indices in own.values()]
            )  # (N, 2): (query, target), group after group
            unique, counts = torch.unique(pairs, return_counts=True, dim=0)
            ranked = unique[torch.argsort(counts, descending=True)]
            chosen: dict[int, int] = {}
            for query, target in ranked.tolist():  # the most frequent target of each query
                chosen.setdefault(query, target)
            device = pairs.device
            union.append(
                (
                    torch.tensor(list(chosen), dtype=torch.int64, device=device),
                    torch.tensor(list(chosen.values()), dtype=torch.int64, device=device),
                )
            )
        pairs = sum(len(queries) for queries, _ in union)
        normalizer = average_count(pairs, outputs["pred_logits"].device, distributed)
        context = {"union_pairs": pairs, "main_queries": outputs["pred_logits"].shape[1]}
        return union, normalizer, context, own

    def forward(
        self, outputs: Mapping, targets: list[dict], *, distributed: bool = True
    ) -> dict[str, Tensor]:
        """Unweighted loss terms of every declared prediction group.

        Args:
            outputs: the model's outputs: `pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]`
                (normalized cxcywh), and the groups' entries (`aux_outputs`, `enc_outputs`,
                `dn_outputs` with `dn_meta`).
            targets: B dicts with `labels` int64 `[N_i]` and `boxes` `[N_i, 4]` normalized cxcywh
                (N_i may be 0).
            distributed: under torch.distributed, normalize by the box count averaged over processes
                (one all-reduce per call: every process must call); False normalizes by this call's
                targets alone, without any collective call (e.g. one image at a time, see
                `per_image_losses`).
        Returns:
            e.g. `loss_ce`, `loss_bbox`, `loss_giou`, `class_error`, `cardinality_error` for the final
            layer, the same without `class_error` suffixed `_i` per auxiliary layer, `_enc` for
            proposals, `_dn` / `_dn_i` for denoising.
        """
        num_boxes = average_num_boxes(targets, outputs["pred_logits"].device, distributed)
        union = self.union_of_matchings(outputs, targets, distributed) if self.union_matching else None
        losses: dict[str, Tensor] = {}
        for group in self.groups:
            losses.update(self.group_losses(group, outputs, targets, num_boxes, union))
        return losses

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum over the terms of `weight_dict` present in `losses` (a scalar tensor)."""
        terms = [losses[name] * weight for name, weight in self.weight_dict.items() if name in losses]
        if not terms:
            raise ValueError(
                f"none of the weighted loss terms {sorted(self.weight_dict)} is in the losses given"
            )
        return torch.stack(terms).sum()


def image_outputs(outputs: Mapping, index: int, batch_size: int) -> dict:
    """Image `index`'s share of a batch's model outputs: every tensor whose first dimension is
    `batch_size` sliced to `[index : index + 1]` (so `[1, ...]`), through nested dicts and lists;
    anything else kept as is.

    Raises:
        ValueError: outputs of denoising queries (`dn_meta`, training only): their layout spans the batch.
    """
    if "dn_meta" in outputs:
        raise ValueError("image_outputs: denoising outputs (dn_meta) cannot be split by image")

    def take(node):
        if isinstance(node, Tensor):
            return node[index : index + 1] if node.dim() > 0 and node.shape[0] == batch_size else node
        if isinstance(node, Mapping):
            return {key: take(value) for key, value in node.items()}
        if isinstance(node, list | tuple):
            return type(node)(take(value) for value in node)
        return node

    return take(outputs)


def per_image_losses(criterion: SetCriterion, outputs: Mapping, targets: list[dict]) -> dict[str, Tensor]:
    """The criterion's terms computed for each image alone, as a batch of one normalized by its own
    boxes (no collective call), then averaged over the images.

    With each image's outputs independent of its batch (evaluation mode, no padding), the values do
    not depend on how the images are batched: the mean over a set of images is the same for any
    batch size. (`SetCriterion.forward` on the whole batch normalizes by the batch's box count and
    averages the classification term over the batch's queries, which mixes the images.)
    `class_error` (% of matched queries whose class is wrong) is 100 for an image with no object, as
    for a batch with none.

    Args:
        outputs: the model's outputs for B images in evaluation mode (`pred_logits` `[B, Q, C]`,
            `pred_boxes` `[B, Q, 4]` normalized cxcywh, and the groups' entries); no denoising.
        targets: B dicts with `labels` int64 `[N_i]`, `boxes` `[N_i, 4]` normalized cxcywh.
    Returns:
        name -> 0-d tensor, the mean over the images of each term (the names `forward` gives).
    Raises:
        ValueError: no targets, or denoising outputs (see `image_outputs`).
    """
    if not targets:
        raise ValueError("per_image_losses: no targets (an empty batch)")
    batch_size = len(targets)
    values: dict[str, list[Tensor]] = {}
    for index, target in enumerate(targets):
        losses = criterion(image_outputs(outputs, index, batch_size), [target], distributed=False)
        for name, value in losses.items():
            values.setdefault(name, []).append(value)
    return {name: torch.stack(terms).mean() for name, terms in values.items()}
