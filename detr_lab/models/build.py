"""Config -> modules. The only place that reads the model configuration.

    model = build_model(cfg.model)
    criterion = build_criterion(cfg.model, cfg.loss)
    postprocess = build_postprocess(cfg.model)

Attention variants are chosen by `cfg.encoder.attention` and `cfg.decoder.cross_attention` and built
from the spec table `detr_lab.models.attention.ATTENTION_SPECS`, whose properties (reference points,
multi-scale inputs, final decoder norm) also pick the input side, the decoder and the detector head;
a new variant is a new file in `models/attention/` plus one line in that table. Backbones are chosen
by `cfg.backbone.type` in `BACKBONES`; a new kind is a module under `models/backbones/`, one builder
function and one registry line here (and its name among the choices of `BackboneConfig.type`).
"""

from __future__ import annotations

from torch import nn

from detr_lab.config import BackboneConfig, LossConfig, ModelConfig
from detr_lab.models.attention import (
    attention_spec,
    build_attention,
    needs_multiscale_inputs,
    refinement_error,
)
from detr_lab.models.attention.plain import PlainAttention
from detr_lab.models.backbones import Backbone, ResNetBackbone, TimmBackbone, ViTBackbone
from detr_lab.models.criterion import SetCriterion
from detr_lab.models.detector import DeformableDetector, Detector, group_norm_projection
from detr_lab.models.dino import AnchorDetector
from detr_lab.models.dn_criterion import DenoisingCriterion
from detr_lab.models.matcher import HungarianMatcher
from detr_lab.models.position import LearnedPositionEncoding, SinePositionEncoding
from detr_lab.models.postprocess import PostProcess
from detr_lab.models.queries.denoising import ContrastiveDenoising
from detr_lab.models.transformer import Decoder, DecoderLayer, Encoder, EncoderLayer, Transformer


def multiscale_inputs(cfg: ModelConfig) -> bool:
    """Deformable DETR's input side (GroupNorm projections, level embeddings, half-pixel sine offset).

    Used by every model whose attention spec asks for it (deformable attention) or with several
    feature levels; DETR (and ACT on DETR) keep the plain 1x1 projection of a single level.
    """
    return needs_multiscale_inputs(cfg.encoder.attention, cfg.decoder.cross_attention, cfg.num_feature_levels)


def reference_point_head(cfg: ModelConfig) -> bool:
    """Whether the decoder cross-attention samples around reference points (the Deformable DETR head)."""
    return attention_spec(cfg.decoder.cross_attention, "decoder").reference_points


# Strides of the feature levels a detector with 1..4 levels reads: DETR C5; Deformable DETR C3-C5 and
# a stride-64 level. A backbone returns the levels it has natively; build_input_proj adds the
# deeper ones it lacks as strided convolutions of the deepest level (Deformable DETR's extra level).
LEVEL_STRIDES = {1: (32,), 2: (16, 32), 3: (8, 16, 32), 4: (8, 16, 32, 64)}


def backbone_stages(num_levels: int) -> tuple[int, ...]:
    """ResNet stages feeding `num_levels` levels: C5; C4-C5; C3-C5; C3-C5 plus an extra strided level;
    C2-C5 plus one (5 levels, DINO 5-scale)."""
    if num_levels >= 5:
        return (1, 2, 3, 4)
    return ((4,), (3, 4))[num_levels - 1] if num_levels < 3 else (2, 3, 4)


def _resnet(b: BackboneConfig, num_levels: int) -> Backbone:
    """torchvision ResNet: stages `backbone_stages(num_levels)` (a DC5 last stage has stride 16)."""
    return ResNetBackbone(
        b.name,
        stages=backbone_stages(num_levels),
        dilation=bool(b.dilation),
        frozen_stages=1 if b.frozen_stages is None else b.frozen_stages,
        pretrained=b.pretrained,
        weights_path=b.weights_path,
        norm=b.norm or "frozen_bn",
    )


def _timm(b: BackboneConfig, num_levels: int) -> Backbone:
    """Hierarchical timm model: its stages at strides 8/16/32 (those of `LEVEL_STRIDES`)."""
    strides = [s for s in LEVEL_STRIDES[num_levels] if s <= 32]
    return TimmBackbone(
        b.name,
        strides=strides,
        pretrained=b.pretrained,
        weights_path=b.weights_path,
        model_kwargs=b.timm_kwargs,
    )


def _vit(b: BackboneConfig, num_levels: int) -> Backbone:
    """Plain ViT + simple feature pyramid: every level of `LEVEL_STRIDES` (8/16/32/64 for patch 16)."""
    return ViTBackbone(
        b.name,
        strides=LEVEL_STRIDES[num_levels],
        pyramid_channels=b.pyramid_channels or 256,
        pretrained=b.pretrained,
        weights_path=b.weights_path,
        model_kwargs=b.timm_kwargs,
    )


# model.backbone.type -> builder(backbone config, number of detector levels).
BACKBONES = {"resnet": _resnet, "timm": _timm, "vit": _vit}


def build_backbone(cfg: ModelConfig) -> Backbone:
    """The backbone of `cfg.backbone.type` with the levels of `cfg.num_feature_levels`.

    Raises:
        ValueError: a backbone type without a builder, or the backbone's own argument errors.
    """
    b = cfg.backbone
    if b.type not in BACKBONES:
        raise ValueError(f"unknown 'model.backbone.type: {b.type}'; expected one of: {', '.join(BACKBONES)}")
    return BACKBONES[b.type](b, cfg.num_feature_levels)


def build_input_proj(cfg: ModelConfig, backbone: Backbone) -> list[nn.Module]:
    """One projection to `hidden_dim` per level: 1x1 convolutions (DETR), or Conv + GroupNorm(32) and
    stride-2 3x3 Conv + GroupNorm(32) for each level past the deepest backbone stage (Deformable DETR)."""
    d = cfg.hidden_dim
    if not multiscale_inputs(cfg):
        return [nn.Conv2d(channels, d, kernel_size=1) for channels in backbone.num_channels]
    projections: list[nn.Module] = [group_norm_projection(c, d) for c in backbone.num_channels]
    in_channels = backbone.num_channels[-1]
    for _ in range(cfg.num_feature_levels - len(backbone.num_channels)):
        projections.append(group_norm_projection(in_channels, d, kernel_size=3, stride=2))
        in_channels = d
    return projections


def build_position_encoding(cfg: ModelConfig) -> nn.Module:
    """Sine (Deformable DETR's half-pixel offset for multi-scale inputs; none for anchor-box models,
    as DINO; temperature `cfg.position_temperature`) or learned."""
    if cfg.hidden_dim % 2:
        raise ValueError(f"model.hidden_dim ({cfg.hidden_dim}) must be even for a 2-D position encoding")
    if cfg.position_encoding == "learned":
        return LearnedPositionEncoding(cfg.hidden_dim // 2)
    offset = -0.5 if multiscale_inputs(cfg) and not cfg.anchor_boxes else 0.0
    return SinePositionEncoding(cfg.hidden_dim // 2, temperature=cfg.position_temperature, offset=offset)


def build_transformer(cfg: ModelConfig) -> Transformer:
    """Post-norm encoder/decoder with the configured attention modules.

    The decoder applies a final LayerNorm to every layer's output when its cross-attention's spec
    says so (DETR) or for anchor-box (DINO) decoders, none otherwise (Deformable DETR). Multi-scale
    inputs add a learned level embedding.
    """
    d, ffn, dropout = cfg.hidden_dim, cfg.ffn_dim, cfg.dropout
    encoder_layers = [
        EncoderLayer(
            self_attn=build_attention(cfg.encoder.attention, cfg, site="encoder"),
            embed_dim=d,
            ffn_dim=ffn,
            dropout=dropout,
        )
        for _ in range(cfg.encoder.num_layers)
    ]
    decoder_layers = [
        DecoderLayer(
            self_attn=PlainAttention(d, cfg.num_heads, dropout=dropout),
            cross_attn=build_attention(cfg.decoder.cross_attention, cfg, site="decoder"),
            embed_dim=d,
            ffn_dim=ffn,
            dropout=dropout,
        )
        for _ in range(cfg.decoder.num_layers)
    ]
    cross_spec = attention_spec(cfg.decoder.cross_attention, "decoder")
    final_norm = nn.LayerNorm(d) if cross_spec.final_decoder_norm or cfg.anchor_boxes else None
    num_levels = cfg.num_feature_levels if multiscale_inputs(cfg) else None
    return Transformer(
        Encoder(encoder_layers), Decoder(decoder_layers, final_norm), embed_dim=d, num_levels=num_levels
    )


def check_supported(cfg: ModelConfig) -> None:
    """Options only some heads have (the config validator checks the same)."""
    refine = cfg.box_refine and not cfg.anchor_boxes  # anchor-box decoders refine with any attention
    if (refine or cfg.two_stage) and not reference_point_head(cfg):
        raise ValueError(refinement_error() + " (box_refine also works with 'model.anchor_boxes')")
    if cfg.anchor_boxes and cfg.classification != "sigmoid":
        raise ValueError("'model.anchor_boxes' needs 'model.classification: sigmoid' (focal loss)")


def build_denoising(cfg: ModelConfig) -> ContrastiveDenoising | None:
    dn = cfg.denoising
    if not dn.enabled:
        return None
    return ContrastiveDenoising(
        cfg.hidden_dim,
        cfg.num_classes,
        dn_number=dn.dn_number,
        label_noise_ratio=dn.label_noise_ratio,
        box_noise_scale=dn.box_noise_scale,
    )


def build_model(cfg: ModelConfig) -> Detector | DeformableDetector | AnchorDetector:
    """The detector described by `cfg` (randomly initialised apart from optional ImageNet weights).

    `anchor_boxes` gives an `AnchorDetector` (DAB/DINO: 4-D anchor queries with the DINO switches);
    else a decoder cross-attention with reference points (its spec's `reference_points`, e.g.
    deformable) gives a `DeformableDetector` (boxes relative to the reference points, optional box
    refinement and two-stage); otherwise a DETR `Detector`.
    """
    check_supported(cfg)
    transformer = build_transformer(cfg)
    backbone = build_backbone(cfg)
    common = dict(
        backbone=backbone,
        position_encoding=build_position_encoding(cfg),
        transformer=transformer,
        input_proj=build_input_proj(cfg, backbone),
        num_classes=cfg.num_classes,
        num_queries=cfg.num_queries,
        aux_loss=cfg.aux_loss,
        classification=cfg.classification,
    )
    if cfg.anchor_boxes:
        common.pop("classification")
        return AnchorDetector(
            **common,
            share_heads=cfg.share_heads,
            mixed_query_selection=cfg.mixed_query_selection,
            look_forward_twice=cfg.look_forward_twice,
            denoising=build_denoising(cfg),
        )
    if reference_point_head(cfg):
        return DeformableDetector(**common, box_refine=cfg.box_refine, two_stage=cfg.two_stage)
    return Detector(**common)


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
    """Set loss with its matcher; weights and costs come from `loss_cfg` only.

    Anchor-box models get the `DenoisingCriterion` (proposals scored with their real classes,
    denoising terms when `model.denoising.enabled`).
    """
    if model_cfg.anchor_boxes:
        return DenoisingCriterion(
            model_cfg.num_classes,
            build_matcher(model_cfg, loss_cfg),
            class_weight=loss_cfg.class_weight,
            bbox_weight=loss_cfg.bbox_weight,
            giou_weight=loss_cfg.giou_weight,
            num_aux_layers=model_cfg.decoder.num_layers - 1 if model_cfg.aux_loss else 0,
            proposals=model_cfg.mixed_query_selection,
            denoising=model_cfg.denoising.enabled,
            focal_alpha=loss_cfg.focal_alpha,
            focal_gamma=loss_cfg.focal_gamma,
            terms=loss_cfg.terms,
        )
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
        terms=loss_cfg.terms,
    )


def build_postprocess(cfg: ModelConfig) -> PostProcess:
    return PostProcess(cfg.classification, num_top=cfg.num_detections)
