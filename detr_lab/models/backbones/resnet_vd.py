"""ResNet-vd ("bag of tricks" ResNet, He et al. 2019, variant D), the backbone of RT-DETR.

Two differences from torchvision's ResNet, as the official RT-DETR `PResNet` computes them
(lyuwenyu/RT-DETR, rtdetrv2_pytorch/src/nn/backbone/presnet.py):

- the stem is three 3x3 convolutions (3 -> 32 stride 2, 32 -> 32, 32 -> 64), each with batch norm and
  ReLU, then a 3x3 stride-2 max pooling;
- a downsampling shortcut is a 2x2 stride-2 average pooling (ceil mode) followed by a 1x1 convolution
  with batch norm, instead of a strided 1x1 convolution; the first block of the first stage (stride 1)
  has a plain 1x1 convolution shortcut, also for the basic blocks of ResNet-18/34.

Bottleneck blocks (ResNet-50/101) stride in their 3x3 convolution. Module names follow the official
checkpoints (`conv1.conv1_1.conv`, `res_layers.0.blocks.0.branch2a.norm`, `...short.conv`), so their
weights load without renaming.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from detr_lab.io import CheckpointError, safe_load
from detr_lab.models.backbones.base import Backbone, freeze_stages
from detr_lab.models.backbones.resnet import NORM_LAYERS

# depth -> blocks per stage; bottleneck blocks from 50 layers on.
DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)  # a stage's inner width; bottlenecks expand it 4x
STAGE_STRIDES = (4, 8, 16, 32)


class ConvNorm(nn.Module):
    """Conv (no bias, 'same' padding) -> norm -> optional ReLU: `[B, C_in, H, W]` -> `[B, C_out, H/s,
    W/s]` for stride s."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, norm: type, *, relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2, bias=False)
        self.norm = norm(c_out)
        self.act = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


def downsampling_shortcut(c_in: int, c_out: int, stride: int, norm: type) -> nn.Module:
    """The vd shortcut: average pooling then a 1x1 conv when striding, else a 1x1 conv."""
    if stride == 1:
        return ConvNorm(c_in, c_out, 1, 1, norm, relu=False)
    pool = nn.AvgPool2d(2, 2, 0, ceil_mode=True)
    conv = ConvNorm(c_in, c_out, 1, 1, norm, relu=False)
    return nn.Sequential(OrderedDict([("pool", pool), ("conv", conv)]))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (the first strides) plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, norm: type, *, first: bool) -> None:
        super().__init__()
        # Registered before the branch, as in the official checkpoints' key order.
        self.short = downsampling_shortcut(c_in, width, stride, norm) if first else None
        self.branch2a = ConvNorm(c_in, width, 3, stride, norm, relu=True)
        self.branch2b = ConvNorm(width, width, 3, 1, norm, relu=False)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.short is None else self.short(x)
        return self.act(self.branch2b(self.branch2a(x)) + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strides) -> 1x1 (4x width) plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, norm: type, *, first: bool) -> None:
        super().__init__()
        self.branch2a = ConvNorm(c_in, width, 1, 1, norm, relu=True)
        self.branch2b = ConvNorm(width, width, 3, stride, norm, relu=True)
        self.branch2c = ConvNorm(width, width * 4, 1, 1, norm, relu=False)
        self.short = downsampling_shortcut(c_in, width * 4, stride, norm) if first else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.short is None else self.short(x)
        return self.act(self.branch2c(self.branch2b(self.branch2a(x))) + shortcut)


class Stage(nn.Module):
    """`count` blocks; the first changes the width (and strides, except in the first stage)."""

    def __init__(self, block: type, c_in: int, width: int, count: int, stride: int, norm: type) -> None:
        super().__init__()
        blocks = [block(c_in, width, stride, norm, first=True)]
        blocks += [block(width * block.expansion, width, 1, norm, first=False) for _ in range(count - 1)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ResNetVdBackbone(Backbone):
    """ResNet-vd 18/34/50/101 returning selected stages.

    Args:
        depth: 18, 34, 50 or 101.
        stages: residual stages to return, 1-based: 2, 3, 4 have strides 8, 16, 32 (1: stride 4).
            Stages past the deepest requested are not built.
        frozen_stages: 0 trains everything; k >= 1 freezes the stem and stages 1..k.
        freeze_stem: also freeze the stem with `frozen_stages` 0 (the official `freeze_at: 0` of
            RT-DETR-R50/R101: the three stem convolutions only).
        norm: "batch_norm" (trained statistics; RT-DETRv2-R18/34) or "frozen_bn" (fixed; R50/R101).
        weights_path: a local state dict in the official key layout (`conv1.conv1_1.conv.weight`, ...),
            e.g. the ImageNet weights RT-DETR starts from; never downloads.
    Raises:
        ValueError: an unknown depth or stage; CheckpointError: unreadable weights or wrong keys.
    """

    def __init__(
        self,
        depth: int,
        *,
        stages: Sequence[int] = (2, 3, 4),
        frozen_stages: int = 0,
        freeze_stem: bool = False,
        norm: str = "batch_norm",
        weights_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet-vd depth must be one of {sorted(DEPTHS)}, got {depth}")
        stages = sorted(int(s) for s in stages)
        if not stages or stages[0] < 1 or stages[-1] > 4:
            raise ValueError(f"ResNet-vd stages must be within 1..4, got {stages}")
        if norm not in NORM_LAYERS:
            raise ValueError(f"norm must be one of {sorted(NORM_LAYERS)}, got {norm!r}")
        layer = NORM_LAYERS[norm]
        block = Bottleneck if depth >= 50 else BasicBlock
        self.conv1 = nn.Sequential(
            OrderedDict(
                [
                    ("conv1_1", ConvNorm(3, 32, 3, 2, layer, relu=True)),
                    ("conv1_2", ConvNorm(32, 32, 3, 1, layer, relu=True)),
                    ("conv1_3", ConvNorm(32, 64, 3, 1, layer, relu=True)),
                ]
            )
        )
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.res_layers = nn.ModuleList()
        c_in = 64
        for index, count in enumerate(DEPTHS[depth][: stages[-1]]):
            width = STAGE_WIDTHS[index]
            self.res_layers.append(Stage(block, c_in, width, count, 1 if index == 0 else 2, layer))
            c_in = width * block.expansion
        self.stages = stages
        self.num_channels = [STAGE_WIDTHS[s - 1] * block.expansion for s in stages]
        self.strides = [STAGE_STRIDES[s - 1] for s in stages]
        if weights_path is not None:
            self._load_weights(weights_path)
        freeze_stages(self.conv1, self.res_layers, frozen_stages, freeze_stem)

    def _load_weights(self, path: str | os.PathLike) -> None:
        state = safe_load(path)
        own = self.state_dict()
        missing = [k for k in own if k not in state] if isinstance(state, dict) else list(own)
        if missing:
            raise CheckpointError(
                f"{path}: not a ResNet-vd state dict of this depth; missing e.g. {missing[:3]}"
            )
        self.load_state_dict({k: v for k, v in state.items() if k in own})

    def feature_maps(self, images: Tensor, padding_mask: Tensor | None = None) -> list[Tensor]:
        """`[B, 3, H, W]` -> one `[B, C_s, H/stride, W/stride]` per returned stage, shallowest first."""
        x = self.pool(self.conv1(images))
        maps = []
        for index, stage in enumerate(self.res_layers, start=1):
            x = stage(x)
            if index in self.stages:
                maps.append(x)
        return maps
