"""Versioned migration of stored configs: what earlier releases wrote, rewritten for the current schema.

Config version 1 (before the assembled detector) chose the query source with family flags:

| version 1 | version 2 |
|---|---|
| `model.two_stage: true` | `model.query_source: proposals` |
| `model.anchor_boxes: true` + `model.mixed_query_selection: true` | `model.query_source: mixed_selection` |
| `model.anchor_boxes: true` (alone) | `model.query_source: learned_anchors` |
| `false` values of those keys | dropped (the default source) |
| anchor-box models' logged `loss_xy` / `loss_hw` | `loss.terms` gains `box_parts` |
| `model.backbone.pyramid_channels: N` (ViT) | `model.neck.options.channels: N` |
| `model.backbone.type: vit` without `model.neck` | `model.neck.type: simple_pyramid` |

(The simple feature pyramid was part of the ViT backbone; it is the `simple_pyramid` neck now. A
null `pyramid_channels`, as every stored config of another backbone holds, is dropped.)

`migrate_config_data` is applied to every YAML file, override list and checkpoint config before
it meets the schema, so files written by the earlier release keep loading. Standard library and
OmegaConf only.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_VERSION = 2
LEGACY_MODEL_KEYS = ("two_stage", "anchor_boxes", "mixed_query_selection")
DEFAULT_TERMS = ["labels", "cardinality", "boxes"]


class LegacyConfigError(ValueError):
    """A version-1 config whose family flags cannot be mapped to one query source."""


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def legacy_query_source(model: dict) -> str | None:
    """The version-2 `model.query_source` of a version-1 model section (None: the default).

    Raises:
        LegacyConfigError: flags that name no source (two-stage with anchor boxes).
    """
    two_stage = _truthy(model.get("two_stage", False))
    anchors = _truthy(model.get("anchor_boxes", False))
    mixed = _truthy(model.get("mixed_query_selection", False))
    if two_stage and anchors:
        raise LegacyConfigError(
            "'model.two_stage' and 'model.anchor_boxes' together name no query source; "
            "set 'model.query_source' instead"
        )
    if two_stage:
        return "proposals"
    if anchors:
        return "mixed_selection" if mixed else "learned_anchors"
    return None


def _legacy_vit(model: DictConfig) -> bool:
    """A version-1 ViT model: the pyramid was part of the backbone (its channels a backbone key)."""
    backbone = model.get("backbone")
    if not isinstance(backbone, DictConfig):
        return False
    return "pyramid_channels" in backbone or (backbone.get("type") == "vit" and "neck" not in model)


def migrate_config_data(data: DictConfig) -> DictConfig:
    """`data` (a full or partial config tree) with version-1 keys rewritten; unchanged when it has none.

    Raises:
        LegacyConfigError: flags that cannot be mapped (the message names them).
    """
    model = data.get("model") if isinstance(data, DictConfig) else None
    if not isinstance(model, DictConfig):
        return data
    legacy_vit = _legacy_vit(model)
    if not legacy_vit and not any(key in model for key in LEGACY_MODEL_KEYS):
        return data
    plain = OmegaConf.to_container(data, resolve=False)
    model_dict = plain["model"]
    if legacy_vit:
        backbone = model_dict["backbone"]
        channels = backbone.pop("pyramid_channels", None)
        kind = backbone.get("type")
        if channels is not None and kind not in (None, "vit"):
            raise LegacyConfigError(
                f"'model.backbone.pyramid_channels' applies to 'model.backbone.type: vit' only, not "
                f"'{kind}' (it is now 'model.neck.options.channels' of the simple_pyramid neck)"
            )
        if (kind == "vit" and "neck" not in model_dict) or channels is not None:
            neck = model_dict.setdefault("neck", {})
            neck.setdefault("type", "simple_pyramid")
            neck.setdefault("options", {}).setdefault("channels", 256 if channels is None else channels)
    source = legacy_query_source(model_dict)
    anchors = _truthy(model_dict.get("anchor_boxes", False))
    for key in LEGACY_MODEL_KEYS:
        model_dict.pop(key, None)
    if source is not None and model_dict.get("query_source") is None:
        model_dict["query_source"] = source
    if anchors:
        loss = plain.setdefault("loss", {})
        terms = list(loss.get("terms") or DEFAULT_TERMS)
        if "boxes" in terms and "box_parts" not in terms:
            terms.append("box_parts")
        loss["terms"] = terms
    return OmegaConf.create(plain)
