"""Hierarchical timm backbones (ConvNeXt, Swin, timm's own ResNets, ...) through `features_only`.

timm wraps the model so that it returns the maps of its stages (`features_only=True`, read through
`forward_intermediates`, always `[B, C, H, W]`) and describes them in `feature_info` (channels and
reduction of each); this backbone keeps the stages at the strides the detector asks for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from detr_lab.models.backbones.base import Backbone
from detr_lab.models.backbones.timm_models import create_timm_model

# Swin-style models take inputs of any size (windows padded inside, masks built per size) only with
# `strict_img_size=False`; other architectures do not know the option and are built without it.
ANY_SIZE_OPTIONS: tuple[dict[str, Any], ...] = ({"strict_img_size": False}, {})


class TimmBackbone(Backbone):
    """The stages of a timm model at the requested strides, from `timm.create_model(features_only=True)`.

    Args:
        name: a timm model name with `features_only` support, e.g. "convnext_atto",
            "swin_tiny_patch4_window7_224".
        strides: the strides (input pixels per feature pixel) of the stages to return, increasing,
            e.g. (8, 16, 32). Each must be one of the model's stage reductions.
        pretrained: timm's default weights (may download); weights_path: a local timm state dict of
            the model (never downloads). See `create_timm_model`.
        model_kwargs: further `timm.create_model` arguments (e.g. `drop_path_rate`, or small widths).

    Images are zero-padded bottom/right to a multiple of the deepest stage's stride (padding in the
    mask), so every stage divides its input evenly. The padding mask does not enter the model:
    convolutions and Swin's windows see the zero padding, as the ResNet backbone does.

    Attributes:
        model: timm's feature wrapper (a `FeatureGetterNet`); num_channels, strides: per level.
    Raises:
        ValueError: an unknown model, a stride the model does not have, or a weights problem.
    """

    def __init__(
        self,
        name: str,
        *,
        strides: Sequence[int] = (8, 16, 32),
        pretrained: bool = False,
        weights_path: str | os.PathLike | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        strides = tuple(strides)
        if not strides or list(strides) != sorted(set(strides)):
            raise ValueError(f"backbone strides must be increasing, got {strides}")
        try:
            self.model = create_timm_model(
                name,
                pretrained=pretrained,
                weights_path=weights_path,
                size_options=ANY_SIZE_OPTIONS,
                features_only=True,
                feature_cls="getter",  # forward_intermediates: [B, C, H, W] maps for every architecture
                **(model_kwargs or {}),
            )
        except AssertionError as err:  # timm's checks of the requested feature stages
            raise ValueError(
                f"timm model '{name}' cannot return its stages (features_only): {err} "
                f"(a plain ViT has a single stride: use the 'vit' backbone type)"
            ) from None
        available = list(self.model.feature_info.reduction())
        missing = [s for s in strides if s not in available]
        if missing:
            raise ValueError(
                f"timm model '{name}' has stages at strides {available}, not {missing} "
                f"(a plain ViT has a single stride: use the 'vit' backbone type)"
            )
        self.name = name
        self.level_indices = [available.index(s) for s in strides]  # positions in the model's outputs
        channels = self.model.feature_info.channels()
        self.num_channels = [channels[i] for i in self.level_indices]
        self.strides = list(strides)
        self.size_multiple = max(available)

    def feature_maps(self, images: Tensor, padding_mask: Tensor | None = None) -> list[Tensor]:
        """Maps `[B, num_channels[l], H / strides[l], W / strides[l]]`, shallowest first.

        `images`: float `[B, 3, H, W]` with sides divisible by `size_multiple`; `padding_mask` unused.
        """
        maps = self.model(images)
        return [maps[i] for i in self.level_indices]
