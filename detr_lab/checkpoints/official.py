"""Official checkpoints -> detr_lab models, through the registered families.

    model, cfg = load_official("detr-r50-e632da11.pth")               # official DETR
    model, cfg = load_official("r50_deformable_detr-checkpoint.pth")  # official Deformable DETR
    model, cfg = load_official("checkpoint0011_4scale.pth")           # official DINO
    model, cfg = load_official("rtdetrv2_r18vd_120e_coco_rerun_48.1.pth")  # official RT-DETRv2

Each family (`detr.py`, `deformable_detr.py`, `dino.py`, `rtdetr.py`, `dfine.py`) registers itself in
`family.OFFICIAL_FAMILIES` when imported; this module imports them all. A key left unmapped or a
parameter left unfilled is an error, so a partial load cannot pass silently. Class index = COCO
category id in official DETR-family checkpoints; RT-DETR's 80 classes are the COCO categories in id
order (`official_categories`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

# Importing a family module registers it; the modules are named one by one, never through the
# package (`from detr_lab.checkpoints import ...`), whose __init__ imports this module.
from detr_lab.checkpoints.deformable_detr import DEFORMABLE_FAMILY
from detr_lab.checkpoints.detr import DETR_FAMILY
from detr_lab.checkpoints.dfine import DFINE_FAMILY
from detr_lab.checkpoints.dino import DINO_FAMILY
from detr_lab.checkpoints.family import OFFICIAL_FAMILIES, OfficialFamily, map_keys, official_family
from detr_lab.checkpoints.rtdetr import RTDETR_FAMILY
from detr_lab.checkpoints.weights import build_loaded, read_source
from detr_lab.config import Config
from detr_lab.data.categories import COCO_CATEGORY_NAMES
from detr_lab.io import CheckpointError

# The families importing this module registers (`family.OFFICIAL_FAMILIES` holds them in the order
# their modules were first imported; their key layouts do not overlap, so the order does not matter).
FAMILIES: tuple[OfficialFamily, ...] = (
    DEFORMABLE_FAMILY,
    DETR_FAMILY,
    DINO_FAMILY,
    RTDETR_FAMILY,
    DFINE_FAMILY,
)


def _official_state(checkpoint: str | os.PathLike | Mapping) -> tuple[dict[str, Tensor], str]:
    data, source = read_source(checkpoint)
    data = _official_weights(data)
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(
            f"{source}: expected an official state dict (name -> tensor), or a dict with 'model'"
        )
    return dict(data), source


def _official_weights(data: Any) -> Any:
    """The state dict inside an official checkpoint: the EMA weights of a training checkpoint
    (`ema.module`, RT-DETR's released files), else `model`, else the dict itself."""
    if isinstance(data, Mapping):
        ema = data.get("ema")
        if isinstance(ema, Mapping) and isinstance(ema.get("module"), Mapping) and ema["module"]:
            return ema["module"]
        if isinstance(data.get("model"), Mapping):
            return data["model"]
    return data


def official_categories(
    checkpoint: str | os.PathLike | Mapping, num_classes: int
) -> tuple[list[int], list[str]]:
    """(category ids, class names) of the class indices of an official checkpoint: its family's
    (`OfficialFamily.categories`), else index = COCO category id (`official_class_names`)."""
    state, source = _official_state(checkpoint)
    family = official_family(state, source)
    if family.categories is not None:
        return family.categories(num_classes)
    return list(range(num_classes)), official_class_names(num_classes)


def convert_official(
    checkpoint: str | os.PathLike | Mapping, **overrides: Any
) -> tuple[Config, dict[str, Tensor]]:
    """Official checkpoint -> (the `Config` it describes, a detr_lab state dict). See `load_official`."""
    state, source = _official_state(checkpoint)
    family = official_family(state, source)
    unknown = sorted(set(overrides) - set(family.override_keys))
    if unknown:
        raise CheckpointError(
            f"unknown override(s) {', '.join(unknown)} for official {family.name} checkpoints; "
            f"valid: {', '.join(family.override_keys)}"
        )
    cfg = family.infer_config(state, overrides)
    state = family.prepare(state, cfg, source)
    mapped, unmapped = map_keys(state, family.rules, family.fields)
    if unmapped:
        raise CheckpointError(
            f"{source}: {len(unmapped)} official {family.name} key(s) have no place in the detr_lab model "
            f"(e.g. {', '.join(unmapped[:5])})"
        )
    return cfg, mapped


def load_official(checkpoint: str | os.PathLike | Mapping, **overrides: Any) -> tuple[nn.Module, Config]:
    """Load an official DETR, Deformable DETR, DINO or RT-DETR (v1, v2) checkpoint into a detr_lab model.

    Args:
        checkpoint: a file path, a dict with `model` (or RT-DETR's `ema.module`), or a bare official
            state dict.
        overrides: what weights cannot tell: `dilation=True` (DC5), `num_heads=N` (default 8; for
            Deformable DETR the sampling points per level follow from it); `num_queries=N` is checked
            against the weights, or sets the proposal count of a two-stage Deformable DETR (which has
            no query embedding; default 300); DINO: `share_heads=False` keeps differing per-layer
            head copies apart (default: shared, the official recipe); RT-DETR: `num_heads`,
            `num_queries` (default 300), `sampling="discrete"` (the `_dsp` models).
    Returns:
        (eval-mode model, `Config` describing it). The architecture (backbone depth, layer counts,
        widths, query and class counts; for Deformable DETR also the feature levels, sampling
        points, box refinement and two-stage) is inferred from the weights.
    Raises:
        CheckpointError: unreadable input, unknown overrides, official keys without a place in the
            model, or model parameters the checkpoint does not fill.
    """
    cfg, state = convert_official(checkpoint, **overrides)
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "official checkpoint"
    return build_loaded(cfg, state, source), cfg


def official_class_names(num_classes: int) -> list[str]:
    """Class names of an official checkpoint, whose class index is the COCO category id.

    COCO-sized heads (>= 91 classes) get the COCO name at each id and "N/A" at unused ids; smaller
    heads (fine-tuned on other data) get placeholder names `class_<i>`.
    """
    if num_classes >= 91:
        return [COCO_CATEGORY_NAMES.get(i, "N/A") for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


def looks_official(data: Mapping) -> bool:
    """True when `data` (a state dict, or a dict with `model` or `ema.module`) has the keys of an
    official family."""
    state = _official_weights(data)
    return isinstance(state, Mapping) and any(family.matches(state) for family in OFFICIAL_FAMILIES)
