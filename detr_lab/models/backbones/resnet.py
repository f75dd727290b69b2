"""torchvision ResNets with frozen batch norm: images -> the feature maps of selected stages.

DETR uses the last level (stride 32, or 16 with a dilated last stage, "DC5"); Deformable DETR uses
the last three (strides 8, 16, 32). The backbone returns whichever stages it was asked for. Its
module names are torchvision's (`body.conv1`, `body.layer1`, ...), which the official DETR and
Deformable DETR checkpoints use too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn

from detr_lab.io import safe_load
from detr_lab.models.backbones.base import Backbone

# torchvision constructor and ImageNet weights enum per supported depth. DETR's published
# checkpoints were trained from the original (V1) torchvision weights.
RESNETS = {
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
    "resnet34": (torchvision.models.resnet34, "ResNet34_Weights"),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights"),
}
BASIC_BLOCK_RESNETS = ("resnet18", "resnet34")
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all stored as buffers.

    Computes `x * scale + shift` with `scale = weight / sqrt(running_var + eps)` and
    `shift = bias - running_mean * scale` (eps 1e-5, as DETR). Input and output `[B, C, H, W]`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights saved from a regular BatchNorm2d carry a step counter this module does not keep.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """`scale` and `shift`, each `[C]`, of the map `x * scale + shift`."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# "frozen_bn" keeps ImageNet (or checkpoint) statistics fixed, as DETR; "batch_norm" trains them,
# which a backbone trained from scratch needs (with frozen identity statistics it has no normalization).
NORM_LAYERS = {"frozen_bn": FrozenBatchNorm2d, "batch_norm": nn.BatchNorm2d}


class ResNetBackbone(Backbone):
    """torchvision ResNet-18/34/50/101 with FrozenBatchNorm2d, returning selected stages.

    Args:
        name: "resnet18", "resnet34", "resnet50" or "resnet101".
        stages: which residual stages to return, 1-based (`layer1`..`layer4`): 2, 3, 4 have strides
            8, 16, 32 (the last 16 when `dilation`). Stages past the deepest requested are not built.
        dilation: dilate the last stage instead of striding it ("DC5"); bottleneck ResNets only.
        frozen_stages: 0 trains everything; k >= 1 freezes the stem and `layer1`..`layer{k}`
            (DETR freezes the stem and layer1).
        norm: "frozen_bn" (DETR) or "batch_norm" (trainable statistics, for training from scratch).
        pretrained: load torchvision's ImageNet weights (downloads them on first use).
        weights_path: a local torchvision ResNet state dict to load instead (never downloads).

    Attributes:
        body: `nn.ModuleDict` with torchvision's names (`conv1`, `bn1`, `relu`, `maxpool`, `layer1`..).
        num_channels: channels of each returned level. strides: stride of each returned level.
    """

    def __init__(
        self,
        name: str = "resnet50",
        *,
        stages: Sequence[int] = (4,),
        dilation: bool = False,
        frozen_stages: int = 1,
        pretrained: bool = False,
        weights_path: str | os.PathLike | None = None,
        norm: str = "frozen_bn",
    ) -> None:
        super().__init__()
        if norm not in NORM_LAYERS:
            raise ValueError(f"unknown backbone norm '{norm}'; expected one of: {', '.join(NORM_LAYERS)}")
        if name not in RESNETS:
            raise ValueError(f"unknown backbone '{name}'; expected one of: {', '.join(RESNETS)}")
        stages = tuple(stages)
        if not stages or any(s not in (1, 2, 3, 4) for s in stages) or list(stages) != sorted(set(stages)):
            raise ValueError(f"backbone stages must be increasing values in 1..4, got {stages}")
        if dilation and name in BASIC_BLOCK_RESNETS:
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/101), not '{name}'")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4, got {frozen_stages}")
        if pretrained and weights_path is not None:
            raise ValueError("give either pretrained=True or weights_path, not both")
        self.name = name
        self.stages = stages
        self.dilation = dilation

        constructor, _ = RESNETS[name]
        resnet = constructor(
            weights=None, norm_layer=NORM_LAYERS[norm], replace_stride_with_dilation=[False, False, dilation]
        )
        deepest = max(stages)
        modules = {"conv1": resnet.conv1, "bn1": resnet.bn1, "relu": resnet.relu, "maxpool": resnet.maxpool}
        for index in range(1, deepest + 1):
            modules[f"layer{index}"] = getattr(resnet, f"layer{index}")
        self.body = nn.ModuleDict(modules)

        width = 64 if name in BASIC_BLOCK_RESNETS else 256  # channels out of layer1
        self.num_channels = [width * 2 ** (s - 1) for s in stages]
        self.strides = [4 * 2 ** (s - 1) for s in stages]
        if dilation and 4 in stages:
            self.strides[stages.index(4)] = 16

        if pretrained:
            self.load_imagenet_weights(self.download_imagenet_weights(), source=f"torchvision {name} weights")
        elif weights_path is not None:
            self.load_imagenet_weights(self.read_weights_file(weights_path), source=str(weights_path))
        self.freeze_stages(frozen_stages)

    def download_imagenet_weights(self) -> dict[str, Tensor]:
        _, enum_name = RESNETS[self.name]
        weights = getattr(torchvision.models, enum_name).IMAGENET1K_V1
        return weights.get_state_dict(progress=True)

    @staticmethod
    def read_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
        state = safe_load(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{path}: expected a torchvision ResNet state dict (name -> tensor)")
        return state

    def load_imagenet_weights(self, state: dict[str, Tensor], source: str) -> None:
        """Load a torchvision ResNet state dict (its `fc.*` and unused deeper stages are ignored)."""
        built = set(self.body.keys())
        kept = {
            key: value
            for key, value in state.items()
            if key.split(".", 1)[0] in built and not key.endswith("num_batches_tracked")
        }
        expected = self.body.state_dict()
        missing = sorted(set(expected) - set(kept))
        unexpected = sorted(set(kept) - set(expected))
        mismatched = [k for k in set(kept) & set(expected) if kept[k].shape != expected[k].shape]
        if missing or unexpected or mismatched:
            problems = []
            if missing:
                problems.append(f"missing {missing[:5]}")
            if unexpected:
                problems.append(f"unexpected {unexpected[:5]}")
            if mismatched:
                shapes = [
                    f"{k} {tuple(kept[k].shape)} vs {tuple(expected[k].shape)}"
                    for k in sorted(mismatched)[:5]
                ]
                problems.append(f"shape mismatch {shapes}")
            raise ValueError(f"{source} does not fit backbone '{self.name}': " + "; ".join(problems))
        self.body.load_state_dict(kept)

    def freeze_stages(self, frozen_stages: int) -> None:
        """Stop gradients to the stem and `layer1`..`layer{frozen_stages}` (nothing when 0)."""
        if frozen_stages == 0:
            return
        frozen = {"conv1", "bn1"} | {f"layer{i}" for i in range(1, frozen_stages + 1)}
        for name, module in self.body.items():
            if name in frozen:
                module.requires_grad_(False)

    def feature_maps(self, images: Tensor, padding_mask: Tensor | None = None) -> list[Tensor]:
        """Maps `[B, C_l, H_l, W_l]` of the requested stages, shallowest first (`padding_mask` unused).

        `images`: float `[B, 3, H, W]`; any size (each stride-2 layer rounds up, as torchvision).
        """
        x = images
        maps = []
        for name, module in self.body.items():
            x = module(x)
            if name.startswith("layer") and int(name[5:]) in self.stages:
                maps.append(x)
        return maps
