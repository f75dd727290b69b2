"""Inference-time rewrites of a built detector: same outputs (to float rounding), less work.

    model = optimize_for_inference(build_model(cfg.model).eval())

What `optimize_for_inference` does, in place:

- Folds every `FrozenBatchNorm2d` of the ResNet backbone into the convolution before it
  (`fold_frozen_batch_norms`). A frozen batch norm is a fixed per-channel affine map
  `x * scale + shift`; folded, the convolution computes `conv(x, W * scale) + (b * scale + shift)`
  and the two full passes over each feature map (multiply, add) disappear.
- Stores every 4-D weight (the convolutions) channels-last (`torch.channels_last`). A convolution
  with a channels-last weight returns a channels-last map, so the whole backbone then runs in
  oneDNN's (CPU) / cuDNN's (GPU) preferred NHWC layout without reorders between layers, and the
  flattening of the projected features into tokens becomes a view instead of a copy.
- Switches plain attention to `scaled_dot_product_attention` and deformable attention to the
  device's fast sampling core ("auto"), in case a model was set to its reference paths.

The result is for inference only: the folded convolutions and the removed batch-norm buffers change
the state dict, so do not save or train an optimized model; optimize a copy if you need both.
"""

from __future__ import annotations

import torch
from torch import nn

from detr_lab.models.backbone import FrozenBatchNorm2d, ResNetBackbone


def fold_batch_norm_into_conv(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> None:
    """Make `conv` compute `norm(conv(x))` by itself (in place; `norm` is left untouched).

    The folding is done in float64 and cast back to the convolution's dtype.
    """
    if conv.out_channels != norm.weight.shape[0]:
        raise ValueError(
            f"cannot fold a batch norm over {norm.weight.shape[0]} channels into a convolution with "
            f"{conv.out_channels} output channels"
        )
    with torch.no_grad():
        scale = norm.weight.double() * (norm.running_var.double() + norm.eps).rsqrt()  # (C_out,)
        shift = norm.bias.double() - norm.running_mean.double() * scale
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        conv.weight.copy_(weight.to(conv.weight.dtype))
        new_bias = (bias * scale + shift).to(dtype=conv.weight.dtype, device=conv.weight.device)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(new_bias)


def _conv_norm_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """Names (conv, norm) of the children of `parent` where the norm directly follows the conv.

    torchvision's ResNet layout: inside a block (and the stem) `convN` is followed by `bnN`; a
    downsample branch is an `nn.Sequential(conv, norm)`.
    """
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        names = list(children)
        return [
            (a, b)
            for a, b in zip(names[:-1], names[1:], strict=True)
            if isinstance(children[a], nn.Conv2d) and isinstance(children[b], FrozenBatchNorm2d)
        ]
    pairs = []
    for name, child in children.items():
        if isinstance(child, FrozenBatchNorm2d) and name.startswith("bn"):
            conv_name = "conv" + name[2:]
            if isinstance(children.get(conv_name), nn.Conv2d):
                pairs.append((conv_name, name))
    return pairs


def fold_frozen_batch_norms(model: nn.Module) -> int:
    """Fold the frozen batch norms of every `ResNetBackbone` in `model` into their convolutions.

    Each folded norm is replaced by `nn.Identity`. Returns how many were folded (0 on a second call).
    """
    count = 0
    for backbone in [m for m in model.modules() if isinstance(m, ResNetBackbone)]:
        for parent in list(backbone.modules()):
            for conv_name, norm_name in _conv_norm_pairs(parent):
                fold_batch_norm_into_conv(getattr(parent, conv_name), getattr(parent, norm_name))
                setattr(parent, norm_name, nn.Identity())
                count += 1
    return count


def use_fast_attention(model: nn.Module) -> None:
    """Plain attention on SDPA, deformable attention on the device's fast core ("auto")."""
    from detr_lab.models.attention.deformable import set_deformable_core
    from detr_lab.models.attention.plain import set_plain_attention_impl

    set_plain_attention_impl(model, "sdpa")
    set_deformable_core(model, "auto")


def optimize_for_inference(model: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """Apply the inference rewrites listed in the module docstring to `model` (in place) and return it.

    The model is put in eval mode. Call it after moving the model to its device.
    Args:
        channels_last: store convolution weights channels-last (on by default).
    """
    model.eval()
    fold_frozen_batch_norms(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # converts the 4-D tensors: convolution weights
    use_fast_attention(model)
    return model
