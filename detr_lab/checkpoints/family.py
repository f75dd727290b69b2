"""What every official-checkpoint family shares: the family record, its registry, key mapping.

A family (DETR, Deformable DETR, ...) is one module in this package that builds an `OfficialFamily`
and calls `register_family` on it; `detr_lab.checkpoints.official` imports the family modules and
converts a checkpoint with the first registered family whose `matches` accepts its keys.

Key mapping: a rule maps an official key matching `pattern` to one or more detr_lab key templates
(several: the tensor is split evenly along dim 0, e.g. a packed q/k/v projection); an empty tuple
drops the key on purpose. A key no rule maps, and a model parameter no key fills, are errors.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from detr_lab.config import Config
from detr_lab.io import CheckpointError

KeyRule = tuple[str, tuple[str, ...]]


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but something in it deserves attention (the message says what)."""


@dataclass
class OfficialFamily:
    """How one official detector family's checkpoints become detr_lab models.

    `matches(state)` recognises the family's keys; `infer_config(state, overrides)` returns the
    `Config` the weights describe; `prepare(state, cfg, source)` resolves keys that name the same
    tensor of the official model (shared modules) before `rules`/`fields` map the keys to detr_lab's
    (see `map_keys`). `override_keys` are the keyword overrides `load_official` accepts for it.
    `categories(num_classes)` gives the (category ids, class names) of its class indices; None: the
    index is the COCO category id (DETR, Deformable DETR, DINO; `official.official_class_names`).
    """

    name: str
    override_keys: tuple[str, ...]
    matches: Callable[[Mapping[str, Tensor]], bool]
    infer_config: Callable[[Mapping[str, Tensor], dict[str, Any]], Config]
    rules: Sequence[KeyRule]
    fields: Callable[[dict[str, str]], dict[str, str] | None]
    prepare: Callable[[dict[str, Tensor], Config, str], dict[str, Tensor]] = lambda state, cfg, source: state
    categories: Callable[[int], tuple[list[int], list[str]]] | None = None


OFFICIAL_FAMILIES: list[OfficialFamily] = []


def register_family(family: OfficialFamily) -> OfficialFamily:
    """Add `family` to `OFFICIAL_FAMILIES` (checked in registration order) and return it.

    Raises:
        ValueError: a family of the same name is already registered.
    """
    if any(known.name == family.name for known in OFFICIAL_FAMILIES):
        raise ValueError(f"an official checkpoint family named {family.name!r} is already registered")
    OFFICIAL_FAMILIES.append(family)
    return family


def official_family(state: Mapping[str, Tensor], source: str = "checkpoint") -> OfficialFamily:
    """The registered official family whose key layout `state` has.

    Raises:
        CheckpointError: no registered family recognises the keys.
    """
    for family in OFFICIAL_FAMILIES:
        if family.matches(state):
            return family
    known = ", ".join(f.name for f in OFFICIAL_FAMILIES)
    raise CheckpointError(
        f"{source}: not an official checkpoint of a known family ({known}); first keys: {list(state)[:3]}"
    )


def map_keys(
    state: Mapping[str, Tensor],
    rules: Sequence[KeyRule],
    fields: Callable[[dict[str, str]], dict[str, str] | None],
) -> tuple[dict[str, Tensor], list[str]]:
    """Apply key rules: -> (mapped state dict, official keys no rule mapped)."""
    compiled = [(re.compile(pattern), targets) for pattern, targets in rules]
    mapped: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state.items():
        for pattern, targets in compiled:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            values = fields(match.groupdict())
            if values is None:
                continue
            if targets:
                parts = tensor.chunk(len(targets)) if len(targets) > 1 else (tensor,)
                for target, part in zip(targets, parts, strict=True):
                    mapped[target.format(**values)] = part
            break
        else:
            unmapped.append(key)
    return mapped, unmapped


def count_indices(state: Mapping[str, Tensor], prefix: str) -> int:
    """Number of consecutive integer children `prefix{i}.` (0, 1, ...) among the keys."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def require_key(state: Mapping[str, Tensor], key: str, family: str, *, ndim: int | None = None) -> Tensor:
    """`state[key]`, which must exist (and have `ndim` dimensions when given)."""
    if key not in state:
        raise CheckpointError(f"official {family} checkpoint: missing key '{key}'")
    if ndim is not None and state[key].dim() != ndim:
        raise CheckpointError(
            f"official {family} checkpoint: '{key}' has shape {tuple(state[key].shape)}; "
            f"expected {ndim} dimensions"
        )
    return state[key]


# The official backbone keys of every family (torchvision ResNet under `backbone.0.body.`, DETR's
# learned position tables under `backbone.1.`): rules of `map_keys`.
BACKBONE_KEY_RULES: list[tuple[str, tuple[str, ...]]] = [
    (r"backbone\.0\.body\.(?P<rest>.+)\.num_batches_tracked", ()),
    (r"backbone\.0\.body\.(?P<rest>.+)", ("backbone.body.{rest}",)),
    (r"backbone\.1\.(?P<table>row_embed|col_embed)\.weight", ("position_encoding.{table}.weight",)),
]


def check_query_override(overrides: Mapping[str, Any], num_queries: int, key: str) -> None:
    """An override of `num_queries` must agree with the query table `key` of the checkpoint.

    Raises:
        CheckpointError: it does not (the message names both counts and the key).
    """
    if "num_queries" in overrides and overrides["num_queries"] != num_queries:
        raise CheckpointError(
            f"num_queries={overrides['num_queries']} given, but the checkpoint's {key} holds "
            f"{num_queries} queries"
        )


def backbone_config(state: Mapping[str, Tensor], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`model.backbone` of an official checkpoint: its ResNet depth, DC5 only when asked (the weights do
    not tell), no ImageNet weights to fetch (the checkpoint holds the backbone)."""
    return {
        "name": infer_resnet(state, "backbone.0.body."),
        "dilation": bool(overrides.get("dilation", False)),
        "pretrained": False,
        "weights_path": None,
    }


def deformable_stacks(encoder: tuple[int, int], decoder: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """`model.encoder` / `model.decoder` of a deformable-attention checkpoint from (layers, points) each."""
    return {
        "encoder": {"num_layers": encoder[0], "attention": "deformable", "num_points": encoder[1]},
        "decoder": {"num_layers": decoder[0], "cross_attention": "deformable", "num_points": decoder[1]},
    }


def focal_recipe(class_weight: float) -> dict[str, Any]:
    """`loss` of the official focal-loss recipes: matching costs class 2, L1 5, GIoU 2; weights
    `class_weight`, L1 5, GIoU 2; focal alpha 0.25, gamma 2 (Deformable DETR: class weight 2; DINO: 1)."""
    return {
        "cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0,
        "class_weight": class_weight, "bbox_weight": 5.0, "giou_weight": 2.0,
        "focal_alpha": 0.25, "focal_gamma": 2.0,
    }  # fmt: skip


RESNET_DEPTHS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
}


def infer_resnet(state: Mapping[str, Tensor], prefix: str) -> str:
    """ResNet name from the block counts of `{prefix}layer1..4` and the block type (bottleneck = conv3)."""
    counts = tuple(count_indices(state, f"{prefix}layer{i}.") for i in range(1, 5))
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state
    name = RESNET_DEPTHS.get((bottleneck, counts))
    if name is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise CheckpointError(
            f"unsupported backbone in checkpoint: {kind} blocks {counts} per stage under '{prefix}' "
            "(supported: ResNet-18/34/50/101)"
        )
    return name


DECODER_HEAD_PREFIXES = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")


def resolve_head_aliases(
    state: Mapping[str, Tensor], source: str, *, shared_layers: bool
) -> dict[str, Tensor]:
    """Reduce the keys that name one tensor of an official Deformable-DETR-style model to one key each.

    The official Deformable DETR and DINO register their heads twice (the decoder holds the detector's
    `class_embed`/`bbox_embed` as `transformer.decoder.*` too) and, when the heads are shared across
    layers (`shared_layers`: Deformable DETR without box refinement, DINO's shared heads), one module
    is listed once per layer. Loading a state dict into the official model leaves, for each tensor,
    the value of the key loaded last: the detector's own head over the decoder's alias, the highest
    layer index among shared copies. The same values are kept here; copies that differ (never in a
    trained checkpoint, whose copies are one tensor) are reported in a `CheckpointWarning`.

    Raises:
        CheckpointError: a decoder alias without its detector head.
    """
    state = dict(state)
    differing: list[str] = []
    for key in [k for k in state if k.startswith(DECODER_HEAD_PREFIXES)]:
        head_key = key[len("transformer.decoder.") :]
        if head_key not in state:
            raise CheckpointError(
                f"{source}: '{key}' has no counterpart '{head_key}' among the detector heads"
            )
        if not torch.equal(state[key], state[head_key]):
            differing.append(key)
        del state[key]
    if shared_layers:
        for head in ("class_embed", "bbox_embed"):
            copies: dict[str, dict[int, str]] = {}
            for key in state:
                if m := re.fullmatch(rf"{head}\.(\d+)\.(.+)", key):
                    copies.setdefault(m.group(2), {})[int(m.group(1))] = key
            for rest, by_layer in copies.items():
                kept = state[by_layer[max(by_layer)]]
                for key in by_layer.values():
                    if not torch.equal(state[key], kept):
                        differing.append(key)
                    del state[key]
                state[f"{head}.{rest}"] = kept
    if differing:
        warnings.warn(
            f"{source}: {len(differing)} official key(s) alias a shared head but hold other values "
            f"(e.g. {', '.join(differing[:3])}); kept the values the official model loads last "
            "(the detector's heads; the last layer's copy of a shared head)",
            CheckpointWarning,
            stacklevel=3,
        )
    return state
