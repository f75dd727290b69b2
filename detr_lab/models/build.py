"""Config -> modules. The only place that reads the model configuration.

    model = build_model(cfg.model)
    criterion = build_criterion(cfg.model, cfg.loss)
    postprocess = build_postprocess(cfg.model)

Attention variants are chosen here by `cfg.encoder.attention` and `cfg.decoder.cross_attention`;
a new variant is one more branch in `build_attention`.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from detr_lab.config import LossConfig, ModelConfig
from detr_lab.models.attention.plain import PlainAttention
from detr_lab.models.backbone import ResNetBackbone
from detr_lab.models.criterion import SetCriterion
from detr_lab.models.detector import Detector
from detr_lab.models.matcher import HungarianMatcher
from detr_lab.models.position import LearnedPositionEncoding, SinePositionEncoding
from detr_lab.models.postprocess import PostProcess
from detr_lab.models.transformer import Decoder, DecoderLayer, Encoder, EncoderLayer, Transformer

CLUSTERING_MODULE = "detr_lab.models.attention.clustering"


def uses_deformable(cfg: ModelConfig) -> bool:
    return cfg.encoder.attention == "deformable" or cfg.decoder.cross_attention == "deformable"


def build_backbone(cfg: ModelConfig) -> ResNetBackbone:
    """ResNet returning the last stage (single level) or stages 2-4 (strides 8/16/32) for multi-scale."""
    b = cfg.backbone
    stages = (4,) if cfg.num_feature_levels == 1 else (2, 3, 4)
    return ResNetBackbone(
        b.name,
        stages=stages,
        dilation=b.dilation,
        frozen_stages=b.frozen_stages,
        pretrained=b.pretrained,
        weights_path=b.weights_path,
    )


def build_position_encoding(cfg: ModelConfig) -> nn.Module:
    """Sine (Deformable DETR's half-pixel offset when deformable attention is used) or learned."""
    if cfg.hidden_dim % 2:
        raise ValueError(f"model.hidden_dim ({cfg.hidden_dim}) must be even for a 2-D position encoding")
    if cfg.position_encoding == "learned":
        return LearnedPositionEncoding(cfg.hidden_dim // 2)
    return SinePositionEncoding(cfg.hidden_dim // 2, offset=-0.5 if uses_deformable(cfg) else 0.0)


def build_attention(kind: str, cfg: ModelConfig, *, key: str) -> nn.Module:
    """One attention module of the kind named by config entry `key` (for error messages)."""
    if kind == "plain":
        return PlainAttention(cfg.hidden_dim, cfg.num_heads, dropout=cfg.dropout)
    if kind == "act" and importlib.util.find_spec(CLUSTERING_MODULE) is not None:
        from detr_lab.models.attention.clustering import AdaptiveClusteringAttention

        act = cfg.encoder.act
        return AdaptiveClusteringAttention(
            cfg.hidden_dim,
            cfg.num_heads,
            dropout=cfg.dropout,
            q_hashes=act.q_hashes,
            bucket_width=act.bucket_width,
            seed=act.seed,
        )
    raise NotImplementedError(f"'{key}: {kind}' is not available in this detector yet")


def build_transformer(cfg: ModelConfig) -> Transformer:
    """Post-norm encoder/decoder; the decoder's final LayerNorm is applied to every layer's output."""
    d, ffn, dropout = cfg.hidden_dim, cfg.ffn_dim, cfg.dropout
    encoder_layers = [
        EncoderLayer(
            self_attn=build_attention(cfg.encoder.attention, cfg, key="model.encoder.attention"),
            embed_dim=d,
            ffn_dim=ffn,
            dropout=dropout,
        )
        for _ in range(cfg.encoder.num_layers)
    ]
    decoder_layers = [
        DecoderLayer(
            self_attn=PlainAttention(d, cfg.num_heads, dropout=dropout),
            cross_attn=build_attention(cfg.decoder.cross_attention, cfg, key="model.decoder.cross_attention"),
            embed_dim=d,
            ffn_dim=ffn,
            dropout=dropout,
        )
        for _ in range(cfg.decoder.num_layers)
    ]
    return Transformer(Encoder(encoder_layers), Decoder(decoder_layers, nn.LayerNorm(d)), embed_dim=d)


def check_supported(cfg: ModelConfig) -> None:
    unsupported = [
        ("model.num_feature_levels", cfg.num_feature_levels != 1, cfg.num_feature_levels),
        ("model.classification", cfg.classification != "softmax", cfg.classification),
        ("model.box_refine", cfg.box_refine, cfg.box_refine),
        ("model.two_stage", cfg.two_stage, cfg.two_stage),
    ]
    for key, bad, value in unsupported:
        if bad:
            raise NotImplementedError(
                f"'{key}: {value}' needs the Deformable DETR detector, not available yet"
            )


def build_model(cfg: ModelConfig) -> Detector:
    """The detector described by `cfg` (randomly initialised apart from optional ImageNet weights)."""
    check_supported(cfg)
    transformer = build_transformer(cfg)
    backbone = build_backbone(cfg)
    input_proj = [nn.Conv2d(channels, cfg.hidden_dim, kernel_size=1) for channels in backbone.num_channels]
    return Detector(
        backbone=backbone,
        position_encoding=build_position_encoding(cfg),
        transformer=transformer,
        input_proj=input_proj,
        num_classes=cfg.num_classes,
        num_queries=cfg.num_queries,
        aux_loss=cfg.aux_loss,
    )


def build_matcher(model_cfg: ModelConfig, loss_cfg: LossConfig) -> HungarianMatcher:
    return HungarianMatcher(
        loss_cfg.cost_class,
        loss_cfg.cost_bbox,
        loss_cfg.cost_giou,
        classification=model_cfg.classification,
        focal_alpha=loss_cfg.focal_alpha,
        focal_gamma=loss_cfg.focal_gamma,
    )


def build_criterion(model_cfg: ModelConfig, loss_cfg: LossConfig) -> SetCriterion:
    """Set loss with its matcher; weights and costs come from `loss_cfg` only."""
    return SetCriterion(
        model_cfg.num_classes,
        build_matcher(model_cfg, loss_cfg),
        class_weight=loss_cfg.class_weight,
        bbox_weight=loss_cfg.bbox_weight,
        giou_weight=loss_cfg.giou_weight,
        eos_coef=loss_cfg.eos_coef,
        num_aux_layers=model_cfg.decoder.num_layers - 1 if model_cfg.aux_loss else 0,
        two_stage=model_cfg.two_stage,
        classification=model_cfg.classification,
        focal_alpha=loss_cfg.focal_alpha,
        focal_gamma=loss_cfg.focal_gamma,
    )


def build_postprocess(cfg: ModelConfig) -> PostProcess:
    return PostProcess(cfg.classification)
