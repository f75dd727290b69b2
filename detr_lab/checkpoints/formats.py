"""detr_lab's own checkpoint format and Lightning checkpoints; `load_checkpoint` reads every kind.

    loaded = load_checkpoint("runs/x/model.pt")               # detr_lab, Lightning or official file
    save_checkpoint("model.pt", model, cfg, category_ids, class_names)
    convert_official_checkpoint("detr-r50-e632da11.pth", "detr_r50.pt")

Every file goes through `detr_lab.io.safe_load` (`torch.load(weights_only=True)`) and every write
through `detr_lab.io.atomic_torch_save` (temporary file, fsync, rename).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from detr_lab.checkpoints.migrate import WEIGHTS_VERSION, migrate_state_dict
from detr_lab.checkpoints.official import (
    convert_official,
    load_official,
    looks_official,
    official_categories,
)
from detr_lab.checkpoints.weights import apply_overrides, build_loaded, read_source
from detr_lab.config import Config, config_to_dict
from detr_lab.io import CheckpointError, atomic_torch_save

FORMAT_NAME = "detr_lab"
FORMAT_VERSION = WEIGHTS_VERSION  # 1: the layout before the assembled detector (`migrate.py`)
LIGHTNING_META_KEY = "detr_lab"  # the entry the training engine adds to Lightning checkpoints
LIGHTNING_MODEL_PREFIX = "model."
WEIGHTS_VERSION_KEY = "weights_version"  # in the metadata entry of Lightning checkpoints


# --------------------------------------------------------------------------- detr_lab checkpoints
@dataclass
class LoadedCheckpoint:
    """A ready (eval-mode) model with its config and class metadata (class index -> id / name)."""

    model: nn.Module
    config: Config
    category_ids: list[int]
    class_names: list[str]


def _check_classes(
    num_classes: int, category_ids: Sequence[int], class_names: Sequence[str], source: str
) -> None:
    if len(category_ids) != num_classes or len(class_names) != num_classes:
        raise CheckpointError(
            f"{source}: {len(category_ids)} category ids and {len(class_names)} class names for a model "
            f"with num_classes={num_classes}; they must all agree"
        )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    cfg: Config,
    category_ids: Iterable[int],
    class_names: Iterable[str],
) -> Path:
    """Write a detr_lab checkpoint atomically (temporary file, fsync, rename) and return its path.

    The file holds `{"format": "detr_lab", "version": 2, "config", "state_dict", "category_ids",
    "class_names"}`; `load_checkpoint` reads it back. On failure the previous file at `path` is
    left as it was.
    Raises:
        CheckpointError: category ids or class names do not match `cfg.model.num_classes`.
        FileWriteError: the file cannot be written; the message names `path` and the operating
            system's reason (disk full, read-only folder, permission denied).
    """
    path = Path(path)
    category_ids = [int(i) for i in category_ids]
    class_names = [str(n) for n in class_names]
    _check_classes(cfg.model.num_classes, category_ids, class_names, str(path))
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": config_to_dict(cfg),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "category_ids": category_ids,
        "class_names": class_names,
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(source: str | os.PathLike | Mapping, overrides: Sequence[str] = ()) -> LoadedCheckpoint:
    """Load a detr_lab, Lightning or official DETR checkpoint as a ready model.

    Args:
        source: a file path or an already loaded dict of one of:
            - detr_lab format (`save_checkpoint`);
            - a Lightning checkpoint: `state_dict` with the model under `model.` (other prefixes such
              as `criterion.` or `teacher.` are ignored) and a `detr_lab` entry holding `config`,
              `category_ids` and `class_names`;
            - an official DETR or Deformable DETR checkpoint (category ids = class indices, COCO
              names).
        overrides: dotted config overrides applied to the stored config before building, e.g.
            `model.encoder.attention=act`.
    Raises:
        CheckpointError: unreadable file, unknown layout, or weights that do not fit the config.
        ConfigError: an invalid stored config or override.
    """
    data, name = read_source(source)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{name}: expected a checkpoint dict, got {type(data).__name__}")

    if data.get("format") == FORMAT_NAME:
        if data.get("version") not in (1, FORMAT_VERSION):
            raise CheckpointError(
                f"{name}: detr_lab checkpoint version {data.get('version')!r}; "
                f"this code reads versions 1 to {FORMAT_VERSION}"
            )
        meta = data
        state = data.get("state_dict")
        if isinstance(state, Mapping):
            state = migrate_state_dict(state, data["version"])
    elif isinstance(data.get("state_dict"), Mapping) and LIGHTNING_META_KEY in data:
        meta = data[LIGHTNING_META_KEY]
        version = meta.get(WEIGHTS_VERSION_KEY, 1) if isinstance(meta, Mapping) else 1
        state = {
            k[len(LIGHTNING_MODEL_PREFIX) :]: v
            for k, v in migrate_state_dict(data["state_dict"], version, LIGHTNING_MODEL_PREFIX).items()
            if k.startswith(LIGHTNING_MODEL_PREFIX)
        }
        if not state:
            raise CheckpointError(f"{name}: Lightning checkpoint without '{LIGHTNING_MODEL_PREFIX}*' weights")
    elif looks_official(data):
        cfg, state = convert_official(data)
        category_ids, class_names = official_categories(data, cfg.model.num_classes)
        cfg = apply_overrides(cfg, overrides, f"{name} (official config with overrides)")
        model = build_loaded(cfg, state, name)
        return LoadedCheckpoint(model, cfg, category_ids, class_names)
    else:
        raise CheckpointError(
            f"{name}: unknown checkpoint layout (not detr_lab format, not a Lightning checkpoint with a "
            f"'{LIGHTNING_META_KEY}' entry, not an official DETR or Deformable DETR checkpoint); "
            f"top-level keys: {list(data)[:8]}"
        )

    for key in ("config", "category_ids", "class_names"):
        if key not in meta:
            raise CheckpointError(f"{name}: checkpoint metadata lacks '{key}'")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{name}: 'state_dict' is missing or not a dict")
    cfg = apply_overrides(meta["config"], overrides, f"{name} (stored config)")
    category_ids = [int(i) for i in meta["category_ids"]]
    class_names = [str(n) for n in meta["class_names"]]
    _check_classes(cfg.model.num_classes, category_ids, class_names, name)
    model = build_loaded(cfg, state, name)
    return LoadedCheckpoint(model, cfg, category_ids, class_names)


def convert_official_checkpoint(
    source: str | os.PathLike | Mapping, destination: str | os.PathLike, **overrides: Any
) -> Path:
    """Convert an official checkpoint (see `load_official`) and save it in detr_lab format.

    The category ids and names of the classes come from `official_categories` (index = COCO category
    id for the DETR family, RT-DETR's 80 COCO categories in id order).
    Raises:
        CheckpointError: as `load_official`.
        FileWriteError: `destination` cannot be written (the message gives the path and the reason).
    """
    model, cfg = load_official(source, **overrides)
    category_ids, class_names = official_categories(source, cfg.model.num_classes)
    return save_checkpoint(destination, model, cfg, category_ids, class_names)
