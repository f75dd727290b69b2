"""Official D-FINE (Peterande/D-FINE) and DEIM-D-FINE (ShihuaHuang95/DEIM) checkpoints -> the detr_lab
`Detector` with an HGNetv2 backbone, D-FINE's hybrid encoder, RT-DETR's query selection and D-FINE's
decoder (gated cross-attention without projections, fine-grained distribution refinement, LQE).

Registers the D-FINE family, so `load_official` and `tools/convert_checkpoint.py` accept the released
D-FINE N/S/M/L/X (COCO, Objects365 and Objects365 -> COCO) and DEIM-D-FINE N/S/M/L/X checkpoints (a bare
state dict, a dict with `model`, or a training checkpoint with `ema.module`).

From the weights: the HGNetv2 variant and its returned stages, the encoder (width, expansion, depth,
AIFI layers, FFN width), the decoder (layers, width, FFN width, levels, classes, sampling points per
level from `num_points_scale`), the distribution head (`reg_max` from the box heads' width, `reg_scale`
and `up` from their stored values) and denoising. What the weights cannot tell follows the official
configs (`configs/dfine/include/dfine_hgnetv2.yml`): 8 heads, 300 queries, query positions clamped to
+-10, VFL (alpha 0.75, gamma 2) + boxes + FGL + DDF with weights 1 / 5 / 2 / 0.15 / 1.5 on the union
matching, focal matching costs 2 / 5 / 2, top-300 post-processing, square 640 inputs scaled to [0, 1].

DEIM's checkpoints have D-FINE's key layout; the override `recipe="deim"` selects DEIM's differences
(`configs/base/deim.yml`): SiLU in the decoder's feed-forward blocks, quality heads and MLP heads, and
its matchability-aware loss (gamma 1.5) in place of VFL. The default is `recipe="dfine"`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from detr_lab.checkpoints.dfine_encoder import dfine_encoder_options, dfine_encoder_state_dict
from detr_lab.checkpoints.family import (
    KeyRule,
    OfficialFamily,
    count_indices,
    register_family,
    require_key,
)
from detr_lab.checkpoints.rtdetr import infer_level_points, rtdetr_categories, rtdetr_style_model
from detr_lab.config import Config, config_from_dict
from detr_lab.io import CheckpointError
from detr_lab.models.backbones.hgnetv2_keys import infer_hgnetv2, official_hgnetv2_state_dict

FAMILY = "D-FINE"
RECIPES = ("dfine", "deim")
_MLP = r"layers\.(?P<k>\d+)\.(?P<p>weight|bias)"
_LAYER = r"decoder\.decoder\.layers\.(?P<i>\d+)\."
_BN = r"(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"
_MAPPED = "__mapped__."  # keys `prepare` already turned into detr_lab names
_NORMS = {"1": "self_attn_norm", "3": "ffn_norm"}

DFINE_KEY_RULES: list[KeyRule] = [
    (r"__mapped__\.(?P<rest>.+)", ("{rest}",)),
    (r"decoder\.input_proj\.(?P<l>\d+)\.(?:conv|0)\.weight", ("neck.output_proj.{l}.conv.weight",)),
    (r"decoder\.input_proj\.(?P<l>\d+)\.(?:norm|1)\." + _BN, ("neck.output_proj.{l}.norm.{p}",)),
    (r"decoder\.(?:anchors|valid_mask)", ()),  # recomputed for every input size
    (r"decoder\.decoder\.(?:up|reg_scale)", ()),  # the decoder's alias of decoder.up / reg_scale
    (r"decoder\.(?P<name>up|reg_scale)", ("refiner.{name}",)),
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
        _LAYER + r"gateway\.(?P<part>gate|norm)\.(?P<p>weight|bias)",
        ("transformer.decoder.layers.{i}.cross_attn_gate.{part}.{p}",),
    ),
    (
        _LAYER + r"linear(?P<n>[12])\.(?P<p>weight|bias)",
        ("transformer.decoder.layers.{i}.ffn.linear{n}.{p}",),
    ),
    (_LAYER + r"norm(?P<norm>[13])\.(?P<p>weight|bias)", ("transformer.decoder.layers.{i}.{norm}.{p}",)),
    (
        r"decoder\.decoder\.lqe_layers\.(?P<j>\d+)\.reg_conf\." + _MLP,
        ("refiner.quality_heads.{j}.reg_conf.layers.{k}.{p}",),
    ),
    (r"decoder\.denoising_class_embed\.weight", ("denoising.label_embed.weight",)),
    (r"decoder\.query_pos_head\." + _MLP, ("query_pos_head.layers.{k}.{p}",)),
    (r"decoder\.enc_output\.(?:proj|0)\.(?P<p>weight|bias)", ("query_source.memory_proj.{p}",)),
    (r"decoder\.enc_output\.(?:norm|1)\.(?P<p>weight|bias)", ("query_source.memory_norm.{p}",)),
    (r"decoder\.enc_score_head\.(?P<p>weight|bias)", ("query_source.class_head.{p}",)),
    (r"decoder\.enc_bbox_head\." + _MLP, ("query_source.box_head.layers.{k}.{p}",)),
    (r"decoder\.dec_score_head\.(?P<j>\d+)\.(?P<p>weight|bias)", ("class_embed.{j}.{p}",)),
    (r"decoder\.pre_bbox_head\." + _MLP, ("refiner.pre_box_head.layers.{k}.{p}",)),
    (r"decoder\.dec_bbox_head\.(?P<j>\d+)\." + _MLP, ("refiner.box_heads.{j}.layers.{k}.{p}",)),
]


def dfine_fields(groups: dict[str, str]) -> dict[str, str]:
    """Template fields of a matched key: decoder norms get detr_lab's names."""
    if groups.get("norm") is not None:
        groups = {**groups, "norm": _NORMS[groups["norm"]]}
    return {k: v for k, v in groups.items() if v is not None}


def is_dfine(state: Mapping[str, Tensor]) -> bool:
    """D-FINE's decoder: a first-layer box head and distribution quality heads."""
    return "decoder.pre_bbox_head.layers.0.weight" in state and any(
        key.startswith("decoder.decoder.lqe_layers.") for key in state
    )


def _scalar(state: Mapping[str, Tensor], key: str) -> float:
    tensor = require_key(state, key, FAMILY)
    if tensor.numel() != 1:
        raise CheckpointError(
            f"official {FAMILY} checkpoint: '{key}' holds {tensor.numel()} values; expected 1"
        )
    return float(tensor.reshape(()).item())


def _backbone(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """`model.backbone`: the HGNetv2 variant and `use_lab` its keys describe; frozen batch norm (no
    `num_batches_tracked`: D-FINE-L/X, `freeze_norm: True`) with the stem frozen as those configs do
    (`freeze_at: 0`, `freeze_stem_only: True`)."""
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    name, use_lab = infer_hgnetv2(backbone)
    frozen = not any(k.endswith("num_batches_tracked") for k in backbone)
    return {
        "type": "hgnetv2",
        "name": name,
        "use_lab": use_lab,
        "norm": "frozen_bn" if frozen else "batch_norm",
        "frozen_stages": 0,
        "freeze_stem": frozen,
        "pretrained": False,
        "weights_path": None,
    }


def _neck(state: Mapping[str, Tensor], num_heads: int, hidden_dim: int) -> dict[str, Any]:
    """`model.neck`: D-FINE's encoder as its weights describe it; when its width differs from the
    decoder's (D-FINE-X: 384 and 256) the decoder's input projections become the neck's `output_proj`."""
    options = dfine_encoder_options(state, num_heads=num_heads)
    del options["in_channels"]
    width = options.pop("hidden_dim")
    projected = "decoder.input_proj.0.conv.weight" in state or "decoder.input_proj.0.0.weight" in state
    if not projected and width != hidden_dim:
        raise CheckpointError(
            f"official {FAMILY} checkpoint: a {width}-wide encoder feeds a {hidden_dim}-wide decoder "
            "without input projections"
        )
    if projected:
        options.update(output_proj=True, width=width)
    return {"type": "dfine_hybrid_encoder", "options": options}


def infer_dfine_config(state: Mapping[str, Tensor], overrides: dict[str, Any]) -> Config:
    """The `Config` an official D-FINE / DEIM state dict describes (see the module docstring)."""
    recipe = overrides.get("recipe", "dfine")
    if recipe not in RECIPES:
        raise CheckpointError(f"recipe={recipe!r}: expected one of {RECIPES}")
    hidden_dim = require_key(state, "decoder.query_pos_head.layers.1.weight", FAMILY, ndim=2).shape[0]
    num_heads = int(overrides.get("num_heads", 8))
    num_layers = count_indices(state, "decoder.decoder.layers.")
    for prefix in ("decoder.dec_score_head.", "decoder.dec_bbox_head.", "decoder.decoder.lqe_layers."):
        if count_indices(state, prefix) != num_layers:
            raise CheckpointError(
                f"official {FAMILY} checkpoint: {count_indices(state, prefix)} '{prefix}*' modules for "
                f"{num_layers} decoder layers (wide auxiliary layers, layer_scale > 1, are not supported)"
            )
    if "decoder.tgt_embed.weight" in state:
        raise CheckpointError(
            f"official {FAMILY} checkpoint with learned content queries (learn_query_content): not supported"
        )
    if "decoder.decoder.layers.0.cross_attn.value_proj.weight" in state:
        raise CheckpointError(f"official {FAMILY} checkpoint: a cross-attention with a value projection")
    num_levels = count_indices(state, "encoder.input_proj.")
    _, points, level_points = infer_level_points(state, num_levels, num_heads, FAMILY)
    corners = require_key(state, "decoder.dec_bbox_head.0.layers.2.weight", FAMILY, ndim=2).shape[0]
    if corners % 4:
        raise CheckpointError(f"official {FAMILY} checkpoint: box heads with {corners} outputs (not 4 edges)")
    silu = recipe == "deim"
    decoder = {
        "num_layers": num_layers,
        "cross_attention": "deformable_v2",
        "num_points": points,
        "level_points": level_points,
        "sampling": overrides.get("sampling", "default"),
        "projections": False,
        "gate": True,
        "query_pos_clamp": 10.0,
        "activation": "silu" if silu else "relu",
        "eval_layers": overrides.get("eval_layers"),
    }
    model = rtdetr_style_model(state, FAMILY, num_heads, num_levels, overrides)
    model.update(
        mlp_activation="silu" if silu else "relu",
        distribution={
            "enabled": True,
            "reg_max": corners // 4 - 1,
            "reg_scale": abs(_scalar(state, "decoder.reg_scale")),
            "up": abs(_scalar(state, "decoder.up")),
            "quality": True,
        },
        backbone=_backbone(state),
        neck=_neck(state, num_heads, hidden_dim),
        decoder=decoder,
    )
    augment = {"policy": "rtdetr", "square_size": 640, "mean": [0.0] * 3, "std": [1.0] * 3}
    return config_from_dict(
        {"model": model, "loss": dfine_loss(recipe), "data": {"augment": augment}},
        f"official {FAMILY} checkpoint",
    )


def dfine_loss(recipe: str = "dfine") -> dict[str, Any]:
    """`loss` of the official D-FINE criterion (VFL alpha 0.75 gamma 2, boxes, FGL, DDF; weights
    1 / 5 / 2 / 0.15 / 1.5; box and distribution terms on the union of the layers' matchings) or, with
    `recipe="deim"`, DEIM's (MAL with gamma 1.5 in place of VFL); focal matching costs 2 / 5 / 2."""
    classification = (
        {"mal": {"gamma": 1.5}} if recipe == "deim" else {"vfl": {"alpha": 0.75, "gamma": 2.0}}
    )
    return {
        "terms": [next(iter(classification)), "boxes", "fgl", "ddf"],
        "term_options": classification,
        "union_matching": True,
        "cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0,
        "bbox_weight": 5.0, "giou_weight": 2.0,
        "focal_alpha": 0.25, "focal_gamma": 2.0,
    }  # fmt: skip


def prepare_dfine(state: dict[str, Tensor], cfg: Config, source: str) -> dict[str, Tensor]:
    """Map the backbone and encoder keys (their own conversions) and check that the decoder's aliases of
    `up` / `reg_scale` agree with the model's."""
    for name in ("up", "reg_scale"):
        alias = state.get(f"decoder.decoder.{name}")
        if alias is not None and not torch.equal(alias, state[f"decoder.{name}"]):
            raise CheckpointError(f"{source}: 'decoder.decoder.{name}' differs from 'decoder.{name}'")
    rest = {k: v for k, v in state.items() if not k.startswith(("backbone.", "encoder."))}
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    mapped = {f"{_MAPPED}backbone.{k}": v for k, v in official_hgnetv2_state_dict(backbone).items()}
    # trainable batch norm keeps its step counters (the names are the official ones)
    mapped.update(
        {f"{_MAPPED}backbone.{k}": v for k, v in backbone.items() if k.endswith(".num_batches_tracked")}
    )
    neck = dfine_encoder_state_dict(state, source_prefix="encoder.", target_prefix=f"{_MAPPED}neck.")
    mapped.update(neck)
    return {**mapped, **rest}


DFINE_FAMILY = register_family(
    OfficialFamily(
        name=FAMILY,
        override_keys=("num_heads", "num_queries", "sampling", "eval_layers", "recipe"),
        matches=is_dfine,
        infer_config=infer_dfine_config,
        rules=DFINE_KEY_RULES,
        fields=dfine_fields,
        prepare=prepare_dfine,
        categories=rtdetr_categories,
    )
)
