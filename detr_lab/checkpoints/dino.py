"""Official IDEA-Research/DINO checkpoints -> the detr_lab `Detector` with anchor-box queries (DINO).

Registers the DINO family (first: its keys include Deformable DETR's), so `load_official` and
`tools/convert_checkpoint.py` accept DINO R50 checkpoints (4-scale and 5-scale, two-stage "standard"
with learned content queries, or learned anchors). The architecture comes from the weights: levels
(`transformer.level_embed`), backbone stages (the first input projection's channels), layer counts,
query count (`transformer.tgt_embed`), classes (`class_embed.0`), sampling points, denoising
(`label_enc`). What the weights cannot tell follows `config/DINO/DINO_4scale.py`: sine encoding at
temperature 20, dropout 0, denoising with dn_number 100, label noise 0.5, box noise 0.4, top-300
post-processing, focal matching costs 2/5/2 and loss weights 1/5/2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from detr_lab.checkpoints.deformable_detr import DEFORMABLE_LAYER_RULES, deformable_fields, deformable_layers
from detr_lab.checkpoints.family import (
    BACKBONE_KEY_RULES,
    OFFICIAL_FAMILIES,
    KeyRule,
    OfficialFamily,
    backbone_config,
    check_query_override,
    count_indices,
    deformable_stacks,
    focal_recipe,
    infer_resnet,
    register_family,
    require_key,
    resolve_head_aliases,
)
from detr_lab.config import Config, config_from_dict
from detr_lab.io import CheckpointError
from detr_lab.models.build import backbone_stages

FAMILY = "DINO"
RESNET_STAGE_CHANNELS = {1: 256, 2: 512, 3: 1024, 4: 2048}  # bottleneck ResNets (R50/R101)
_MLP = r"layers\.(?P<k>\d+)\.(?P<p>weight|bias)"

DINO_KEY_RULES: list[KeyRule] = [
    *BACKBONE_KEY_RULES[:2],  # no learned position tables in DINO
    (r"transformer\.tgt_embed\.weight", ("query_source.content.weight",)),
    (r"transformer\.refpoint_embed\.weight", ("query_source.anchors.weight",)),
    (r"transformer\.enc_out_class_embed\.(?P<p>weight|bias)", ("query_source.class_head.{p}",)),
    (r"transformer\.enc_out_bbox_embed\." + _MLP, ("query_source.box_head.layers.{k}.{p}",)),
    (r"transformer\.decoder\.ref_point_head\." + _MLP, ("query_pos_head.layers.{k}.{p}",)),
    (r"transformer\.decoder\.norm\.(?P<p>weight|bias)", ("transformer.decoder.norm.{p}",)),
    (r"label_enc\.weight", ("denoising.label_embed.weight",)),
    *DEFORMABLE_LAYER_RULES,
]

def is_dino(state: Mapping[str, Tensor]) -> bool:
    return (
        "transformer.tgt_embed.weight" in state
        and "transformer.decoder.ref_point_head.layers.0.weight" in state
    )


def infer_dino_config(state: Mapping[str, Tensor], overrides: dict[str, Any]) -> Config:
    """The `Config` an official DINO state dict describes (see the module docstring)."""
    num_levels, hidden_dim = require_key(state, "transformer.level_embed", FAMILY, ndim=2).shape
    if not 1 <= num_levels <= 5:
        raise CheckpointError(f"official {FAMILY} checkpoint: {num_levels} feature levels (supported: 1-5)")
    projections = count_indices(state, "input_proj.")
    if projections != num_levels:
        raise CheckpointError(
            f"official {FAMILY} checkpoint: {projections} input projections but level_embed has "
            f"{num_levels} levels"
        )
    backbone = infer_resnet(state, "backbone.0.body.")
    first_channels = require_key(state, "input_proj.0.0.weight", FAMILY, ndim=4).shape[1]
    first_stage = backbone_stages(num_levels)[0]
    if backbone in ("resnet50", "resnet101") and first_channels != RESNET_STAGE_CHANNELS[first_stage]:
        raise CheckpointError(
            f"official {FAMILY} checkpoint: input_proj.0 takes {first_channels} channels; with {num_levels} "
            f"levels detr_lab feeds it ResNet stage C{first_stage + 1} ({RESNET_STAGE_CHANNELS[first_stage]})"
        )
    encoder_layers = count_indices(state, "transformer.encoder.layers.")
    decoder_layers = count_indices(state, "transformer.decoder.layers.")
    num_queries = require_key(state, "transformer.tgt_embed.weight", FAMILY, ndim=2).shape[0]
    check_query_override(overrides, num_queries, "transformer.tgt_embed")
    num_classes = require_key(state, "class_embed.0.weight", FAMILY, ndim=2).shape[0]
    if count_indices(state, "class_embed.") != decoder_layers:
        raise CheckpointError(
            f"official {FAMILY} checkpoint: {count_indices(state, 'class_embed.')} class heads for "
            f"{decoder_layers} decoder layers"
        )
    mixed = "transformer.enc_output.weight" in state
    if not mixed and "transformer.refpoint_embed.weight" not in state:
        raise CheckpointError(
            f"official {FAMILY} checkpoint: neither encoder proposals (transformer.enc_output) nor learned "
            "anchors (transformer.refpoint_embed)"
        )
    denoising = "label_enc.weight" in state
    if denoising and state["label_enc.weight"].shape[0] != num_classes + 1:
        raise CheckpointError(
            f"official {FAMILY} checkpoint: label_enc has {state['label_enc.weight'].shape[0]} rows; "
            f"detr_lab's denoising label embedding has num_classes + 1 = {num_classes + 1}"
        )
    ffn_dim, num_heads, encoder_points, decoder_points = deformable_layers(
        state, overrides, FAMILY, hidden_dim=hidden_dim, num_levels=num_levels
    )
    model = {
        "num_classes": num_classes,
        "hidden_dim": hidden_dim,
        "num_heads": num_heads,
        "ffn_dim": ffn_dim,
        "dropout": 0.0,
        "num_queries": num_queries,
        "num_feature_levels": num_levels,
        "position_encoding": "sine",
        "position_temperature": 20.0,
        "classification": "sigmoid",
        "box_refine": True,
        "query_source": "mixed_selection" if mixed else "learned_anchors",
        "look_forward_twice": True,
        "share_heads": bool(overrides.get("share_heads", True)),
        "num_detections": 300,
        "denoising": {
            "enabled": denoising,
            "dn_number": 100,
            "label_noise_ratio": 0.5,
            "box_noise_scale": 0.4,
        },
        "backbone": {**backbone_config(state, overrides), "name": backbone},
        **deformable_stacks((encoder_layers, encoder_points), (decoder_layers, decoder_points)),
    }
    loss = focal_recipe(class_weight=1.0)  # the official recipe: class weight 1
    loss["terms"] = ["labels", "cardinality", "boxes", "box_parts"]  # DINO also logs loss_xy / loss_hw
    return config_from_dict({"model": model, "loss": loss}, f"official {FAMILY} checkpoint")


def resolve_dino_heads(state: dict[str, Tensor], cfg: Config, source: str) -> dict[str, Tensor]:
    """Reduce the official head aliases to one key per tensor.

    The official model lists its decoder heads twice (`class_embed.j` and the decoder's
    `transformer.decoder.class_embed.j`) and, with shared heads, one module once per layer. Loading a
    state dict into it leaves each tensor with the value of the key loaded last: the detector's own
    head, the highest layer index. The same values are kept here; copies that differ (never in a
    trained checkpoint) are reported in a `CheckpointWarning`.
    """
    return resolve_head_aliases(state, source, shared_layers=cfg.model.share_heads)


DINO_FAMILY = register_family(
    OfficialFamily(
        name=FAMILY,
        override_keys=("dilation", "num_heads", "num_queries", "share_heads"),
        matches=is_dino,
        infer_config=infer_dino_config,
        rules=DINO_KEY_RULES,
        fields=deformable_fields,
        prepare=resolve_dino_heads,
    )
)
# Checked before Deformable DETR, whose keys a DINO checkpoint also has.
OFFICIAL_FAMILIES.remove(DINO_FAMILY)
OFFICIAL_FAMILIES.insert(0, DINO_FAMILY)
