"""Re-parameterisations for inference: the same function, fewer operators (used by the ONNX export
on its own copy and by `detr_lab.models.optimize.optimize_for_inference`).

    fused = fuse_repvgg_blocks(model)             # in place; returns how many blocks were fused
    folded = fold_learnable_affine_blocks(model)  # HGNetv2's scale-and-bias after each ReLU

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

Learnable affine blocks (HGNetv2's `lab`, PP-HGNetv2 / D-FINE: one scalar scale s and bias b after a
conv, batch norm and ReLU) fold into the batch norm and a clamp: `s * relu(z) + b` equals
`max(s * z + b, b)` for s >= 0 and `min(s * z + b, b)` for s < 0, so the norm's eval-mode affine map
takes s and b, and the ReLU, scale and bias become one clamp at b. An exported graph then runs
`Conv` (the norm folded in by onnxruntime) + `Clip`, which onnxruntime fuses into the convolution,
instead of `Conv`, `Relu`, `Mul` and `Add`: 60 elementwise passes fewer in D-FINE-N's backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_lab.models.backbones.resnet import FrozenBatchNorm2d
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


class AffineClamp(nn.Module):
    """`max(x, bound)` (`lower=True`) or `min(x, bound)`: the ReLU and learnable affine block of a
    folded unit (`fold_learnable_affine_blocks`). Any shape in, the same shape out."""

    def __init__(self, bound: float, lower: bool) -> None:
        super().__init__()
        self.bound = float(bound)
        self.lower = bool(lower)

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=self.bound) if self.lower else x.clamp(max=self.bound)

    def extra_repr(self) -> str:
        return f"{'min' if self.lower else 'max'}={self.bound}"


def _is_affine_block(module: nn.Module) -> bool:
    scale, bias = getattr(module, "scale", None), getattr(module, "bias", None)
    return (
        isinstance(scale, Tensor) and isinstance(bias, Tensor) and scale.numel() == 1 and bias.numel() == 1
        and not list(module.children())
    )


def fold_learnable_affine_blocks(model: nn.Module) -> int:
    """Fold every unit `conv -> bn -> ReLU -> lab` (children named so, as timm's HGNetv2 `ConvBNAct`
    with `use_lab`; `bn` an `nn.BatchNorm2d` with running statistics or a `FrozenBatchNorm2d`; `lab`
    any parameter-free-children module with a one-element `scale` and `bias`, computing
    `scale * x + bias`) into `conv -> bn' -> AffineClamp` (see the module docstring), in place. The
    norm then holds its eval-mode function times s plus b: only for models that are run, never
    trained. Returns the number of units folded (0 on a second call)."""
    count = 0
    for module in list(model.modules()):
        children = dict(module.named_children())
        norm, act, lab = children.get("bn"), children.get("act"), children.get("lab")
        if "conv" not in children or not isinstance(act, nn.ReLU) or lab is None or not _is_affine_block(lab):
            continue
        if not (isinstance(norm, FrozenBatchNorm2d) or (
            isinstance(norm, nn.BatchNorm2d) and norm.affine and norm.running_var is not None
        )):
            continue
        scale, bias = float(lab.scale.detach()), float(lab.bias.detach())
        with torch.no_grad():
            norm.weight.mul_(scale)
            norm.bias.mul_(scale).add_(bias)
        module.act = AffineClamp(bias, lower=scale >= 0)
        module.lab = nn.Identity()
        count += 1
    return count
