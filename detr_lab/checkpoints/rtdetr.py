"""Official lyuwenyu/RT-DETR checkpoints (v1 `rtdetr_pytorch`, v2 `rtdetrv2_pytorch`) -> the detr_lab
`Detector` with a ResNet-vd backbone, the hybrid-encoder neck and RT-DETR's query selection.

Registers the RT-DETR family, so `load_official` and `tools/convert_checkpoint.py` accept the released
RT-DETR R18/R34/R50-m/R50/R101 checkpoints (a bare state dict, a dict with `model`, or a training
checkpoint with `ema.module`, whose averaged weights are the released ones).

The architecture comes from the weights: the backbone depth (blocks per stage of `backbone.res_layers`)
and whether its batch norm is frozen (no `num_batches_tracked`: R50/R101), the hybrid encoder's width,
AIFI layers and FFN width, CSP expansion and depth multiplier (`encoder.fpn_blocks.0`), the decoder's
layers, FFN width, levels, classes and sampling points (`num_points_scale`: v2; none: v1, whose
attention is Deformable DETR's), denoising (`denoising_class_embed`). What the weights cannot tell
follows the official configs (`configs/rtdetrv2/include/rtdetrv2_r50vd.yml`): 8 heads, 300 queries,
GELU in AIFI and SiLU in CCFM, denoising with 100 queries, label noise 0.5, box noise 1.0, VFL
(alpha 0.75, gamma 2) with weights 1 / 5 / 2, focal matching costs 2 / 5 / 2, top-300 post-processing,
inputs scaled to [0, 1] without normalization. Overrides: `num_heads`, `num_queries`, `sampling`
("discrete" for the `_dsp` models, which the weights do not distinguish), `eval_layers` (decoder layers
run in evaluation; R50-m, recognised by its R50 backbone with expansion 0.5, gets the official 3).

Class index i of the official COCO models is the i-th of the 80 COCO categories in id order
(`remap_mscoco_category`); `rtdetr_categories` gives those ids and names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from detr_lab.checkpoints.family import (
    KeyRule,
    OfficialFamily,
    count_indices,
    register_family,
    require_key,
)
from detr_lab.config import Config, config_from_dict
from detr_lab.data.categories import COCO_CATEGORY_NAMES
from detr_lab.io import CheckpointError

FAMILY = "RT-DETR"
_MLP = r"layers\.(?P<k>\d+)\.(?P<p>weight|bias)"
_LAYER = r"decoder\.decoder\.layers\.(?P<i>\d+)\."
_NORMS = {"1": "self_attn_norm", "2": "cross_attn_norm", "3": "ffn_norm"}
_BN = r"(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"

RTDETR_KEY_RULES: list[KeyRule] = [
    (r"backbone\.(?P<rest>.+)", ("backbone.{rest}",)),
    # v1 names the hybrid encoder's input projections by position (`input_proj.0.0` / `.0.1`).
    (r"encoder\.input_proj\.(?P<l>\d+)\.0\.weight", ("neck.input_proj.{l}.conv.weight",)),
    (r"encoder\.input_proj\.(?P<l>\d+)\.1\." + _BN, ("neck.input_proj.{l}.norm.{p}",)),
    (r"encoder\.(?P<rest>.+)", ("neck.{rest}",)),
    (r"decoder\.input_proj\.(?P<l>\d+)\.(?:conv|0)\.weight", ("neck.output_proj.{l}.conv.weight",)),
    (r"decoder\.input_proj\.(?P<l>\d+)\.(?:norm|1)\." + _BN, ("neck.output_proj.{l}.norm.{p}",)),
    (r"decoder\.(?:anchors|valid_mask)", ()),  # recomputed for every input size
    (
        _LAYER + r"self_attn\.in_proj_(?P<p>weight|bias)",
        (
            "transformer.decoder.layers.{i}.self_attn.q_proj.{p}",
            "transformer.decoder.layers.{i}.self_attn.k_proj.{p}",
            "transformer.decoder.layers.{i}.self_attn.v_proj.{p}",
        ),
    ),
    (
        _LAYER + r"self_attn\.out_proj\.(?P<p>weight|bias)",
        ("transformer.decoder.layers.{i}.self_attn.out_proj.{p}",),
    ),
    (_LAYER + r"cross_attn\.(?P<rest>.+)", ("transformer.decoder.layers.{i}.cross_attn.{rest}",)),
    (
        _LAYER + r"linear(?P<n>[12])\.(?P<p>weight|bias)",
        ("transformer.decoder.layers.{i}.ffn.linear{n}.{p}",),
    ),
    (_LAYER + r"norm(?P<norm>[123])\.(?P<p>weight|bias)", ("transformer.decoder.layers.{i}.{norm}.{p}",)),
    (r"decoder\.denoising_class_embed\.weight", ("denoising.label_embed.weight",)),
    (r"decoder\.query_pos_head\." + _MLP, ("query_pos_head.layers.{k}.{p}",)),
    (r"decoder\.enc_output\.(?:proj|0)\.(?P<p>weight|bias)", ("query_source.memory_proj.{p}",)),
    (r"decoder\.enc_output\.(?:norm|1)\.(?P<p>weight|bias)", ("query_source.memory_norm.{p}",)),
    (r"decoder\.enc_score_head\.(?P<p>weight|bias)", ("query_source.class_head.{p}",)),
    (r"decoder\.enc_bbox_head\." + _MLP, ("query_source.box_head.layers.{k}.{p}",)),
    (r"decoder\.dec_score_head\.(?P<j>\d+)\.(?P<p>weight|bias)", ("class_embed.{j}.{p}",)),
    (r"decoder\.dec_bbox_head\.(?P<j>\d+)\." + _MLP, ("bbox_embed.{j}.layers.{k}.{p}",)),
]

# Blocks per residual stage -> depth (ResNet-vd 18/34: basic blocks; 50/101: bottlenecks).
_DEPTHS = {
    (False, (2, 2, 2, 2)): 18,
    (False, (3, 4, 6, 3)): 34,
    (True, (3, 4, 6, 3)): 50,
    (True, (3, 4, 23, 3)): 101,
}


def rtdetr_fields(groups: dict[str, str]) -> dict[str, str]:
    """Template fields of a matched key: decoder norms get detr_lab's names."""
    if "norm" in groups and groups["norm"] is not None:
        groups = {**groups, "norm": _NORMS[groups["norm"]]}
    return {k: v for k, v in groups.items() if v is not None}


def is_rtdetr(state: Mapping[str, Tensor]) -> bool:
    """RT-DETR's decoder heads, without D-FINE's first-layer box head (`detr_lab.checkpoints.dfine`)."""
    return (
        "decoder.dec_score_head.0.weight" in state
        and "decoder.query_pos_head.layers.0.weight" in state
        and "decoder.pre_bbox_head.layers.0.weight" not in state
    )


def _backbone(state: Mapping[str, Tensor]) -> dict[str, Any]:
    counts = tuple(count_indices(state, f"backbone.res_layers.{i}.blocks.") for i in range(4))
    bottleneck = "backbone.res_layers.0.blocks.0.branch2c.conv.weight" in state
    depth = _DEPTHS.get((bottleneck, counts))
    if depth is None:
        raise CheckpointError(
            f"official {FAMILY} checkpoint: unsupported backbone with {counts} blocks per stage "
            f"({'bottleneck' if bottleneck else 'basic'} blocks; supported: ResNet-vd 18/34/50/101)"
        )
    frozen = "backbone.conv1.conv1_1.norm.num_batches_tracked" not in state
    return {
        "type": "resnet_vd",
        "name": f"resnet{depth}",
        "norm": "frozen_bn" if frozen else "batch_norm",
        "frozen_stages": 0,
        "freeze_stem": frozen,  # the official R50/R101 recipe: freeze_at 0 with frozen batch norm
        "pretrained": False,
        "weights_path": None,
    }


def _neck(state: Mapping[str, Tensor], num_heads: int) -> dict[str, Any]:
    encoders = count_indices(state, "encoder.encoder.")
    levels = count_indices(state, "encoder.input_proj.")
    width = require_key(state, "encoder.lateral_convs.0.conv.weight", FAMILY, ndim=4).shape[0]
    inner = require_key(state, "encoder.fpn_blocks.0.conv1.conv.weight", FAMILY, ndim=4).shape[0]
    blocks = count_indices(state, "encoder.fpn_blocks.0.bottlenecks.")
    return {
        "type": "hybrid_encoder",
        "options": {
            "num_heads": num_heads,
            "ffn_dim": require_key(state, "encoder.encoder.0.layers.0.linear1.weight", FAMILY, ndim=2).shape[
                0
            ],
            "num_encoder_layers": count_indices(state, "encoder.encoder.0.layers."),
            "encoder_levels": list(range(levels - encoders, levels)),
            "expansion": inner / width,
            "depth_mult": blocks / 3,
            "output_proj": True,
            "width": width,
        },
    }


def infer_level_points(
    state: Mapping[str, Tensor], num_levels: int, num_heads: int, family: str = FAMILY
) -> tuple[str, int, list[int] | None]:
    """(cross-attention variant, points per level, per-level list when they differ) of the decoder's
    first cross-attention (`num_points_scale`: RT-DETRv2 / D-FINE; none: RT-DETR v1)."""
    scale_key = "decoder.decoder.layers.0.cross_attn.num_points_scale"
    offsets = require_key(
        state, "decoder.decoder.layers.0.cross_attn.attention_weights.weight", family, ndim=2
    )
    total = offsets.shape[0] // num_heads
    if scale_key not in state:  # v1: Deformable DETR's attention, the same points on every level
        if total % num_levels:
            raise CheckpointError(
                f"official {family} checkpoint: {total} sampling points per head for {num_levels} levels"
            )
        return "deformable", total // num_levels, None
    scale = state[scale_key].flatten().tolist()
    points, index = [], 0
    while index < len(scale):  # runs of 1/n, n times: n points on the level
        count = round(1 / scale[index]) if scale[index] > 0 else 0
        run = scale[index : index + count]
        if count < 1 or len(run) != count or any(abs(value * count - 1) > 1e-4 for value in run):
            raise CheckpointError(
                f"official {family} checkpoint: '{scale_key}' is not runs of 1/n repeated n times "
                f"(the official per-level point scales): {[round(v, 4) for v in scale[:12]]}"
            )
        points.append(count)
        index += count
    if len(points) != num_levels or sum(points) != total:
        raise CheckpointError(
            f"official {family} checkpoint: num_points_scale describes {points} points per level; "
            f"expected {num_levels} levels and {total} points per head"
        )
    uniform = len(set(points)) == 1
    return "deformable_v2", points[0], None if uniform else points


def infer_rtdetr_config(state: Mapping[str, Tensor], overrides: dict[str, Any]) -> Config:
    """The `Config` an official RT-DETR state dict describes (see the module docstring)."""
    num_heads = int(overrides.get("num_heads", 8))
    num_layers = count_indices(state, "decoder.decoder.layers.")
    num_levels = count_indices(state, "decoder.input_proj.")
    if count_indices(state, "decoder.dec_score_head.") != num_layers:
        raise CheckpointError(
            f"official {FAMILY} checkpoint: {count_indices(state, 'decoder.dec_score_head.')} class heads "
            f"for {num_layers} decoder layers"
        )
    if "decoder.tgt_embed.weight" in state:
        raise CheckpointError(
            f"official {FAMILY} checkpoint with learned content queries (learn_query_content): not supported"
        )
    if count_indices(state, "encoder.input_proj.") != num_levels:
        raise CheckpointError(
            f"official {FAMILY} checkpoint: {count_indices(state, 'encoder.input_proj.')} encoder levels "
            f"but {num_levels} decoder input projections (extra decoder levels are not supported)"
        )
    variant, points, level_points = infer_level_points(state, num_levels, num_heads)
    sampling = overrides.get("sampling", "default")
    if sampling != "default" and variant != "deformable_v2":
        raise CheckpointError(f"sampling={sampling!r}: RT-DETR v1 checkpoints sample bilinearly only")
    decoder: dict[str, Any] = {"num_layers": num_layers, "cross_attention": variant, "num_points": points}
    if variant == "deformable_v2":
        decoder.update(level_points=level_points, sampling=sampling)
    backbone = _backbone(state)
    neck = _neck(state, num_heads)
    # RT-DETRv2-R50-m ("medium"): the R50 model with a half-width CSP fusion, evaluated with 3 of its 6
    # decoder layers (the official eval_idx: 2); the weights tell it by the backbone and expansion.
    medium = backbone["name"] == "resnet50" and neck["options"]["expansion"] == 0.5 and num_layers == 6
    decoder["eval_layers"] = overrides.get("eval_layers", 3 if medium else None)
    model = rtdetr_style_model(state, FAMILY, num_heads, num_levels, overrides)
    model.update(backbone=backbone, neck=neck, decoder=decoder)
    # The official inputs: square 640 x 640 resized images scaled to [0, 1] (and its augmentation when
    # fine-tuned: the policy's defaults are the official ones).
    augment = {"policy": "rtdetr", "square_size": 640, "mean": [0.0] * 3, "std": [1.0] * 3}
    data = {"augment": augment}
    return config_from_dict(
        {"model": model, "loss": rtdetr_loss(), "data": data}, f"official {FAMILY} checkpoint"
    )


def rtdetr_style_model(
    state: Mapping[str, Tensor], family: str, num_heads: int, num_levels: int, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """`model` keys that RT-DETR and its descendants (D-FINE, DEIM) share: width, classes and FFN from
    the weights; sigmoid classification, IoU-aware selection of `num_queries` (300) proposals, box
    refinement with a head per layer, top-300 post-processing, RT-DETR's denoising settings (100
    queries, label noise 0.5, box noise 1.0; enabled when the weights hold its label embedding), no
    encoder layers after the hybrid-encoder neck. The caller adds backbone, neck and decoder."""
    return {
        "num_classes": require_key(state, "decoder.dec_score_head.0.weight", family, ndim=2).shape[0],
        "hidden_dim": require_key(state, "decoder.query_pos_head.layers.1.weight", family, ndim=2).shape[0],
        "num_heads": num_heads,
        "ffn_dim": require_key(state, "decoder.decoder.layers.0.linear1.weight", family, ndim=2).shape[0],
        "dropout": 0.0,
        "num_queries": int(overrides.get("num_queries", 300)),
        "num_feature_levels": num_levels,
        "classification": "sigmoid",
        "box_refine": True,
        "query_source": "iou_aware",
        "look_forward_twice": True,
        "share_heads": False,
        "num_detections": 300,
        "denoising": {
            "enabled": "decoder.denoising_class_embed.weight" in state,
            "dn_number": 100,
            "label_noise_ratio": 0.5,
            "box_noise_scale": 1.0,
        },
        "encoder": {"num_layers": 0, "attention": "deformable"},
    }


def rtdetr_loss() -> dict[str, Any]:
    """`loss` of the official RT-DETR criterion: VFL (alpha 0.75, gamma 2) and boxes, weights 1 / 5 / 2;
    focal matching costs class 2, L1 5, GIoU 2 (alpha 0.25, gamma 2)."""
    return {
        "terms": ["vfl", "boxes"],
        "term_options": {"vfl": {"alpha": 0.75, "gamma": 2.0}},
        "cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0,
        "bbox_weight": 5.0, "giou_weight": 2.0,
        "focal_alpha": 0.25, "focal_gamma": 2.0,
    }  # fmt: skip


def rtdetr_categories(num_classes: int) -> tuple[list[int], list[str]]:
    """Category ids and names of class indices 0..C-1: with 80 classes the COCO categories in id order
    (the official `mscoco_label2category`); otherwise ids 0..C-1 and placeholder names `class_<i>`."""
    if num_classes == len(COCO_CATEGORY_NAMES):
        ids = sorted(COCO_CATEGORY_NAMES)
        return ids, [COCO_CATEGORY_NAMES[i] for i in ids]
    return list(range(num_classes)), [f"class_{i}" for i in range(num_classes)]


RTDETR_FAMILY = register_family(
    OfficialFamily(
        name=FAMILY,
        override_keys=("num_heads", "num_queries", "sampling", "eval_layers"),
        matches=is_rtdetr,
        infer_config=infer_rtdetr_config,
        rules=RTDETR_KEY_RULES,
        fields=rtdetr_fields,
        categories=rtdetr_categories,
    )
)
