"""A plain timm ViT as a backbone: one feature map at the patch stride (Li et al. 2022, "Exploring Plain
Vision Transformer Backbones for Object Detection"). ViTDet's simple feature pyramid, which builds the
other levels from that map, is a neck: `detr_lab.models.necks.simple_pyramid`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from detr_lab.models.backbones.base import Backbone, valid_extent
from detr_lab.models.backbones.timm_models import create_timm_model


class ViTBackbone(Backbone):
    """A timm `VisionTransformer` (any input size: `dynamic_img_size=True`): one level, the last block's
    tokens after the ViT's final norm as a map at the patch stride.

    Args:
        name: a plain timm ViT, e.g. "vit_tiny_patch16_224", "vit_base_patch16_224".
        size_multiple: images are zero-padded bottom/right to a multiple of this and of the patch size
            (the simple-pyramid neck needs its deepest stride, e.g. 64, so every level is exact).
        pretrained: timm's default weights (may download); weights_path: a local timm state dict of
            the ViT (never downloads). See `create_timm_model`.
        model_kwargs: further `timm.create_model` arguments (e.g. `drop_path_rate`, or small widths).

    Patches made only of padding are kept out of the attention as keys (timm's `attn_mask`), so what
    those pixels hold does not reach the other tokens, and every image's position embeddings are
    resampled to its own patch grid: an image's ViT tokens are the same alone or in any padded batch.

    Attributes:
        vit: the timm model (no classifier).
    Raises:
        ValueError: not a plain ViT, non-square patches, patch dropout, or a weights problem.
    """

    def __init__(
        self,
        name: str,
        *,
        size_multiple: int = 1,
        pretrained: bool = False,
        weights_path: str | os.PathLike | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        try:
            self.vit = create_timm_model(
                name,
                pretrained=pretrained,
                weights_path=weights_path,
                num_classes=0,
                dynamic_img_size=True,
                **(model_kwargs or {}),
            )
        except TypeError as err:
            if "dynamic_img_size" not in str(err):
                raise
            raise ValueError(f"'{name}' is not a plain timm VisionTransformer ({err})") from None
        if not isinstance(self.vit, VisionTransformer):
            raise ValueError(f"'{name}' is a {type(self.vit).__name__}, not a plain timm VisionTransformer")
        patch_h, patch_w = self.vit.patch_embed.patch_size
        if patch_h != patch_w:
            raise ValueError(f"'{name}' has non-square patches {patch_h}x{patch_w}")
        if not isinstance(self.vit.patch_drop, nn.Identity):
            raise ValueError(
                f"'{name}': patch dropout would drop tokens of the feature map; set patch_drop_rate 0"
            )
        last = self.vit.feature_info[-1]
        vit_stride, vit_channels = int(last["reduction"]), int(last["num_chs"])
        self.name = name
        self.patch_size = patch_h
        self.num_channels = [vit_channels]
        self.strides = [vit_stride]
        self.size_multiple = max(patch_h, int(size_multiple))

    def token_attention_mask(self, padding_mask: Tensor) -> Tensor:
        """Keys each token may attend to, for timm's `attn_mask`: bool `[B, 1, 1, N]` (True = allowed;
        the opposite polarity of `padding_mask`), N = prefix tokens + patches.

        A patch is a key unless all its pixels are padding; prefix tokens (class, registers) always are.
        `padding_mask`: bool `[B, H, W]`, True = padding, sides divisible by the patch size.
        """
        real = (~padding_mask)[:, None].float()  # (B, 1, H, W)
        patch_real = F.max_pool2d(real, self.patch_size).flatten(1) > 0  # (B, h * w)
        prefix = patch_real.new_ones(patch_real.shape[0], self.vit.num_prefix_tokens)
        return torch.cat([prefix, patch_real], dim=1)[:, None, None, :]  # (B, 1, 1, N)

    def patch_position_embeddings(self, grid: tuple[int, int], image_grids: list[tuple[int, int]]) -> Tensor:
        """Position embeddings of the patch tokens, each image's resampled to its own patch grid.

        The pretrained table is resampled (bicubic, as timm's `dynamic_img_size`) to every image's grid
        `image_grids[b]` (its real pixels' patches) and placed top-left in the batch grid `grid`
        (h, w); patches outside it (padding) get zeros. Returns `[B, h * w, C]`.
        """
        vit = self.vit
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens  # rows of the table for prefix tokens
        table = vit.pos_embed  # (1, prefix + G_h * G_w, C)
        embeddings = table.new_zeros(len(image_grids), *grid, table.shape[-1])  # (B, h, w, C)
        for size in set(image_grids):
            resampled = resample_abs_pos_embed(
                table, new_size=list(size), old_size=vit.patch_embed.grid_size, num_prefix_tokens=prefix
            )[:, prefix:]  # (1, h_b * w_b, C)
            rows = [b for b, image_grid in enumerate(image_grids) if image_grid == size]
            embeddings[rows, : size[0], : size[1]] = resampled.view(1, *size, -1)
        return embeddings.flatten(1, 2)

    def vit_map(self, images: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The ViT's last-block tokens after its final norm as a map `[B, C, H / patch, W / patch]`.

        timm's ViT forward (patch embedding, prefix tokens, blocks, final norm), except that every
        image's position embeddings are resampled to its own patch grid (`patch_position_embeddings`)
        rather than to the padded batch's, and that patches made only of padding are no attention keys
        (`token_attention_mask`): an image's real tokens are the same alone or in any padded batch.

        Args:
            images: float `[B, 3, H, W]`, sides divisible by the patch size.
            padding_mask: bool `[B, H, W]`, True = padding, bottom/right (None: none).
        """
        vit = self.vit
        patches = vit.patch_embed(images)  # (B, h, w, C)
        batch, h, w, channels = patches.shape
        if padding_mask is None:
            image_grids = [(h, w)] * batch
        else:
            real_w, real_h = valid_extent(padding_mask).unbind(-1)  # (B,) each; padding is bottom/right
            to_patches = lambda n: (-(-n // self.patch_size)).clamp(min=1).tolist()  # ceil
            image_grids = list(zip(to_patches(real_h), to_patches(real_w), strict=True))
        tokens = patches.view(batch, h * w, channels) + self.patch_position_embeddings((h, w), image_grids)
        prefix = [t.expand(batch, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if prefix:
            prefix_tokens = torch.cat(prefix, dim=1)  # (B, num_prefix_tokens, C)
            if not vit.no_embed_class:
                prefix_tokens = prefix_tokens + vit.pos_embed[:, : vit.num_prefix_tokens]
            tokens = torch.cat([prefix_tokens, tokens], dim=1)  # (B, N, C)
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))
        attn_mask = None if padding_mask is None else self.token_attention_mask(padding_mask)
        for block in vit.blocks:
            x = block(x, attn_mask=attn_mask)
        x = vit.norm(x)[:, vit.num_prefix_tokens :]  # (B, h * w, C)
        return x.transpose(1, 2).reshape(batch, channels, h, w)

    def feature_maps(self, images: Tensor, padding_mask: Tensor | None = None) -> list[Tensor]:
        """The ViT map `[B, C, H / patch, W / patch]`, as the one level.

        Args:
            images: float `[B, 3, H, W]`, sides divisible by `size_multiple`.
            padding_mask: bool `[B, H, W]`, True = padding (None: none).
        """
        return [self.vit_map(images, padding_mask)]
