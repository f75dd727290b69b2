"""Backbones: images + padding mask -> feature levels with their strides and channels.

`Backbone` (base.py) is the contract; `resnet.py` holds torchvision's ResNets, `resnet_vd.py` RT-DETR's
ResNet-vd, `timm_features.py`
hierarchical timm models (ConvNeXt, Swin, ...), `vit.py` a plain timm ViT with ViTDet's simple
feature pyramid, `hgnetv2.py` D-FINE's HGNetv2 (timm's network; `hgnetv2_keys.py` its variants and the
official key mapping). `detr_lab.models.build.BACKBONES` maps `model.backbone.type` to them.
May import torch, torchvision, timm and safe weight loading only (no config: `build.py` passes
plain arguments); the rest of `detr_lab.models` imports it.
"""

from detr_lab.models.backbones.base import Backbone, FeatureLevel, downsample_mask, pad_to_multiple
from detr_lab.models.backbones.hgnetv2 import HGNetv2Backbone
from detr_lab.models.backbones.resnet import FrozenBatchNorm2d, ResNetBackbone
from detr_lab.models.backbones.resnet_vd import ResNetVdBackbone
from detr_lab.models.backbones.timm_features import TimmBackbone
from detr_lab.models.backbones.vit import ViTBackbone

__all__ = [
    "Backbone",
    "FeatureLevel",
    "FrozenBatchNorm2d",
    "HGNetv2Backbone",
    "ResNetBackbone",
    "ResNetVdBackbone",
    "TimmBackbone",
    "ViTBackbone",
    "downsample_mask",
    "pad_to_multiple",
]
