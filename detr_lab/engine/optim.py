"""Optimizer and LR schedule of the DETR recipe: AdamW with per-name learning rates, step decay.

Every trainable parameter gets `optim.lr`, or `optim.lr_backbone` when its name contains "backbone"
(or its module is marked `backbone_rate`, the ViTDet pyramid neck);
each `optim.lr_multipliers` substring found in the name multiplies that rate (several matches
multiply together). `lr_backbone: 0` freezes the backbone instead of training it at rate zero.
Parameters whose name contains an `optim.no_decay_keys` substring get weight decay 0 (in groups of
their own, named with a "no_decay" suffix); the others `optim.weight_decay`.
"""

from __future__ import annotations

import torch
from torch import nn

from detr_lab.config import ConfigError, OptimConfig

BACKBONE_KEY = "backbone"


def backbone_rate_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters trained at `optim.lr_backbone`: those whose name contains "backbone" and
    those of modules marked `backbone_rate = True` (the ViTDet pyramid, part of the backbone before
    it became a neck: its runs keep their recipe and parameter groups)."""
    ids = {id(p) for name, p in model.named_parameters() if BACKBONE_KEY in name}
    for module in model.modules():
        if getattr(module, "backbone_rate", False):
            ids |= {id(p) for p in module.parameters()}
    return ids


def freeze_backbone(model: nn.Module) -> int:
    """Set requires_grad False on every backbone-rate parameter (`backbone_rate_parameters`); return
    how many."""
    ids = backbone_rate_parameters(model)
    count = 0
    for parameter in model.parameters():
        if id(parameter) in ids:
            parameter.requires_grad_(False)
            count += 1
    return count


def build_param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW parameter groups of the trainable parameters of `model`, one per distinct rate rule.

    Each group is `{"params": [...], "lr": float, "name": str, "param_names": [...]}` (and
    `"weight_decay": 0.0` for no-decay groups); `name` is "backbone" or "default", followed by the
    multiplier keys that matched (e.g. "default*sampling_offsets") and "no_decay" where it applies.
    Raises:
        ConfigError: a key of `optim.lr_multipliers` or `optim.no_decay_keys` matches no parameter
            name (likely a typo).
    """
    all_names = [name for name, _ in model.named_parameters()]
    for option, keys in (("lr_multipliers", optim.lr_multipliers), ("no_decay_keys", optim.no_decay_keys)):
        for key in keys:
            if not any(key in name for name in all_names):
                raise ConfigError(f"'optim.{option}' key '{key}' matches no parameter name of the model")
    groups: dict[str, dict] = {}
    backbone_ids = backbone_rate_parameters(model)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_backbone = id(parameter) in backbone_ids
        lr = optim.lr_backbone if is_backbone else optim.lr
        matched = [key for key in optim.lr_multipliers if key in name]
        for key in matched:
            lr *= optim.lr_multipliers[key]
        no_decay = any(key in name for key in optim.no_decay_keys)
        parts = [BACKBONE_KEY if is_backbone else "default", *matched, *(["no_decay"] if no_decay else [])]
        group_name = "*".join(parts)
        group = groups.setdefault(group_name, {"params": [], "lr": lr, "name": group_name, "param_names": []})
        if no_decay:
            group["weight_decay"] = 0.0
        group["params"].append(parameter)
        group["param_names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `build_param_groups(model, optim)` with `optim.weight_decay` on every group."""
    groups = build_param_groups(model, optim)
    if not groups:
        raise ConfigError("the model has no trainable parameter (check 'optim.lr_backbone' and the backbone)")
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig
) -> torch.optim.lr_scheduler.MultiStepLR:
    """Multiply every group's rate by `optim.lr_drop_factor` at each epoch of `optim.lr_drop_epochs`.

    Stepped once per epoch, so the drop applies from epoch `lr_drop_epochs[i]` (0-based) onwards.
    """
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=sorted(optim.lr_drop_epochs), gamma=optim.lr_drop_factor
    )
