"""Dropout whose mask is cheap to draw on the CPU.

On the CPU, `nn.Dropout` draws one Bernoulli sample per element, and that sampler is slow: on a
2-core Xeon it takes 126 ms for the `[14640, 1024]` hidden activation of one Deformable DETR encoder
layer at 2 x 512 x 683, three times the layer's first matrix product (44 ms), and dropout was half
of the feed-forward block's training time. `Dropout` here draws 64 random bits per four elements
instead (`Tensor.random_` on int64: 20 ms for the same size) and keeps an element when its 15-bit
share is at least `round(p * 2^15)`. Each element is kept independently with probability
`1 - round(p * 2^15) / 2^15` (p = 0.1: 0.899994 instead of 0.9) and scaled by the inverse of that
probability, so the expected output is the input, as with `nn.Dropout`. The draws come from torch's
default generator, so seeding reproduces the masks.

On other devices, and for `p` within 2^-16 of 0 or 1, it is `nn.Dropout` (CUDA's Philox sampler is
fast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SHARE_BITS = 15  # bits of randomness per element (an int16 share with its sign bit cleared)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """bool mask of `shape` (True = keep) and the probability with which each element is kept.

    Raises:
        ValueError: `p` outside (0, 1).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in (0, 1) for a mask, got {p}")
    count = shape.numel()
    threshold = round(p * 2**SHARE_BITS)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_()
    # random_ fills bits 0..62 (bit 63 is 0): each int16 share keeps its 15 low bits, all random
    shares = words.view(torch.int16)[:count].bitwise_and_(2**SHARE_BITS - 1)
    return (shares >= threshold).view(shape), 1.0 - threshold / 2**SHARE_BITS


class _MaskedScale(torch.autograd.Function):
    """`x * keep / kept`, and the same for the gradient.

    The mask is turned into `x`'s dtype once, holding `1 / kept` where kept and 0 elsewhere, and saved
    so: one product each way, where a bool mask costs a conversion and two products each way (DETR's
    `[2, 8, 352, 352]` attention weights, forward and backward, 2 threads: 3.6 against 7.5 ms), for
    four times a bool mask's memory. The values are the same: `x * (1 * s)` is `(x * 1) * s`.
    """

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        scaled = keep.to(x.dtype).mul_(scale)
        ctx.save_for_backward(scaled)
        return x * scaled

    @staticmethod
    def backward(ctx, grad: Tensor):
        (scaled,) = ctx.saved_tensors
        return grad * scaled, None, None


def dropout(x: Tensor, p: float, training: bool = True, inplace: bool = False) -> Tensor:
    """`F.dropout` with the cheaper CPU mask (module docstring); `F.dropout` itself off the CPU, for
    a non-float `x`, and for `p` within 2^-16 of 0 or 1. Input and output: any shape.

    Raises:
        ValueError: `p` outside [0, 1] (as `F.dropout`).
    """
    threshold = round(p * 2**SHARE_BITS)  # 0 or 2^15: p too close to 0 or 1 for 15 bits
    if not training or threshold in (0, 2**SHARE_BITS) or x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, training, inplace)
    keep, kept = keep_mask(x.shape, p, x.device)
    if inplace:
        return x.mul_(keep).mul_(1.0 / kept)
    return _MaskedScale.apply(x, keep, 1.0 / kept)


class Dropout(nn.Dropout):
    """`nn.Dropout` with a cheaper mask on the CPU (module docstring). Input and output: any shape."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training, self.inplace)
