"""Official Deformable DETR checkpoints (fundamentalvision/Deformable-DETR `models/deformable_detr.py`,
`models/deformable_transformer.py`, `models/ops/modules/ms_deform_attn.py`).

Registers the Deformable DETR family: multi-scale deformable attention (`MSDeformAttn`), sigmoid
class heads, optional iterative box refinement and two-stage proposals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from detr_lab.checkpoints.family import (
    BACKBONE_KEY_RULES,
    KeyRule,
    OfficialFamily,
    backbone_config,
    check_query_override,
    count_indices,
    deformable_stacks,
    focal_recipe,
    register_family,
    require_key,
    resolve_head_aliases,
)
from detr_lab.config import Config, config_from_dict
from detr_lab.io import CheckpointError

# Official Deformable DETR key -> detr_lab keys (the rule format is described in `family.py`).
_DEFORMABLE_LAYER = r"transformer\.(?P<stack>encoder|decoder)\.layers\.(?P<i>\d+)\."
_DEFORMABLE_ATTENTION = (
    r"(?P<attn>self_attn|cross_attn)\.(?P<part>sampling_offsets|attention_weights|value_proj|output_proj)"
)
# The input projections, level embeddings, encoder-proposal projection, heads and transformer
# layers, shared with DINO (`checkpoints/dino.py`), which builds on them.
DEFORMABLE_LAYER_RULES: list[KeyRule] = [
    (r"input_proj\.(?P<l>\d+)\.(?P<k>[01])\.(?P<p>weight|bias)", ("neck.input_proj.{l}.{k}.{p}",)),
    (r"transformer\.level_embed", ("transformer.level_embed",)),
    (r"transformer\.enc_output\.(?P<p>weight|bias)", ("query_source.memory_proj.{p}",)),
    (r"transformer\.enc_output_norm\.(?P<p>weight|bias)", ("query_source.memory_norm.{p}",)),
    # Heads: per layer with box refinement (`class_embed.3.weight`), one shared module otherwise
    # (`prepare` has reduced the official per-layer aliases to `class_embed.weight`).
    (r"class_embed\.(?:(?P<j>\d+)\.)?(?P<p>weight|bias)", ("class_embed.{j}{p}",)),
    (
        r"bbox_embed\.(?:(?P<j>\d+)\.)?layers\.(?P<k>\d+)\.(?P<p>weight|bias)",
        ("bbox_embed.{j}layers.{k}.{p}",),
    ),
    (
        _DEFORMABLE_LAYER + _DEFORMABLE_ATTENTION + r"\.(?P<p>weight|bias)",
        ("transformer.{stack}.layers.{i}.{attn}.{part}.{p}",),
    ),
    (
        r"transformer\.decoder\.layers\.(?P<i>\d+)\.self_attn\.in_proj_(?P<p>weight|bias)",
        (
            "transformer.decoder.layers.{i}.self_attn.q_proj.{p}",
            "transformer.decoder.layers.{i}.self_attn.k_proj.{p}",
            "transformer.decoder.layers.{i}.self_attn.v_proj.{p}",
        ),
    ),
    (
        r"transformer\.decoder\.layers\.(?P<i>\d+)\.self_attn\.out_proj\.(?P<p>weight|bias)",
        ("transformer.decoder.layers.{i}.self_attn.out_proj.{p}",),
    ),
    (
        _DEFORMABLE_LAYER + r"linear(?P<n>[12])\.(?P<p>weight|bias)",
        ("transformer.{stack}.layers.{i}.ffn.linear{n}.{p}",),
    ),
    (
        _DEFORMABLE_LAYER + r"norm(?P<norm>[123])\.(?P<p>weight|bias)",
        ("transformer.{stack}.layers.{i}.{norm}.{p}",),
    ),
]
DEFORMABLE_KEY_RULES: list[KeyRule] = [
    *BACKBONE_KEY_RULES,
    (r"query_embed\.weight", ("query_source.query_embed.weight",)),
    (r"transformer\.reference_points\.(?P<p>weight|bias)", ("query_source.reference_points_head.{p}",)),
    (r"transformer\.pos_trans\.(?P<p>weight|bias)", ("query_source.query_proj.{p}",)),
    (r"transformer\.pos_trans_norm\.(?P<p>weight|bias)", ("query_source.query_norm.{p}",)),
    *DEFORMABLE_LAYER_RULES,
]
# Official Deformable DETR decoder layers run self-attention -> norm2, cross-attention -> norm1,
# feed-forward -> norm3 (the numbering follows construction order, not the order of use).
_DEFORMABLE_NORMS = {
    "encoder": {"1": "self_attn_norm", "2": "ffn_norm"},
    "decoder": {"1": "cross_attn_norm", "2": "self_attn_norm", "3": "ffn_norm"},
}
DEFORMABLE_DEFAULT_PROPOSALS = 300  # the official two-stage proposal count (= its query count)
# The official head aliases: the decoder holds the detector's heads for box refinement and two-stage.


def deformable_fields(groups: dict[str, str]) -> dict[str, str] | None:
    """The names a matched rule fills in (head index, norm branch), or None for a key that has no
    detr_lab counterpart on that stack; shared with DINO."""
    fields = dict(groups)
    if "j" in fields:
        fields["j"] = f"{fields['j']}." if fields["j"] is not None else ""
    if "norm" in fields:
        norm = _DEFORMABLE_NORMS[fields["stack"]].get(fields["norm"])
        if norm is None:  # an encoder norm3: no such branch
            return None
        fields["norm"] = norm
    if fields.get("attn") == "self_attn" and fields.get("stack") == "decoder":
        return None  # decoder self-attention is plain multi-head attention (in_proj/out_proj rules)
    if fields.get("attn") == "cross_attn" and fields.get("stack") == "encoder":
        return None
    return fields


def deformable_layers(
    state: Mapping[str, Tensor], overrides: Mapping, family: str, *, hidden_dim: int, num_levels: int
) -> tuple[int, int, int, int]:
    """(ffn_dim, num_heads, encoder points, decoder points) of a deformable-attention checkpoint (Deformable
    DETR, DINO): the feed-forward width, the head count (8 unless overridden: the weights do not tell)
    and the sampling points per head and level of each stack (4 for an empty encoder).

    Raises:
        CheckpointError: a head count that does not divide the width, or missing keys.
    """
    encoder_layers = count_indices(state, "transformer.encoder.layers.")
    stack = "encoder" if encoder_layers else "decoder"
    ffn_dim = require_key(state, f"transformer.{stack}.layers.0.linear1.weight", family, ndim=2).shape[0]
    num_heads = int(overrides.get("num_heads", 8))
    if hidden_dim % num_heads:
        raise CheckpointError(f"num_heads={num_heads} does not divide the checkpoint's width {hidden_dim}")
    encoder_points = (
        _deformable_points(state, "transformer.encoder.layers.0.self_attn", num_heads, num_levels)
        if encoder_layers
        else 4
    )
    decoder = "transformer.decoder.layers.0.cross_attn"
    decoder_points = _deformable_points(state, decoder, num_heads, num_levels)
    return ffn_dim, num_heads, encoder_points, decoder_points


def _is_deformable_detr(state: Mapping[str, Tensor]) -> bool:
    return "transformer.level_embed" in state and any(".sampling_offsets." in k for k in state)


def _deformable_points(state: Mapping[str, Tensor], prefix: str, heads: int, levels: int) -> int:
    """Sampling points per head and level: `{prefix}.sampling_offsets` has heads*levels*points*2 rows."""
    rows = require_key(state, f"{prefix}.sampling_offsets.weight", "Deformable DETR", ndim=2).shape[0]
    weights = require_key(state, f"{prefix}.attention_weights.weight", "Deformable DETR", ndim=2).shape[0]
    if rows % (heads * levels * 2) or weights * 2 != rows:
        raise CheckpointError(
            f"official Deformable DETR checkpoint: '{prefix}.sampling_offsets.weight' has {rows} rows and "
            f"attention_weights {weights}; expected heads*levels*points*2 and heads*levels*points with "
            f"{heads} heads and {levels} levels (pass num_heads=... if the model has another head count)"
        )
    return rows // (heads * levels * 2)


def _infer_deformable_config(state: Mapping[str, Tensor], overrides: dict[str, Any]) -> Config:
    family = "Deformable DETR"
    num_levels, hidden_dim = require_key(state, "transformer.level_embed", family, ndim=2).shape
    projections = count_indices(state, "input_proj.")
    if projections != num_levels:
        raise CheckpointError(
            f"official {family} checkpoint: {projections} input projections but level_embed has "
            f"{num_levels} levels"
        )
    two_stage = "transformer.enc_output.weight" in state
    box_refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in state)
    if two_stage and not box_refine:
        raise CheckpointError(
            f"official {family} checkpoint: two-stage without box refinement is not supported "
            "(only two-stage with --with_box_refine, the published variant)"
        )
    encoder_layers = count_indices(state, "transformer.encoder.layers.")
    decoder_layers = count_indices(state, "transformer.decoder.layers.")
    heads = count_indices(state, "class_embed.")
    expected_heads = decoder_layers + (1 if two_stage else 0)
    if heads != expected_heads:
        raise CheckpointError(
            f"official {family} checkpoint: {heads} class heads (class_embed.*) for {decoder_layers} decoder "
            f"layers{' and the two-stage proposals' if two_stage else ''}; expected {expected_heads}"
        )
    num_classes = require_key(state, "class_embed.0.weight", family, ndim=2).shape[0]
    ffn_dim, num_heads, encoder_points, decoder_points = deformable_layers(
        state, overrides, family, hidden_dim=hidden_dim, num_levels=num_levels
    )
    if two_stage:
        num_queries = int(overrides.get("num_queries", DEFORMABLE_DEFAULT_PROPOSALS))
    else:
        num_queries, query_width = require_key(state, "query_embed.weight", family, ndim=2).shape
        if query_width != 2 * hidden_dim:
            raise CheckpointError(
                f"official {family} checkpoint: query_embed is {query_width} wide; expected 2 x {hidden_dim}"
            )
        check_query_override(overrides, num_queries, "query_embed")
    model = {
        "num_classes": num_classes,
        "hidden_dim": hidden_dim,
        "num_heads": num_heads,
        "ffn_dim": ffn_dim,
        "num_queries": num_queries,
        "num_feature_levels": num_levels,
        "position_encoding": "learned" if "backbone.1.row_embed.weight" in state else "sine",
        "classification": "sigmoid",
        "box_refine": box_refine,
        "query_source": "proposals" if two_stage else "learned_points",
        "backbone": backbone_config(state, overrides),
        **deformable_stacks((encoder_layers, encoder_points), (decoder_layers, decoder_points)),
    }
    loss = focal_recipe(class_weight=2.0)  # the official recipe: class weight 2
    return config_from_dict({"model": model, "loss": loss}, "official Deformable DETR checkpoint")


def _resolve_deformable_aliases(state: dict[str, Tensor], cfg: Config, source: str) -> dict[str, Tensor]:
    """Reduce the keys that name one tensor of the official model to one key each.

    The official model registers its heads twice with box refinement or two-stage (the decoder holds
    the detector's `class_embed`/`bbox_embed` as well), and without box refinement its per-layer heads
    are one module listed once per layer. Loading a state dict into it leaves, for each tensor, the
    value of the key loaded last: the detector's own head over the decoder's alias, the highest layer
    index among shared copies. The same values are kept here; copies that differ (never in a trained
    checkpoint, whose copies are one tensor) are reported in a `CheckpointWarning`.
    """
    return resolve_head_aliases(state, source, shared_layers=not cfg.model.box_refine)


DEFORMABLE_FAMILY = register_family(
    OfficialFamily(
        name="Deformable DETR",
        override_keys=("dilation", "num_heads", "num_queries"),
        matches=_is_deformable_detr,
        infer_config=_infer_deformable_config,
        rules=DEFORMABLE_KEY_RULES,
        fields=deformable_fields,
        prepare=_resolve_deformable_aliases,
    )
)
