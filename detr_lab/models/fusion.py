"""RepVGG re-parameterisation for inference: the same function, fewer operators (used by the ONNX export
on its own copy and by `detr_lab.models.optimize.optimize_for_inference`).

    fused = fuse_repvgg_blocks(model)   # in place; returns how many blocks were fused

RepVGG blocks (RT-DETR's hybrid encoder, `detr_lab.models.necks.hybrid_encoder.RepVggBlock`) are
trained as two conv + batch-norm branches, a 3x3 and a 1x1, summed before the activation. In eval
mode both branches are linear maps of the same input, so they are one 3x3 convolution: each batch
norm folds into its convolution (`W * g / sqrt(var + eps)`, bias `beta - mean * g / sqrt(var + eps)`)
and the 1x1 kernel, zero-padded to 3x3 at the centre, adds to the 3x3 one (Ding et al. 2021,
"RepVGG"; the official RT-DETR `RepVggBlock.convert_to_deploy` does the same before its ONNX export).
The graph then runs one convolution instead of two and no sum; the outputs change by float rounding
only (the folding is computed in float64). Only for models that are run, never trained: `export_onnx`
rewrites its own eval-mode copy. D-FINE's encoder (`detr_lab.models.necks.dfine_encoder`) uses the same
`RepVggBlock` for the official `VGGBlock` inside its RepNCSPELAN4 fusion blocks, so they fuse alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_lab.models.necks.hybrid_encoder import ConvNormAct, RepVggBlock


class FusedRepVggBlock(nn.Module):
    """A `RepVggBlock` as one 3x3 convolution with bias, then the block's activation (eval only)."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


def folded_kernel(branch: ConvNormAct) -> tuple[Tensor, Tensor]:
    """The (weight, bias) in float64 of `branch`'s bias-free convolution followed by its eval-mode
    batch norm."""
    norm = branch.norm
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    weight = branch.conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = norm.bias.double() - norm.running_mean.double() * scale
    return weight, bias


def fuse_repvgg_block(block: RepVggBlock) -> FusedRepVggBlock:
    """The eval-mode function of `block` (3x3 and 1x1 conv-norm branches summed, then the activation)
    as one 3x3 convolution.

    Raises:
        ValueError: a branch that is not a plain stride-1, ungrouped, undilated conv + batch norm with
            its activation off (the block as `RepVggBlock` builds it).
    """
    for branch, kernel in ((block.conv1, 3), (block.conv2, 1)):
        conv = branch.conv
        if (
            not isinstance(branch.norm, nn.BatchNorm2d)
            or not isinstance(branch.act, nn.Identity)
            or conv.bias is not None
            or conv.kernel_size != (kernel, kernel)
            or conv.stride != (1, 1)
            or conv.padding != ((kernel - 1) // 2,) * 2
            or conv.dilation != (1, 1)
            or conv.groups != 1
            or branch.norm.running_var is None
        ):
            raise ValueError(f"cannot fuse a RepVGG branch with conv {conv} and norm {branch.norm}")
    weight3, bias3 = folded_kernel(block.conv1)
    weight1, bias1 = folded_kernel(block.conv2)
    reference = block.conv1.conv
    conv = nn.Conv2d(
        reference.in_channels, reference.out_channels, 3, 1, padding=1, bias=True,
        device=reference.weight.device, dtype=reference.weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight3 + F.pad(weight1, (1, 1, 1, 1)))
        conv.bias.copy_(bias3 + bias1)
    return FusedRepVggBlock(conv, block.act)


def fuse_repvgg_blocks(model: nn.Module) -> int:
    """Replace every `RepVggBlock` in `model` by its `fuse_repvgg_block` (in place; for an eval-mode
    copy that is only run, never trained). Returns the number of blocks replaced."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, RepVggBlock)
    ]
    for parent, name, child in targets:
        setattr(parent, name, fuse_repvgg_block(child))
    return len(targets)
