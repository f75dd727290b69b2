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

`migrate_config_data` rewrites a stored config of version 1: a complete one, as every run saved it
(`config.yaml` beside its checkpoints, and in every checkpoint), which holds all three family flags.
A YAML file or override that sets one of those keys alone is not guessed at (a `false` flag could
mean the default source or "keep the inherited one"): it stops with `LegacyConfigError` naming the
key that replaces it. Standard library and OmegaConf only.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

LEGACY_MODEL_KEYS = ("two_stage", "anchor_boxes", "mixed_query_selection")


class LegacyConfigError(ValueError):
    """A version-1 config whose family flags cannot be mapped to one query source."""


def _truthy(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    raise LegacyConfigError(f"a version-1 family flag must be true or false, got {value!r}")


def legacy_query_source(model: dict) -> str | None:
    """The version-2 `model.query_source` of a version-1 model section (None: the default).

    Raises:
        LegacyConfigError: flags that name no source (two-stage with anchor boxes), or not booleans.
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


REPLACEMENTS = {
    "two_stage": "'model.query_source: proposals'",
    "anchor_boxes": "'model.query_source: learned_anchors' (or mixed_selection)",
    "mixed_query_selection": "'model.query_source: mixed_selection'",
}


def migrate_config_data(data: DictConfig) -> DictConfig:
    """`data` with a complete version-1 model section rewritten; unchanged when it has no version-1 key.

    Raises:
        LegacyConfigError: a version-1 key in a partial config (a YAML file or override: the message
            names the key that replaces it), or flags that cannot be mapped.
    """
    model = data.get("model") if isinstance(data, DictConfig) else None
    if not isinstance(model, DictConfig):
        return data
    present = [key for key in LEGACY_MODEL_KEYS if key in model]
    backbone = model.get("backbone")
    pyramid = isinstance(backbone, DictConfig) and "pyramid_channels" in backbone
    if not present and not pyramid:
        return data
    if len(present) != len(LEGACY_MODEL_KEYS) or (pyramid and "type" not in backbone):
        if present:
            key = present[0]
            raise LegacyConfigError(f"'model.{key}' was replaced by {REPLACEMENTS[key]}")
        raise LegacyConfigError(
            "'model.backbone.pyramid_channels' was replaced by 'model.neck: {type: simple_pyramid, "
            "options: {channels: N}}'"
        )
    plain = OmegaConf.to_container(data, resolve=False)
    model_dict = plain["model"]
    source = legacy_query_source(model_dict)
    anchors = _truthy(model_dict.get("anchor_boxes", False))
    for key in LEGACY_MODEL_KEYS:
        model_dict.pop(key)
    model_dict["query_source"] = source
    if anchors:
        terms = plain.setdefault("loss", {}).setdefault("terms", ["labels", "cardinality", "boxes"])
        if "boxes" in terms and "box_parts" not in terms:
            terms.append("box_parts")
    backbone_dict = model_dict.get("backbone", {})
    channels = backbone_dict.pop("pyramid_channels", None)
    if backbone_dict.get("type") == "vit":
        options = {"channels": 256 if channels is None else channels}
        model_dict["neck"] = {"type": "simple_pyramid", "options": options}
    return OmegaConf.create(plain)
