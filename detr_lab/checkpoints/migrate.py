"""Versioned migration of stored weights: state dicts written by earlier releases, renamed for today's model.

Weights layout version 1 (before the assembled detector) kept the input projections and the learned
queries on the detector itself; version 2 holds them in the neck and the query source:

| version 1 | version 2 |
|---|---|
| `input_proj.*` | `neck.input_proj.*` |
| `query_embed.*` (DETR, Deformable DETR) | `query_source.query_embed.*` |
| `reference_points_head.*` | `query_source.reference_points_head.*` |
| `proposal_queries.*` (two-stage) | `query_source.*` |
| `backbone.pyramid.*` (ViT) | `neck.pyramid.*` (the simple feature pyramid is a neck) |

Every other key kept its name. detr_lab checkpoints carry their version (`version`); Lightning
checkpoints carry it in their metadata entry (`weights_version`; absent: 1). The stored config is
migrated by `detr_lab.config_migration` when it is read.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TypeVar

from detr_lab.io import CheckpointError

WEIGHTS_VERSION = 2
V1_RENAMES = (
    ("input_proj.", "neck.input_proj."),
    ("query_embed.", "query_source.query_embed."),
    ("reference_points_head.", "query_source.reference_points_head."),
    ("proposal_queries.", "query_source."),
    ("backbone.pyramid.", "neck.pyramid."),
)

Value = TypeVar("Value")


def migrate_state_dict(state: Mapping[str, Value], version: int, prefix: str = "") -> dict[str, Value]:
    """`state` (weights layout `version`) renamed to the current layout.

    Args:
        state: parameter name -> tensor, names possibly under `prefix` (Lightning: "model.").
        version: the layout the names follow (1 or 2).
        prefix: the part of each name before the model's own name; keys without it are kept as they are.
    Raises:
        CheckpointError: a version newer than this code's, or not a known one.
    """
    if version == WEIGHTS_VERSION:
        return dict(state)
    if version != 1:
        raise CheckpointError(
            f"weights layout version {version!r}; this code reads versions 1 to {WEIGHTS_VERSION}"
        )
    migrated: dict[str, Value] = {}
    for key, value in state.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if name is not None:
            for old, new in V1_RENAMES:
                if name.startswith(old):
                    key = prefix + new + name[len(old) :]
                    break
        migrated[key] = value
    return migrated


def migrate_lightning_checkpoint(checkpoint: MutableMapping, version: int, prefix: str = "model.") -> None:
    """Rename, in place, the model weights of a Lightning checkpoint: its `state_dict` and, for runs
    with weight averaging (EMA), the raw weights in `current_model_state`."""
    for key in ("state_dict", "current_model_state"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint[key] = migrate_state_dict(checkpoint[key], version, prefix)
