"""Checkpoints: detr_lab's own format, Lightning checkpoints and official weights.

    loaded = load_checkpoint("runs/x/model.pt")               # detr_lab, Lightning or official file
    model, cfg = load_official("detr-r50-e632da11.pth")       # official DETR -> detr_lab model
    model, cfg = load_official("r50_deformable_detr-checkpoint.pth")  # official Deformable DETR
    save_checkpoint("model.pt", model, cfg, category_ids, class_names)

Modules:
    formats.py           the detr_lab format, Lightning checkpoints, `load_checkpoint`, `save_checkpoint`
    official.py          official checkpoints -> detr_lab models through the registered families
    family.py            the family record, its registry (`register_family`), key-rule mapping
    detr.py              the official DETR family (facebookresearch/detr)
    deformable_detr.py   the official Deformable DETR family (fundamentalvision/Deformable-DETR)
    dino.py              the official DINO family (IDEA-Research/DINO)
    weights.py           exact state-dict loads, building a model from a config, config overrides
                         (`split_model_overrides`: the `model.*` ones apart from the rest)

Safe reading, the atomic writer and the state-dict comparison live in the leaf module
`detr_lab.io` and are re-exported here. Adding an official family is one module that calls
`register_family` plus its import in `official.py`.

May import `detr_lab.config`, `detr_lab.io`, `detr_lab.models` and `detr_lab.data.categories` (the
COCO class names); `engine`, `export`, `predict`, `benchmark` and the tools import it, `models`
and `data` never do. No module of the package imports the package itself (its `__init__` imports
them): `official.py` names each family module.
"""

from __future__ import annotations

from detr_lab.checkpoints.family import (
    OFFICIAL_FAMILIES,
    CheckpointWarning,
    KeyRule,
    OfficialFamily,
    map_keys,
    official_family,
    register_family,
)
from detr_lab.checkpoints.formats import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LIGHTNING_META_KEY,
    LIGHTNING_MODEL_PREFIX,
    LoadedCheckpoint,
    convert_official_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from detr_lab.checkpoints.official import (
    convert_official,
    load_official,
    official_categories,
    official_class_names,
)
from detr_lab.checkpoints.weights import (
    apply_overrides,
    build_loaded,
    load_state_exactly,
    split_model_overrides,
)
from detr_lab.io import CheckpointError, FileWriteError, safe_load

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LIGHTNING_META_KEY",
    "LIGHTNING_MODEL_PREFIX",
    "OFFICIAL_FAMILIES",
    "CheckpointError",
    "CheckpointWarning",
    "FileWriteError",
    "KeyRule",
    "LoadedCheckpoint",
    "OfficialFamily",
    "apply_overrides",
    "build_loaded",
    "convert_official",
    "convert_official_checkpoint",
    "load_checkpoint",
    "load_official",
    "load_state_exactly",
    "map_keys",
    "official_categories",
    "official_class_names",
    "official_family",
    "register_family",
    "safe_load",
    "save_checkpoint",
    "split_model_overrides",
]
