"""2-D position encodings of a feature map, computed from its padding mask.

Both encodings return `[B, d, H, W]` with `d = 2 * num_pos_feats`: the first half encodes the row
(y) for the sine encoding, the column (x) for the learned one, matching the reference models so
their weights and outputs carry over.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sine_embedding(values: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """The sine embedding every encoding of positions and boxes shares (DETR, Deformable DETR, DINO).

    Each value is divided by `temperature ** (2 * (i // 2) / num_feats)` for i < num_feats; even
    channels take the sine, odd channels the cosine, interleaved.

    Args:
        values: `[..., K]` already scaled (e.g. normalized positions times 2 pi), float32.
        num_feats: F, features per value (even).
        temperature: base of the geometric frequency progression.
    Returns:
        `[..., K, F]`.
    """
    exponent = 2 * torch.div(
        torch.arange(num_feats, dtype=torch.float32, device=values.device), 2, rounding_mode="floor"
    )
    frequencies = temperature ** (exponent / num_feats)  # (F,) pairs share a frequency
    angles = values[..., None] / frequencies
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class SinePositionEncoding(nn.Module):
    """Fixed sine/cosine encoding of the (optionally normalized) pixel position inside the image.

    Positions count only unpadded pixels (cumulative sums of the valid mask), so padding does not
    shift the encoding of the image itself.

    Args:
        num_pos_feats: features per axis; the output has `2 * num_pos_feats` channels.
        temperature: base of the geometric frequency progression.
        normalize: divide positions by the image's valid extent and multiply by `scale`.
        scale: the normalized range (2 pi in DETR).
        offset: added to the 1-based position before normalizing; DETR uses 0, Deformable DETR -0.5
            (pixel centres).
        eps: keeps the normalization finite for fully padded rows/columns.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        *,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def forward(self, padding_mask: Tensor) -> Tensor:
        """bool `[B, H, W]` (True = padding) -> float32 `[B, 2 * num_pos_feats, H, W]` (y, then x half)."""
        valid = ~padding_mask
        y = valid.cumsum(1, dtype=torch.float32)  # (B, H, W) 1-based row index among valid pixels
        x = valid.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        embedded = sine_embedding(torch.stack((y, x), dim=-1), self.num_pos_feats, self.temperature)
        return embedded.flatten(-2).permute(0, 3, 1, 2)  # (B, H, W, 2, F) -> (B, 2F, H, W): y, then x


class LearnedPositionEncoding(nn.Module):
    """Learned absolute encoding: one embedding per column (first half) and per row (second half).

    Args:
        num_pos_feats: features per axis; the output has `2 * num_pos_feats` channels.
        max_size: the largest feature-map height/width supported (50 in DETR).
    """

    def __init__(self, num_pos_feats: int = 128, *, max_size: int = 50) -> None:
        super().__init__()
        self.max_size = max_size
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, padding_mask: Tensor) -> Tensor:
        """bool `[B, H, W]` (only its shape is used) -> `[B, 2 * num_pos_feats, H, W]` (x, then y half)."""
        batch, height, width = padding_mask.shape
        if height > self.max_size or width > self.max_size:
            raise ValueError(
                f"learned position encoding supports feature maps up to {self.max_size}x{self.max_size}, "
                f"got {height}x{width}"
            )
        device = self.row_embed.weight.device
        cols = self.col_embed(torch.arange(width, device=device))  # (W, F)
        rows = self.row_embed(torch.arange(height, device=device))  # (H, F)
        pos = torch.cat(
            (cols[None, :, :].expand(height, -1, -1), rows[:, None, :].expand(-1, width, -1)), dim=-1
        )  # (H, W, 2F)
        return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1)
