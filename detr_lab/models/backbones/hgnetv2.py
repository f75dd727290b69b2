"""HGNetv2 (PP-HGNetv2, B0..B6), the backbone of D-FINE (Peng et al. 2024, arXiv:2410.13842) and DEIM.

The network is timm's HGNetv2, which computes exactly what the official D-FINE `HGNetv2`
(Peterande/D-FINE, src/nn/backbone/hgnetv2.py, after PaddleDetection's PP-HGNetv2) computes and
names its modules alike (see `hgnetv2_keys`): a stem of stride 4 (a 3x3 stride-2 conv; then a branch
of two 2x2 convs, each on its input zero-padded by one pixel right and bottom, beside a 2x2 stride-1
max pool of the first padded map; their concatenation through a 3x3 stride-2 and a 1x1 conv), then
four stages of HG blocks. Stage 0 keeps stride 4; stages 1..3 start with a 3x3 stride-2 depthwise
conv and batch norm, no activation (strides 8, 16, 32). An HG block runs 3..6 convs in a chain
(stages 2 and 3: "light" 1x1 + depthwise 5x5 pairs), concatenates its input with every conv's output
and aggregates them with two 1x1 convs (squeeze to half the output width, then expand); every block
after a stage's first adds its input back. Each conv is followed by batch norm and, where it has an
activation, ReLU and optionally a learnable affine block (`lab`: one scale and one bias,
`scale * x + bias`).

Official options and their detr_lab names: `name: B0`..`B6` -> `name: hgnetv2_b0`..`hgnetv2_b6`;
`return_idx` (stage indices) -> `strides` (stride of stage i = 4 * 2**i); `use_lab` -> `use_lab`;
`freeze_at: -1` -> nothing frozen; `freeze_at: 0` with `freeze_stem_only: True` (the D-FINE-L/X
configs) -> `freeze_stem=True`; `freeze_at: k` with `freeze_stem_only: False` -> `frozen_stages=k+1`
(the stem and stages 0..k); `freeze_norm: True` (every batch norm replaced by a frozen one, whose
statistics and affine parameters are buffers) -> `norm="frozen_bn"`; `pretrained` (a download) ->
`weights_path` (a local file, never a download).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from detr_lab.io import CheckpointError, safe_load
from detr_lab.models.backbones.base import Backbone, freeze_stages
from detr_lab.models.backbones.hgnetv2_keys import (
    LAB_BY_DEFAULT,
    STAGE_STRIDES,
    check_hgnetv2_name,
    hgnetv2_network,
    official_hgnetv2_state_dict,
)
from detr_lab.models.backbones.resnet import NORM_LAYERS, FrozenBatchNorm2d


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every `nn.BatchNorm2d` inside `module` (in place) by a `FrozenBatchNorm2d` holding its
    current statistics and affine parameters; returns `module` (or the frozen norm, if it is one)."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, key).copy_(getattr(module, key).detach())
        return frozen
    for name, child in module.named_children():
        replaced = freeze_batch_norm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a `.safetensors` file or a PyTorch file (`torch.load(weights_only=True)`).

    Raises:
        CheckpointError: the file is missing or unreadable, or not a flat name -> tensor dict.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        try:
            return load_file(path)
        except SafetensorError as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    state = safe_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected an HGNetv2 state dict (name -> tensor)")
    return state


class HGNetv2Backbone(Backbone):
    """HGNetv2 B0..B6 returning the stages at the requested strides.

    Args:
        name: `hgnetv2_b0`..`hgnetv2_b6` (D-FINE-N/S: b0, M: b2, L: b4, X: b5).
        strides: strides of the stages to return, increasing, from (4, 8, 16, 32) (stages 0..3);
            D-FINE-N returns (16, 32), the others (8, 16, 32). Stages past the deepest are not built.
        use_lab: learnable affine blocks after every activation; None: on for b0..b3 (timm's default
            and D-FINE-N/S/M's setting), off for b4..b6 (D-FINE-L/X).
        frozen_stages: 0 trains everything; k >= 1 freezes the stem and stages 0..k-1 (official
            `freeze_at: k-1` with `freeze_stem_only: False`).
        freeze_stem: freeze the stem even with frozen_stages 0 (official `freeze_at: 0`,
            `freeze_stem_only: True`: D-FINE-L/X).
        norm: "batch_norm" (trained statistics; D-FINE-N/S/M) or "frozen_bn" (every batch norm
            fixed, official `freeze_norm: True`: D-FINE-L/X).
        weights_path: a local state dict, never downloaded: the official `PPHGNetV2_B*_stage1.pth`
            layout (see `official_hgnetv2_state_dict`) or a timm checkpoint of the same variant
            (`.pth` or `.safetensors`; its classifier `head.*` is dropped).
    Frozen means `requires_grad=False` for the convolutions and affine blocks; trainable batch norm
    in a frozen part still updates its statistics in training mode, as the official module's does.

    Attributes:
        stem, stages: timm's modules, keys as the official checkpoints' (`stem.stem1.conv.weight`,
            `stages.0.blocks.0.layers.0.lab.scale`, ...). num_channels, strides: per returned level.
    Raises:
        ValueError: an unknown variant, stride, norm or frozen_stages; CheckpointError: an
            unreadable weights file or one whose keys do not fit (the message names them).
    """

    def __init__(
        self,
        name: str = "hgnetv2_b0",
        *,
        strides: Sequence[int] = (8, 16, 32),
        use_lab: bool | None = None,
        frozen_stages: int = 0,
        freeze_stem: bool = False,
        norm: str = "batch_norm",
        weights_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.name = check_hgnetv2_name(name)
        strides = [int(s) for s in strides]
        if not strides or strides != sorted(set(strides)) or not set(strides) <= set(STAGE_STRIDES):
            raise ValueError(f"HGNetv2 strides must be increasing values from {STAGE_STRIDES}, got {strides}")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4, got {frozen_stages}")
        if norm not in NORM_LAYERS:
            raise ValueError(f"norm must be one of {sorted(NORM_LAYERS)}, got {norm!r}")
        self.use_lab = self.name in LAB_BY_DEFAULT if use_lab is None else bool(use_lab)
        network = hgnetv2_network(self.name, self.use_lab)
        self.level_indices = [STAGE_STRIDES.index(s) for s in strides]
        self.stem = network.stem
        self.stages = network.stages[: self.level_indices[-1] + 1]
        self.num_channels = [network.feature_info[i]["num_chs"] for i in self.level_indices]
        self.strides = strides
        if norm == "frozen_bn":
            freeze_batch_norm(self)
        if weights_path is not None:
            self.load_weights(weights_path)
        freeze_stages(self.stem, self.stages, frozen_stages, freeze_stem)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load an official or timm HGNetv2 state dict of this variant (see the class docstring)."""
        state = {k: v for k, v in read_weights(path).items() if not k.startswith("head.")}
        try:
            mapped = official_hgnetv2_state_dict(state, name=self.name, use_lab=self.use_lab)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        own = self.state_dict()
        self.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=True)

    def feature_maps(self, images: Tensor, padding_mask: Tensor | None = None) -> list[Tensor]:
        """`[B, 3, H, W]` (any size) -> one `[B, num_channels[l], ~H/strides[l], ~W/strides[l]]` per
        returned stage, shallowest first (`padding_mask` unused: the convolutions see the zeros)."""
        x = self.stem(images)
        maps = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in self.level_indices:
                maps.append(x)
        return maps
