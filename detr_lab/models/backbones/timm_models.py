"""Creating timm models for the timm-based backbones, with ImageNet weights through timm's own loader.

`pretrained=True` lets timm fetch the model's default weights (Hugging Face hub or URL, cached);
`weights_path` points timm at a local file instead (`pretrained_cfg_overlay=dict(file=...)`), which
timm reads with `torch.load(weights_only=True)` and passes through the model's own checkpoint filter
(e.g. a ViT's position embeddings resized to the model's grid). Nothing is downloaded then.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
from torch import nn


def create_timm_model(
    name: str,
    *,
    pretrained: bool = False,
    weights_path: str | os.PathLike | None = None,
    size_options: Sequence[dict[str, Any]] = ({},),
    **kwargs: Any,
) -> nn.Module:
    """`timm.create_model(name, **kwargs)` with weights from timm's hub, a local file or none.

    Args:
        name: a timm model name (`timm.list_models()`), e.g. "convnext_atto".
        pretrained: load timm's default pretrained weights for `name` (may download).
        weights_path: a local timm state dict of `name` to load instead (never downloads).
        size_options: keyword sets tried in order until the model's constructor accepts one, e.g.
            `({"strict_img_size": False}, {})`: options letting some architectures take any input
            size, which others do not know.
        kwargs: further `timm.create_model` arguments (`features_only`, widths, `drop_path_rate`, ...).
    Raises:
        ValueError: an unknown model name, both weight sources, a missing weights file or one that
            does not fit the model (the message names the file).
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model '{name}' (see timm.list_models())")
    if pretrained and weights_path is not None:
        raise ValueError("give either pretrained=True or weights_path, not both")
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise ValueError(f"{path}: backbone weights file not found")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    else:
        kwargs.update(pretrained=pretrained)
    for index, options in enumerate(size_options):
        try:
            return timm.create_model(name, **options, **kwargs)
        except TypeError as err:
            # An architecture without one of these options rejects it: try the next set.
            known = index + 1 < len(size_options) and any(key in str(err) for key in options)
            if not known:
                raise
        except RuntimeError as err:  # timm's strict load of a file that does not fit
            if weights_path is None:
                raise
            lines = [line.strip().rstrip(":") for line in str(err).splitlines() if line.strip()]
            detail = "; ".join(lines[:2])[:300]  # "Error(s) in loading ...; size mismatch for ..."
            raise ValueError(f"{weights_path} does not fit timm model '{name}': {detail}") from None
    raise AssertionError("unreachable: the last size option re-raises")
