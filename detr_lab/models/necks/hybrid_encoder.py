"""RT-DETR's hybrid encoder as a neck (Lv et al. 2023, "DETRs Beat YOLOs on Real-time Object
Detection", Sec. 4.2), as the official `HybridEncoder` computes it (lyuwenyu/RT-DETR,
rtdetrv2_pytorch/src/zoo/rtdetr/hybrid_encoder.py):

1. every backbone level is projected to width d by a 1x1 convolution and batch norm;
2. AIFI: transformer encoder layers (post-norm self-attention and feed-forward) on the deepest level
   only (`encoder_levels`), with a fixed 2-D sin-cos position embedding of its grid;
3. CCFM: a top-down pass (1x1 lateral conv, nearest 2x upsampling, concatenation with the next
   shallower level, a CSP block of RepVGG blocks) and a bottom-up pass (3x3 stride-2 conv,
   concatenation, a CSP block), giving one level of width d per input level.

`depth_mult` scales the RepVGG blocks per CSP block (3 x depth_mult), `expansion` the CSP blocks'
inner width (d x expansion), as the official configs' width and depth multipliers. Module names follow
the official checkpoints (`input_proj.0.conv`, `encoder.0.layers.0.self_attn`, `fpn_blocks.0.conv1`,
...), so their `encoder.*` weights load without renaming.

A neck of `detr_lab.models.necks`: backbone levels -> (features `[B, d, H_l, W_l]`, masks
`[B, H_l, W_l]`, True = padding). RT-DETR feeds fixed-size unpadded images; padded keys are kept out
of the AIFI self-attention, and the masks are the backbone levels' own.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_lab.models.backbones.base import FeatureLevel
from detr_lab.models.dropout import Dropout

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


def activation(name: str | None) -> nn.Module:
    """The activation called `name` ("silu", "relu", "gelu"), or identity for None.

    Raises:
        ValueError: an unknown name.
    """
    if name is None:
        return nn.Identity()
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class ConvNormAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> activation, 'same' padding: `[B, C_in, H, W]` ->
    `[B, C_out, ceil(H/s), ceil(W/s)]` for stride s (odd kernels); `groups` as `nn.Conv2d`'s."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, act: str | None, groups: int = 1
    ) -> None:
        super().__init__()
        padding = (kernel - 1) // 2
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=padding, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(c_out)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class RepVggBlock(nn.Module):
    """A 3x3 and a 1x1 conv-norm branch summed, then the activation (training-time RepVGG form)."""

    def __init__(self, channels: int, act: str) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels, 3, 1, None)
        self.conv2 = ConvNormAct(channels, channels, 1, 1, None)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv1(x) + self.conv2(x))


class CSPRepBlock(nn.Module):
    """Cross-stage partial block: two 1x1 branches of width `hidden`, RepVGG blocks on the first,
    summed, then a 1x1 conv to `c_out` when `hidden != c_out`."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, expansion: float, act: str) -> None:
        super().__init__()
        hidden = int(c_out * expansion)
        self.conv1 = ConvNormAct(c_in, hidden, 1, 1, act)
        self.conv2 = ConvNormAct(c_in, hidden, 1, 1, act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, act) for _ in range(num_blocks)])
        self.conv3 = ConvNormAct(hidden, c_out, 1, 1, act) if hidden != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class AIFILayer(nn.Module):
    """Post-norm transformer encoder layer: `norm1(x + attn(x + pos, x + pos, x))`, then
    `norm2(x + linear2(act(linear1(x))))`; tokens `[B, S, d]`."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, act: str) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = activation(act)

    def forward(self, x: Tensor, pos: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        q = k = x + pos
        attended = self.self_attn(q, k, value=x, key_padding_mask=key_padding_mask, need_weights=False)[0]
        x = self.norm1(x + self.dropout1(attended))
        x = self.norm2(x + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x))))))
        return x


class AIFI(nn.Module):
    """`num_layers` `AIFILayer`s (attribute `layers`, as the official `TransformerEncoder`)."""

    def __init__(self, layer: AIFILayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, x: Tensor, pos: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, pos, key_padding_mask)
        return x


def sincos_position_embedding(height: int, width: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """RT-DETR's 2-D sin-cos embedding of a `height` x `width` grid: `[1, H * W, dim]`, tokens in
    row-major order, channels (sin x, cos x, sin y, cos y), each dim / 4 frequencies
    `temperature ** -(i / (dim / 4))`.

    Raises:
        ValueError: `dim` not divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (dim/4,)
    # The official grid is meshgrid(x, y) with 'ij' indexing, flattened: x outer, y inner. The sizes go
    # to arange as they come: traced (ONNX export) they stay the input's, so a dynamic-size graph
    # computes the embedding of each input's grid.
    xs, ys = torch.meshgrid(
        torch.arange(width, dtype=torch.float32),
        torch.arange(height, dtype=torch.float32),
        indexing="ij",
    )
    out_x = xs.flatten()[:, None] @ omega[None]
    out_y = ys.flatten()[:, None] @ omega[None]
    return torch.cat((out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()), dim=1)[None]


class HybridEncoder(nn.Module):
    """Input projections, AIFI on `encoder_levels`, CCFM top-down and bottom-up fusion.

    Args:
        in_channels: channels of each backbone level, shallowest first (strides 8, 16, 32).
        hidden_dim: d. num_heads, ffn_dim, dropout, enc_act: the AIFI layers'. num_encoder_layers: per
            encoded level. encoder_levels: which levels AIFI encodes (the deepest: [2]).
        expansion, depth_mult: the CSP blocks' width and depth multipliers. act: the CCFM activation.
        temperature: of the sin-cos position embedding.
        output_proj: also project every output level by a 1x1 convolution and batch norm (RT-DETR's
            decoder `input_proj`, which detr_lab counts to the neck: `output_proj.<level>.conv/norm`).
        width: the encoder's own width when it differs from the model width d (RT-DETR-R101: 384);
            needs `output_proj`, which maps it to d. None: d.
        The neck contract's other builder arguments (`strides`, `num_levels`, ...) are ignored: the
        class is its own builder in `NECKS`, and its keyword options are `model.neck.options`.

    Attributes: `input_proj`, `encoder`, `lateral_convs`, `fpn_blocks`, `downsample_convs`,
    `pan_blocks` (the official names), and `output_proj` (None without it). The fusion parts come from
    `lateral_conv`, `fusion_block` and `downsample_conv` (w: the encoder width), which a variant
    overrides (D-FINE's: `dfine_encoder.DFineHybridEncoder`).

    A deeper map is upsampled to the size of the next shallower one (the official 2x upsampling when
    the input size is a multiple of the deepest stride; other sizes, which the official module
    cannot take, get nearest-neighbour resizing to the shallower map's size).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        hidden_dim: int = 256,
        *,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        enc_act: str = "gelu",
        num_encoder_layers: int = 1,
        encoder_levels: Sequence[int] = (2,),
        expansion: float = 1.0,
        depth_mult: float = 1.0,
        act: str = "silu",
        temperature: float = 10000.0,
        output_proj: bool = False,
        width: int | None = None,
        **_: object,
    ) -> None:
        super().__init__()
        levels = len(in_channels)
        if width is not None and width != hidden_dim and not output_proj:
            raise ValueError(f"a hybrid encoder of width {width} needs output_proj (to width {hidden_dim})")
        if any(not 0 <= i < levels for i in encoder_levels):
            raise ValueError(f"encoder_levels {list(encoder_levels)} must index the {levels} input levels")
        self.hidden_dim = hidden_dim
        self.width = width = hidden_dim if width is None else width
        self.encoder_levels = [int(i) for i in encoder_levels]
        self.temperature = temperature
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                OrderedDict(
                    [("conv", nn.Conv2d(c, width, 1, bias=False)), ("norm", nn.BatchNorm2d(width))]
                )
            )
            for c in in_channels
        )
        layer = AIFILayer(width, num_heads, ffn_dim, dropout, enc_act)
        self.encoder = nn.ModuleList(AIFI(layer, num_encoder_layers) for _ in self.encoder_levels)
        steps = range(levels - 1)
        self.lateral_convs = nn.ModuleList(self.lateral_conv(act) for _ in steps)
        self.fpn_blocks = nn.ModuleList(self.fusion_block(expansion, depth_mult, act) for _ in steps)
        self.downsample_convs = nn.ModuleList(self.downsample_conv(act) for _ in steps)
        self.pan_blocks = nn.ModuleList(self.fusion_block(expansion, depth_mult, act) for _ in steps)
        self.output_proj = None
        if output_proj:
            projections = (ConvNormAct(width, hidden_dim, 1, 1, None) for _ in in_channels)
            self.output_proj = nn.ModuleList(projections)
            for proj in self.output_proj:
                nn.init.xavier_uniform_(proj.conv.weight)

    # The CCFM parts, one call per fusion step (a variant overrides them: D-FINE's encoder).
    def lateral_conv(self, act: str) -> nn.Module:
        """The 1x1 conv-norm-act on a deeper map before it is upsampled: `[B, w, H, W]` -> same."""
        return ConvNormAct(self.width, self.width, 1, 1, act)

    def fusion_block(self, expansion: float, depth_mult: float, act: str) -> nn.Module:
        """A CSP block of round(3 x depth_mult) RepVGG blocks: `[B, 2w, H, W]` -> `[B, w, H, W]`."""
        return CSPRepBlock(2 * self.width, self.width, round(3 * depth_mult), expansion, act)

    def downsample_conv(self, act: str) -> nn.Module:
        """The 3x3 stride-2 conv-norm-act of the bottom-up pass: `[B, w, H, W]` -> `[B, w, ceil(H/2),
        ceil(W/2)]`."""
        return ConvNormAct(self.width, self.width, 3, 2, act)

    @property
    def num_levels(self) -> int:
        return len(self.input_proj)

    def fuse(self, maps: Sequence[Tensor], masks: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Backbone maps `[B, C_l, H_l, W_l]` (shallowest first) -> fused maps `[B, d, H_l, W_l]`; `masks`
        (bool `[B, H_l, W_l]`, True = padding) keep padded keys out of AIFI."""
        projected = [proj(x) for proj, x in zip(self.input_proj, maps, strict=True)]
        for encoder, level in zip(self.encoder, self.encoder_levels, strict=True):
            x = projected[level]
            height, width = x.shape[-2:]
            tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, d)
            pos = sincos_position_embedding(height, width, self.width, self.temperature).to(tokens)
            padding = None if masks is None else masks[level].flatten(1)
            tokens = encoder(tokens, pos, padding)
            projected[level] = tokens.transpose(1, 2).reshape(-1, self.width, height, width).contiguous()
        # Top-down: from the deepest level, each lateral-convolved map is upsampled into the next.
        inner = [projected[-1]]
        for step, level in enumerate(range(len(projected) - 1, 0, -1)):
            deeper = self.lateral_convs[step](inner[0])
            inner[0] = deeper
            upsampled = F.interpolate(deeper, size=projected[level - 1].shape[-2:], mode="nearest")
            inner.insert(0, self.fpn_blocks[step](torch.cat((upsampled, projected[level - 1]), dim=1)))
        # Bottom-up: each output is downsampled into the next deeper level.
        outputs = [inner[0]]
        for step in range(len(projected) - 1):
            downsampled = self.downsample_convs[step](outputs[-1])
            outputs.append(self.pan_blocks[step](torch.cat((downsampled, inner[step + 1]), dim=1)))
        if self.output_proj is not None:
            outputs = [proj(x) for proj, x in zip(self.output_proj, outputs, strict=True)]
        return outputs

    def forward(
        self, levels: Sequence[FeatureLevel], padding_mask: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The neck contract: backbone levels -> (fused features `[B, d, H_l, W_l]`, their masks)."""
        masks = [level.mask for level in levels]
        return self.fuse([level.features for level in levels], masks), masks

