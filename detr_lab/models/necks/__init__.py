"""Necks: the slot between the backbone and the encoder, and the registry everything else reads.

A neck turns the backbone's levels into the encoder's input levels, all of width d:

    neck(levels: list[FeatureLevel], padding_mask: bool [B, H, W]) -> (features, masks)

features: one float `[B, d, H_l, W_l]` per encoder level, shallowest first; masks: one bool
`[B, H_l, W_l]` per level (True = padding). Each neck is one module in this package plus one line
in `NECKS` naming its builder as "module:function"; the builder takes keyword arguments
`in_channels` (the backbone's channels per level), `strides` (their strides), `hidden_dim` (d),
`num_levels` (encoder levels), `level_strides` (the strides those levels should have),
`group_norm` (Deformable DETR's multi-scale input side) and the neck's own options
(`model.neck.options`), and ignores those it does not use.

- "projection" (`projection.InputProjections`): 1x1 convolutions (DETR), or Conv + GroupNorm and
  stride-2 3x3 convolutions for the levels past the deepest backbone stage (Deformable DETR).
- "simple_pyramid" (`simple_pyramid.SimplePyramidNeck`): ViTDet's simple feature pyramid over a plain
  ViT's single map, then the projections (option `channels`, 256).
- "hybrid_encoder" (`hybrid_encoder.HybridEncoder`): RT-DETR's AIFI + CCFM over the backbone levels
  (options: `expansion`, `depth_mult`, `num_encoder_layers`, `ffn_dim`, `num_heads`, ...).
- "dfine_hybrid_encoder" (`dfine_encoder.DFineHybridEncoder`): D-FINE's variant of it (RepNCSPELAN4
  fusion blocks, SCDown downsampling, linear lateral convs); the same options.

This module is pure data (no torch import), read by `detr_lab.config`.
"""

from __future__ import annotations

NECKS: dict[str, str] = {
    "projection": "detr_lab.models.necks.projection:build",
    "simple_pyramid": "detr_lab.models.necks.simple_pyramid:build",
    "hybrid_encoder": "detr_lab.models.necks.hybrid_encoder:HybridEncoder",
    "dfine_hybrid_encoder": "detr_lab.models.necks.dfine_encoder:DFineHybridEncoder",
}
