"""The default neck: projections of the backbone levels to width d, plus extra strided levels.

DETR projects its single level with a 1x1 convolution. Deformable DETR (Zhu et al. 2021) projects
each backbone level with a 1x1 convolution and GroupNorm(32), and makes every level past the
deepest backbone stage with a stride-2 3x3 convolution and GroupNorm(32), the first applied to the
deepest backbone output and each next one to the previous extra level.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from detr_lab.models.backbones.base import FeatureLevel, downsample_mask


def group_norm_projection(
    in_channels: int, out_channels: int, *, kernel_size: int = 1, stride: int = 1, groups: int = 32
) -> nn.Sequential:
    """Conv + GroupNorm input projection of Deformable DETR (Xavier-uniform conv, zero bias).

    1x1 for a backbone level; 3x3 with stride 2 for an extra level below the deepest one.

    Raises:
        ValueError: a width not divisible by `groups`.
    """
    if out_channels % groups:
        raise ValueError(
            f"GroupNorm({groups}) input projections need a width divisible by {groups}, got {out_channels}"
        )
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.xavier_uniform_(conv.weight, gain=1)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(groups, out_channels))


class InputProjections(nn.Module):
    """One projection per encoder level: first one per backbone level, then one per extra level.

    Args:
        projections: modules `[B, C, H, W]` -> `[B, d, H', W']`; those past the backbone's levels are
            applied in turn to the deepest backbone output and then to each previous extra level.
        num_backbone_levels: how many of them project backbone levels.

    Attributes: `input_proj` (the `ModuleList` of projections, the official checkpoints' name).
    """

    def __init__(self, projections: Sequence[nn.Module], num_backbone_levels: int) -> None:
        super().__init__()
        if len(projections) < num_backbone_levels:
            raise ValueError(
                f"need one input projection per backbone level (and one per extra level): "
                f"{len(projections)} projections, {num_backbone_levels} backbone levels"
            )
        self.input_proj = nn.ModuleList(projections)
        self.num_backbone_levels = num_backbone_levels

    @property
    def num_levels(self) -> int:
        return len(self.input_proj)

    def forward(
        self, levels: Sequence[FeatureLevel], padding_mask: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Backbone levels -> features `[B, d, H_l, W_l]` and masks bool `[B, H_l, W_l]` (True =
        padding) per encoder level, shallowest first (extra levels resize the image mask)."""
        features = [proj(level.features) for proj, level in zip(self.input_proj, levels, strict=False)]
        masks = [level.mask for level in levels]
        previous = levels[-1].features
        for proj in self.input_proj[len(levels) :]:
            previous = proj(previous)
            features.append(previous)
            masks.append(downsample_mask(padding_mask, previous.shape[-2:]))
        return features, masks


def build(
    *, in_channels: Sequence[int], hidden_dim: int, num_levels: int, group_norm: bool, **_
) -> InputProjections:
    """1x1 convolutions (DETR), or with `group_norm` the Deformable DETR projections and
    `num_levels - len(in_channels)` extra stride-2 levels."""
    if not group_norm:
        return InputProjections(
            [nn.Conv2d(c, hidden_dim, kernel_size=1) for c in in_channels], len(in_channels)
        )
    projections: list[nn.Module] = [group_norm_projection(c, hidden_dim) for c in in_channels]
    channels = in_channels[-1]
    for _ in range(num_levels - len(in_channels)):
        projections.append(group_norm_projection(channels, hidden_dim, kernel_size=3, stride=2))
        channels = hidden_dim
    return InputProjections(projections, len(in_channels))
