"""Config -> modules. The only place that reads the model configuration.

    model = build_model(cfg.model)
    criterion = build_criterion(cfg.model, cfg.loss)
    postprocess = build_postprocess(cfg.model)

Every part is chosen from a table and built from plain arguments: the backbone by
`cfg.backbone.type` (`BACKBONES` here), the neck by `cfg.neck.type` (`detr_lab.models.necks.NECKS`),
the attention variants by `cfg.encoder.attention` / `cfg.decoder.cross_attention`
(`detr_lab.models.attention.ATTENTION_SPECS`), the query source by `cfg.query_source`
(`detr_lab.models.queries.QUERY_SOURCES`), the loss terms by `loss.terms`
(`detr_lab.models.loss_terms.LOSS_TERMS`), the matching costs (`detr_lab.models.matcher.MATCHING_COSTS`)
and the classification strategy (`detr_lab.models.classification.CLASSIFICATIONS`). The specs'
properties, not names, decide how the parts fit together. `cfg` is read by attribute only (any object
shaped like `detr_lab.config.ModelConfig` / `LossConfig`).
"""

from __future__ import annotations

import copy
import inspect
from typing import TYPE_CHECKING, Any

from torch import nn

from detr_lab.errors import InputError
from detr_lab.models.attention import attention_spec, build_attention, needs_multiscale_inputs
from detr_lab.models.attention.plain import PlainAttention
from detr_lab.models.backbones import Backbone, ResNetBackbone, TimmBackbone, ViTBackbone
from detr_lab.models.backbones.hgnetv2 import HGNetv2Backbone
from detr_lab.models.backbones.resnet_vd import ResNetVdBackbone
from detr_lab.models.builders import import_builder
from detr_lab.models.classification import Classification, classification_strategy
from detr_lab.models.criterion import SetCriterion
from detr_lab.models.detector import MLP, Detector, prediction_heads
from detr_lab.models.distribution import DistributionRefinement
from detr_lab.models.groups import PredictionGroup, denoising_groups, main_groups
from detr_lab.models.loss_terms import LOSS_TERMS
from detr_lab.models.matcher import HungarianMatcher
from detr_lab.models.necks import NECKS
from detr_lab.models.position import LearnedPositionEncoding, SinePositionEncoding
from detr_lab.models.postprocess import PostProcess
from detr_lab.models.queries import QuerySourceSpec, query_source_spec, resolved_query_source
from detr_lab.models.queries.denoising import ContrastiveDenoising
from detr_lab.models.queries.embedding import POSITION_HEADS
from detr_lab.models.transformer import Decoder, DecoderLayer, Encoder, EncoderLayer, Transformer

if TYPE_CHECKING:
    from detr_lab.config import BackboneConfig, LossConfig, ModelConfig


def multiscale_inputs(cfg: ModelConfig) -> bool:
    """Deformable DETR's input side (GroupNorm projections, level embeddings, half-pixel sine offset).

    Used by every model whose attention spec asks for it (deformable attention) or with several
    feature levels; DETR (and ACT on DETR) keep the plain 1x1 projection of a single level.
    """
    return needs_multiscale_inputs(cfg.encoder.attention, cfg.decoder.cross_attention, cfg.num_feature_levels)


def query_spec(cfg: ModelConfig) -> tuple[str, QuerySourceSpec]:
    """The query source's name (`model.query_source`, or the decoder's natural one) and spec."""
    reference = attention_spec(cfg.decoder.cross_attention, "decoder").reference_points
    name = resolved_query_source(cfg.query_source, reference)
    return name, query_source_spec(name)


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
    """Plain ViT: its one map at the patch stride; images padded to the deepest level stride of
    `LEVEL_STRIDES` (the simple-pyramid neck builds those levels from the map)."""
    return ViTBackbone(
        b.name,
        size_multiple=max(LEVEL_STRIDES[min(num_levels, 4)]),
        pretrained=b.pretrained,
        weights_path=b.weights_path,
        model_kwargs=b.timm_kwargs,
    )


def _resnet_vd(b: BackboneConfig, num_levels: int) -> Backbone:
    """ResNet-vd (RT-DETR's PResNet): stages `backbone_stages(num_levels)`; trained batch norm and
    nothing frozen unless set."""
    return ResNetVdBackbone(
        int(b.name.removeprefix("resnet")),
        stages=backbone_stages(num_levels),
        frozen_stages=b.frozen_stages or 0,
        freeze_stem=bool(b.freeze_stem),
        norm=b.norm or "batch_norm",
        weights_path=b.weights_path,
    )


def _hgnetv2(b: BackboneConfig, num_levels: int) -> Backbone:
    """HGNetv2 (D-FINE): the stages of `backbone_stages(num_levels)` (stage s at stride 4 * 2**(s-1):
    2 levels -> strides 16, 32 as D-FINE-N; 3 -> 8, 16, 32); trained batch norm, nothing frozen and
    the variant's own `use_lab` unless set."""
    return HGNetv2Backbone(
        b.name,
        strides=[4 * 2 ** (s - 1) for s in backbone_stages(num_levels)],
        use_lab=b.use_lab,
        frozen_stages=b.frozen_stages or 0,
        freeze_stem=bool(b.freeze_stem),
        norm=b.norm or "batch_norm",
        weights_path=b.weights_path,
    )


# model.backbone.type -> builder(backbone config, number of detector levels).
BACKBONES = {"resnet": _resnet, "resnet_vd": _resnet_vd, "timm": _timm, "vit": _vit, "hgnetv2": _hgnetv2}


def build_backbone(cfg: ModelConfig) -> Backbone:
    """The backbone of `cfg.backbone.type` with the levels of `cfg.num_feature_levels`.

    Raises:
        ValueError: a backbone type without a builder, or the backbone's own argument errors.
    """
    b = cfg.backbone
    if b.type not in BACKBONES:
        raise ValueError(f"unknown 'model.backbone.type: {b.type}'; expected one of: {', '.join(BACKBONES)}")
    return BACKBONES[b.type](b, cfg.num_feature_levels)


def build_neck(cfg: ModelConfig, backbone: Backbone) -> nn.Module:
    """The neck of `cfg.neck.type` (`NECKS`) for `backbone`'s levels and `cfg.num_feature_levels`.

    Raises:
        ValueError: an unknown neck type, an option its builder does not take (named with the
            options it does take), or the neck's own argument errors.
    """
    neck = cfg.neck
    if neck.type not in NECKS:
        raise ValueError(f"unknown 'model.neck.type: {neck.type}'; expected one of: {', '.join(NECKS)}")
    builder = import_builder(NECKS[neck.type], f"neck {neck.type!r}")
    common = dict(
        in_channels=list(backbone.num_channels),
        strides=list(backbone.strides),
        hidden_dim=cfg.hidden_dim,
        num_levels=cfg.num_feature_levels,
        level_strides=list(LEVEL_STRIDES[min(cfg.num_feature_levels, 4)]),
        group_norm=multiscale_inputs(cfg),
    )
    # Builders ignore the common arguments they do not use (`**_`), so a misspelt option would be
    # ignored too: the options are the builder's own named parameters (or anything, when it collects
    # them in a `**options` of another name than `_`).
    parameters = inspect.signature(builder).parameters
    named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    own = [name for name, p in parameters.items() if p.kind in named and name not in common]
    takes_any = any(p.kind is p.VAR_KEYWORD and name != "_" for name, p in parameters.items())
    for key in neck.options:
        if key not in own and not takes_any:
            raise InputError(
                f"'model.neck.options.{key}' is not an option of the {neck.type!r} neck; "
                f"its options: {', '.join(own) or 'none'}"
            )
    try:
        return builder(**common, **dict(neck.options))
    except ValueError as err:  # the neck's own argument checks: name the config section
        raise InputError(f"'model.neck' ({neck.type} with options {dict(neck.options)}): {err}") from err


def memory_positions(cfg: ModelConfig) -> bool:
    """Whether the memory needs position embeddings: encoder layers read them, and so does a decoder
    cross-attention without reference points (its keys); RT-DETR's (no encoder layers after its
    hybrid-encoder neck, deformable cross-attention) has none, nor a level embedding."""
    reference = attention_spec(cfg.decoder.cross_attention, "decoder").reference_points
    return cfg.encoder.num_layers > 0 or not reference


def build_position_encoding(cfg: ModelConfig) -> nn.Module | None:
    """Sine (Deformable DETR's half-pixel offset for multi-scale inputs unless the query source's spec
    sets another, as DINO's; temperature `cfg.position_temperature`) or learned; None when the memory
    needs no positions (`memory_positions`)."""
    if not memory_positions(cfg):
        return None
    if cfg.hidden_dim % 2:
        raise ValueError(f"model.hidden_dim ({cfg.hidden_dim}) must be even for a 2-D position encoding")
    if cfg.position_encoding == "learned":
        return LearnedPositionEncoding(cfg.hidden_dim // 2)
    offset = 0.0
    if multiscale_inputs(cfg):
        spec_offset = query_spec(cfg)[1].sine_offset
        offset = -0.5 if spec_offset is None else spec_offset
    return SinePositionEncoding(cfg.hidden_dim // 2, temperature=cfg.position_temperature, offset=offset)


def attention_arguments(cfg: ModelConfig, site: str) -> dict[str, Any]:
    """Plain builder arguments of the attention at `site` ("encoder" or "decoder")."""
    section = cfg.encoder if site == "encoder" else cfg.decoder
    act = cfg.encoder.act
    return dict(
        embed_dim=cfg.hidden_dim,
        num_heads=cfg.num_heads,
        dropout=cfg.dropout,
        num_levels=cfg.num_feature_levels,
        num_points=section.num_points,
        level_points=getattr(section, "level_points", None),
        sampling=getattr(section, "sampling", "default"),
        projections=getattr(section, "projections", True),
        q_hashes=act.q_hashes,
        bucket_width=act.bucket_width,
        seed=act.seed,
    )


def build_transformer(cfg: ModelConfig) -> Transformer:
    """Post-norm encoder/decoder with the configured attention modules.

    The decoder applies a final LayerNorm to every layer's output when its cross-attention's spec
    says so (DETR) or its query source's (the DAB / DINO decoder), none otherwise (Deformable DETR).
    Multi-scale inputs add a learned level embedding (when the memory has positions at all).
    """
    d = cfg.hidden_dim
    widths = dict(embed_dim=d, ffn_dim=cfg.ffn_dim, dropout=cfg.dropout)
    encoder_arguments, decoder_arguments = (
        attention_arguments(cfg, "encoder"),
        attention_arguments(cfg, "decoder"),
    )
    encoder_layers = [
        EncoderLayer(
            self_attn=build_attention(cfg.encoder.attention, site="encoder", **encoder_arguments), **widths
        )
        for _ in range(cfg.encoder.num_layers)
    ]
    decoder_layers = [
        DecoderLayer(
            self_attn=PlainAttention(d, cfg.num_heads, dropout=cfg.dropout),
            cross_attn=build_attention(cfg.decoder.cross_attention, site="decoder", **decoder_arguments),
            gate=cfg.decoder.gate,
            activation=cfg.decoder.activation,
            **widths,
        )
        for _ in range(cfg.decoder.num_layers)
    ]
    cross_spec = attention_spec(cfg.decoder.cross_attention, "decoder")
    final_norm = cross_spec.final_decoder_norm or query_spec(cfg)[1].final_decoder_norm
    num_levels = cfg.num_feature_levels if multiscale_inputs(cfg) and memory_positions(cfg) else None
    return Transformer(
        Encoder(encoder_layers),
        Decoder(decoder_layers, nn.LayerNorm(d) if final_norm else None),
        embed_dim=d,
        num_levels=num_levels,
    )


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


def build_classification(model_cfg: ModelConfig, loss_cfg: LossConfig | None = None) -> Classification:
    """The classification strategy of `model.classification` with the loss config's options."""
    options = {}
    if loss_cfg is not None:
        options = dict(
            eos_coef=loss_cfg.eos_coef, focal_alpha=loss_cfg.focal_alpha, focal_gamma=loss_cfg.focal_gamma
        )
    return classification_strategy(model_cfg.classification, **options)


def check_supported(cfg: ModelConfig) -> None:
    """Combinations the parts cannot build (the config validator checks the same at load).

    Raises:
        ValueError: the query source's needs are not met (the message names the keys).
    """
    name, spec = query_spec(cfg)
    if (
        spec.reference_attention
        and not attention_spec(cfg.decoder.cross_attention, "decoder").reference_points
    ):
        raise InputError(
            f"'model.query_source: {name}' needs a decoder cross-attention with reference points"
        )
    if cfg.box_refine and spec.box_dim == 0:
        raise InputError(
            "'model.box_refine' needs a decoder cross-attention with reference points, or a "
            "query source with reference boxes"
        )
    if spec.needs_refinement and not cfg.box_refine:
        raise InputError(f"'model.query_source: {name}' needs 'model.box_refine: true'")
    if spec.position_from_boxes and cfg.classification != "sigmoid":
        raise InputError(f"'model.query_source: {name}' needs 'model.classification: sigmoid' (focal loss)")
    if spec.proposal_heads and cfg.share_heads:
        raise InputError(f"'model.query_source: {name}' needs one head per layer: 'model.share_heads: false'")
    if cfg.look_forward_twice and not cfg.box_refine:
        raise InputError("'model.look_forward_twice' needs 'model.box_refine: true'")
    if cfg.distribution.enabled and (not cfg.box_refine or spec.box_dim != 4):
        raise InputError(
            "'model.distribution' needs 'model.box_refine: true' and a query source with reference boxes "
            f"(iou_aware, mixed_selection); 'model.query_source' is {name!r}"
        )


def build_refiner(cfg: ModelConfig) -> DistributionRefinement | None:
    """D-FINE's distribution refinement of `model.distribution`, or None when it is off."""
    dist = cfg.distribution
    if not dist.enabled:
        return None
    return DistributionRefinement(
        cfg.hidden_dim,
        cfg.decoder.num_layers,
        reg_max=dist.reg_max,
        reg_scale=dist.reg_scale,
        up=dist.up,
        quality=dist.quality,
        logit_eps=query_spec(cfg)[1].logit_eps,
        activation=cfg.mlp_activation,
        quality_activation=cfg.decoder.activation,
    )


def build_model(cfg: ModelConfig) -> Detector:
    """The detector described by `cfg` (randomly initialised apart from optional ImageNet weights).

    The parts: `build_backbone`, `build_neck`, `build_position_encoding`, `build_transformer`, the
    query source of its spec's builder, the class and box heads (`prediction_heads`: one pair shared
    by every decoder layer, or one per layer with `box_refine` unless `share_heads`, plus the
    proposal pair of a two-stage source), the query-position head of anchor-box sources and the
    denoising source.
    """
    check_supported(cfg)
    name, spec = query_spec(cfg)
    transformer = build_transformer(cfg)
    backbone = build_backbone(cfg)
    neck = build_neck(cfg, backbone)
    d = cfg.hidden_dim
    classification = build_classification(cfg)
    class_head = classification.class_head(d, cfg.num_classes)
    box_head = MLP(d, d, 4, 3, activation=cfg.mlp_activation)
    if spec.box_dim:
        # Boxes relative to references start as the references themselves (zero deltas).
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
    source_builder = import_builder(spec.builder, f"query source {name!r}")
    query_source = source_builder(
        embed_dim=d,
        num_queries=cfg.num_queries,
        class_head=copy.deepcopy(class_head),
        box_head=copy.deepcopy(box_head),
    )
    # Deformable DETR starts box sizes at sigmoid(-2) where the first layer turns points into boxes.
    size_bias = -2.0 if spec.box_dim == 2 else None
    refiner = build_refiner(cfg)
    class_embed, bbox_embed = prediction_heads(
        class_head,
        box_head,
        num_layers=cfg.decoder.num_layers,
        per_layer=cfg.box_refine and not cfg.share_heads,
        proposal_heads=spec.proposal_heads,
        initial_size_bias=size_bias,
    )
    if refiner is not None:
        bbox_embed = nn.ModuleList()  # the refiner's distribution heads predict the boxes
    position_head = None
    if spec.position_from_boxes:
        position_head = POSITION_HEADS[spec.position_head](d, activation=cfg.mlp_activation)
    return Detector(
        backbone=backbone,
        neck=neck,
        position_encoding=build_position_encoding(cfg),
        transformer=transformer,
        query_source=query_source,
        query_spec=spec,
        class_embed=class_embed,
        bbox_embed=bbox_embed,
        num_classes=cfg.num_classes,
        num_queries=cfg.num_queries,
        classification=classification,
        box_refine=cfg.box_refine,
        aux_loss=cfg.aux_loss,
        look_forward_twice=cfg.look_forward_twice,
        query_pos_head=position_head,
        denoising=build_denoising(cfg),
        eval_layers=cfg.decoder.eval_layers,
        refiner=refiner,
        query_pos_clamp=cfg.decoder.query_pos_clamp,
    )


def build_matcher(model_cfg: ModelConfig, loss_cfg: LossConfig) -> HungarianMatcher:
    """Hungarian matcher with the weighted costs of `loss_cfg` (`MATCHING_COSTS`)."""
    return HungarianMatcher(
        loss_cfg.cost_class,
        loss_cfg.cost_bbox,
        loss_cfg.cost_giou,
        classification=build_classification(model_cfg, loss_cfg),
        extra_costs=dict(loss_cfg.extra_costs),
    )


def build_criterion(model_cfg: ModelConfig, loss_cfg: LossConfig) -> SetCriterion:
    """Set loss with its matcher over the prediction groups the model declares (the same groups
    `build_model(model_cfg).groups` holds); weights and costs come from `loss_cfg` only.

    Raises:
        ValueError: an unknown or repeated `loss.terms` entry (the message names it).
    """
    weights = {key: getattr(loss_cfg, key) for key in ("class_weight", "bbox_weight", "giou_weight")}
    dedicated = {"loss_ce": "class_weight", "loss_bbox": "bbox_weight", "loss_giou": "giou_weight"}
    for name in loss_cfg.weights:
        if name in dedicated or name in weights:
            key = dedicated.get(name, name)
            raise InputError(f"'loss.weights.{name}': set 'loss.{key}' instead (the weight has its own key)")
    term_options = {name: dict(options) for name, options in loss_cfg.term_options.items()}
    dist = model_cfg.distribution
    for name in loss_cfg.terms:
        if name in LOSS_TERMS and LOSS_TERMS[name].distribution:
            if not dist.enabled:
                raise InputError(
                    f"loss term {name!r} reads edge distributions: "
                    "it needs 'model.distribution.enabled: true'"
                )
            defaults = {"reg_max": dist.reg_max, "reg_scale": dist.reg_scale, "up": dist.up}
            term_options[name] = {**defaults, **term_options.get(name, {})}
    return SetCriterion(
        model_cfg.num_classes,
        build_matcher(model_cfg, loss_cfg),
        classification=build_classification(model_cfg, loss_cfg),
        terms=loss_cfg.terms,
        weights={**weights, **loss_cfg.weights},
        groups=declared_groups(model_cfg),
        term_options=term_options,
        union_matching=loss_cfg.union_matching,
    )


def declared_groups(cfg: ModelConfig) -> list[PredictionGroup]:
    """The prediction groups of `build_model(cfg)` (see `Detector.groups`)."""
    spec = query_spec(cfg)[1]
    num_aux = cfg.decoder.num_layers - 1 if cfg.aux_loss else 0
    pre = cfg.distribution.enabled and cfg.aux_loss
    groups = main_groups(num_aux, proposals=spec.proposals, pre=pre)
    if cfg.denoising.enabled:
        groups += denoising_groups(num_aux, pre=pre)
    return groups


def build_postprocess(cfg: ModelConfig) -> PostProcess:
    """Detections from the outputs with the classification strategy of `model.classification`."""
    return PostProcess(build_classification(cfg), num_top=cfg.num_detections)
