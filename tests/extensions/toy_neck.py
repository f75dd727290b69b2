"""A toy neck for the extension-point test: the deepest backbone level alone, projected to width d
by a 1x1 convolution and scaled by a learned gain. One file; registered by one `NECKS` line."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DeepestLevelNeck(nn.Module):
    """Backbone levels -> one encoder level `[B, d, h, w]` (the deepest) and its mask `[B, h, w]`."""

    num_levels = 1

    def __init__(self, in_channels: int, hidden_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, levels, padding_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        deepest = levels[-1]
        return [self.proj(deepest.features) * self.gain], [deepest.mask]


def build(*, in_channels, hidden_dim: int, **_) -> DeepestLevelNeck:
    return DeepestLevelNeck(in_channels[-1], hidden_dim)
