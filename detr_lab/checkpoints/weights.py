"""Weights into models: reading a checkpoint source, exact state-dict loads, config overrides
(`apply_overrides`, and `split_model_overrides`, which evaluation, inference and export share).

Shared by the detr_lab/Lightning formats and the official families' conversion.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf
from torch import Tensor, nn

from detr_lab.config import Config, ConfigError, config_from_dict, config_to_dict
from detr_lab.io import CheckpointError, diff_state_dicts, safe_load
from detr_lab.models.build import build_model


def read_source(source: str | os.PathLike | Mapping) -> tuple[Any, str]:
    """(loaded object, a name for messages) of a checkpoint path (through `safe_load`) or a loaded dict."""
    if isinstance(source, Mapping):
        return source, "checkpoint dict"
    return safe_load(source), str(source)


def load_state_exactly(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """`model.load_state_dict(state)` that fails with a message naming a few offending keys.

    Raises:
        CheckpointError: "<source>: weights do not fit the configured model: ..." listing missing,
            unexpected and shape-mismatched keys (see `detr_lab.io.StateDictDiff`).
    """
    diff = diff_state_dicts(model.state_dict(), state)
    if not diff.exact:
        raise CheckpointError(f"{source}: weights do not fit the configured model: {diff.summary()}")
    model.load_state_dict(state)


def build_loaded(cfg: Config, state: Mapping[str, Tensor], source: str) -> nn.Module:
    """Build `cfg.model` without fetching ImageNet weights, load `state` exactly, eval mode."""
    backbone = dataclasses.replace(cfg.model.backbone, pretrained=False, weights_path=None)
    model = build_model(dataclasses.replace(cfg.model, backbone=backbone))
    load_state_exactly(model, state, source)
    return model.eval()


def apply_overrides(stored: Mapping | Config, overrides: Sequence[str], where: str) -> Config:
    """A stored config (dict or `Config`) with dotted `key.path=value` overrides applied and validated.

    Raises:
        ConfigError: an override without "=", or a resulting config that does not validate.
    """
    data = config_to_dict(stored) if isinstance(stored, Config) else dict(stored)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
    merged = OmegaConf.merge(OmegaConf.create(data), OmegaConf.from_dotlist(list(overrides)))
    return config_from_dict(merged, where)


def split_model_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split dotted `key=value` overrides into those under `model.` (they change a checkpoint's stored
    model config) and the rest (data, trainer, ... settings of a YAML); order kept within each."""
    model = [item for item in overrides if item.strip().startswith("model.")]
    other = [item for item in overrides if not item.strip().startswith("model.")]
    return model, other
