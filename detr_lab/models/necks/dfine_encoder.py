"""D-FINE's hybrid encoder as a neck (Peng et al. 2024, "D-FINE: Redefine Regression Task in DETRs as
Fine-grained Distribution Refinement"), as the official `HybridEncoder` of Peterande/D-FINE
(src/zoo/dfine/hybrid_encoder.py) computes it.

It is RT-DETR's hybrid encoder (`hybrid_encoder.HybridEncoder`: input projections, AIFI on the deepest
level with the 2-D sin-cos embedding, a top-down and a bottom-up fusion pass) with three CCFM parts
changed:

- fusion blocks: `RepNCSPELAN4` (YOLOv9's GELAN block, Wang et al. 2024, "YOLOv9: Learning What You
  Want to Learn Using Programmable Gradient Information") instead of a CSP block of RepVGG blocks;
- downsampling: `SCDown` (YOLOv10's spatial-channel decoupled downsampling, Wang et al. 2024,
  "YOLOv10: Real-Time End-to-End Object Detection"), a 1x1 conv then a depthwise 3x3 stride-2 conv,
  instead of a full 3x3 stride-2 conv;
- lateral 1x1 convs without activation.

Official quirks kept: none of these parts reads the encoder's `act` option (the blocks' own default,
SiLU, is used; every released config says SiLU anyway) — here `act` is the fusion blocks' activation,
default SiLU, and the lateral and downsampling convs have none; the fusion blocks' branch width is
`round(expansion * hidden_dim // 2)` (floor division of the float product, then `round`), their
RepVGG blocks per CSP block `round(3 * depth_mult)`. Module names follow the official checkpoints
(`fpn_blocks.0.cv2.0.bottlenecks.1.conv1.conv`, `downsample_convs.0.0.cv2.norm`, ...), so their
`encoder.*` weights load under `neck.*` without renaming
(`detr_lab.checkpoints.dfine_encoder.dfine_encoder_state_dict`).

Input sizes: the official module upsamples by a factor 2 and so needs every map to be twice the next
deeper one (input sizes that are multiples of the deepest stride); here a deeper map is resized to
the shallower one's size (nearest), which is the same at those sizes and also takes others, and a
stride-2 `SCDown` gives ceil(H/2) x ceil(W/2), the size of the next backbone level for stride-2
stages padded by 1 (HGNetv2, ResNet). The position embedding is computed for each input's grid (the
official training-mode behaviour; in eval mode the official module uses the one built for its
`eval_spatial_size`, equal for inputs of that size).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detr_lab.models.necks.hybrid_encoder import ConvNormAct, CSPRepBlock, HybridEncoder


class SCDown(nn.Module):
    """Spatial-channel decoupled downsampling: a 1x1 conv-norm (`cv1`, channels) then a depthwise 3x3
    conv-norm of stride `stride` (`cv2`, space), no activation: `[B, C_in, H, W]` -> `[B, C_out,
    ceil(H/s), ceil(W/s)]`."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.cv1 = ConvNormAct(c_in, c_out, 1, 1, None)
        self.cv2 = ConvNormAct(c_out, c_out, kernel, stride, None, groups=c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(self.cv1(x))


class RepNCSPELAN4(nn.Module):
    """YOLOv9's RepNCSPELAN4 block: `[B, C_in, H, W]` -> `[B, C_out, H, W]`.

    `cv1` (1x1) maps the input to `c_mid` channels, split in two halves a, b; `cv2` turns b into
    y1 and `cv3` turns y1 into y2 (each a CSP block of `num_blocks` RepVGG blocks at width `c_branch`,
    expansion 1, then a 3x3 conv-norm-act); `cv4` (1x1) maps the concatenation [a, b, y1, y2]
    (`c_mid + 2 c_branch` channels) to `C_out`. Every conv is followed by batch norm and `act`.
    """

    def __init__(self, c_in: int, c_out: int, c_mid: int, c_branch: int, num_blocks: int, act: str) -> None:
        super().__init__()
        if c_mid % 2:
            raise ValueError(f"RepNCSPELAN4 splits its {c_mid} inner channels in halves: needs an even count")
        self.half = c_mid // 2
        self.cv1 = ConvNormAct(c_in, c_mid, 1, 1, act)
        self.cv2 = nn.Sequential(
            CSPRepBlock(self.half, c_branch, num_blocks, 1.0, act), ConvNormAct(c_branch, c_branch, 3, 1, act)
        )
        self.cv3 = nn.Sequential(
            CSPRepBlock(c_branch, c_branch, num_blocks, 1.0, act), ConvNormAct(c_branch, c_branch, 3, 1, act)
        )
        self.cv4 = ConvNormAct(c_mid + 2 * c_branch, c_out, 1, 1, act)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.cv1(x).split((self.half, self.half), dim=1)
        y1 = self.cv2(b)
        y2 = self.cv3(y1)
        return self.cv4(torch.cat((a, b, y1, y2), dim=1))


def elan_branch_width(width: int, expansion: float) -> int:
    """The fusion blocks' branch width as the official code computes it: `round(expansion * width // 2)`
    (D-FINE-N: width 128, expansion 0.34 -> 21; S: 256, 0.5 -> 64; M/L: 256, 1.0 -> 128)."""
    return round(expansion * width // 2)


class DFineHybridEncoder(HybridEncoder):
    """D-FINE's hybrid encoder: `HybridEncoder` (same arguments, attributes and neck contract) with
    D-FINE's CCFM parts (see the module docstring).

    Args (those that differ in meaning from `HybridEncoder`'s):
        expansion: the fusion blocks' branch width is `elan_branch_width(d, expansion)`.
        depth_mult: RepVGG blocks per CSP block: round(3 x depth_mult).
        act: the fusion blocks' activation (the official blocks' fixed SiLU by default).

    Per fusion step: `lateral_convs[i]` (1x1 conv-norm, `[B, d, H, W]`), `fpn_blocks[i]` and
    `pan_blocks[i]` (`RepNCSPELAN4`, `[B, 2d, H, W]` -> `[B, d, H, W]`), `downsample_convs[i]`
    (`Sequential(SCDown)`, `[B, d, H, W]` -> `[B, d, ceil(H/2), ceil(W/2)]`; the official nesting).
    """

    def lateral_conv(self, act: str) -> nn.Module:
        return ConvNormAct(self.width, self.width, 1, 1, None)

    def fusion_block(self, expansion: float, depth_mult: float, act: str) -> nn.Module:
        width = self.width
        return RepNCSPELAN4(
            2 * width, width, 2 * width, elan_branch_width(width, expansion), round(3 * depth_mult), act
        )

    def downsample_conv(self, act: str) -> nn.Module:
        return nn.Sequential(SCDown(self.width, self.width, 3, 2))
