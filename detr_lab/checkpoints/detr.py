"""Official DETR checkpoints (facebookresearch/detr `models/detr.py`, `models/transformer.py`).

Registers the DETR family: post-norm encoder/decoder with `nn.MultiheadAttention` (packed q/k/v
`in_proj`), a softmax class head with "no object" at index `num_classes`, learned queries.
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
    register_family,
    require_key,
)
from detr_lab.config import Config, config_from_dict

# Official DETR key -> detr_lab keys (the rule format is described in `family.py`).
_DETR_LAYER = r"transformer\.(?P<stack>encoder|decoder)\.layers\.(?P<i>\d+)\."
DETR_KEY_RULES: list[KeyRule] = [
    *BACKBONE_KEY_RULES,
    (r"input_proj\.(?P<p>weight|bias)", ("neck.input_proj.0.{p}",)),
    (r"query_embed\.weight", ("query_source.query_embed.weight",)),
    (r"class_embed\.(?P<p>weight|bias)", ("class_embed.{p}",)),
    (r"bbox_embed\.layers\.(?P<j>\d+)\.(?P<p>weight|bias)", ("bbox_embed.layers.{j}.{p}",)),
    (
        _DETR_LAYER + r"(?P<attn>self_attn|multihead_attn)\.in_proj_(?P<p>weight|bias)",
        (
            "transformer.{stack}.layers.{i}.{attn}.q_proj.{p}",
            "transformer.{stack}.layers.{i}.{attn}.k_proj.{p}",
            "transformer.{stack}.layers.{i}.{attn}.v_proj.{p}",
        ),
    ),
    (
        _DETR_LAYER + r"(?P<attn>self_attn|multihead_attn)\.out_proj\.(?P<p>weight|bias)",
        ("transformer.{stack}.layers.{i}.{attn}.out_proj.{p}",),
    ),
    (
        _DETR_LAYER + r"linear(?P<n>[12])\.(?P<p>weight|bias)",
        ("transformer.{stack}.layers.{i}.ffn.linear{n}.{p}",),
    ),
    (
        _DETR_LAYER + r"norm(?P<norm>[123])\.(?P<p>weight|bias)",
        ("transformer.{stack}.layers.{i}.{norm}.{p}",),
    ),
    (r"transformer\.decoder\.norm\.(?P<p>weight|bias)", ("transformer.decoder.norm.{p}",)),
]
# Post-norm layers: which residual branch each official norm follows.
_DETR_NORMS = {
    "encoder": {"1": "self_attn_norm", "2": "ffn_norm"},
    "decoder": {"1": "self_attn_norm", "2": "cross_attn_norm", "3": "ffn_norm"},
}
_DETR_ATTENTION = {"self_attn": "self_attn", "multihead_attn": "cross_attn"}


def _detr_fields(groups: dict[str, str]) -> dict[str, str] | None:
    fields = dict(groups)
    if "attn" in fields:
        fields["attn"] = _DETR_ATTENTION[fields["attn"]]
    if "norm" in fields:
        norm = _DETR_NORMS[fields["stack"]].get(fields["norm"])
        if norm is None:  # e.g. an encoder norm3: no such branch
            return None
        fields["norm"] = norm
    return fields


def _is_detr(state: Mapping[str, Tensor]) -> bool:
    return (
        "query_embed.weight" in state
        and "class_embed.weight" in state
        and any(k.startswith("transformer.decoder.layers.0.multihead_attn.") for k in state)
    )


def _infer_detr_config(state: Mapping[str, Tensor], overrides: dict[str, Any]) -> Config:
    family = "DETR"
    query_embed = require_key(state, "query_embed.weight", family)
    num_queries, hidden_dim = query_embed.shape
    num_classes = require_key(state, "class_embed.weight", family).shape[0] - 1
    encoder_layers = count_indices(state, "transformer.encoder.layers.")
    decoder_layers = count_indices(state, "transformer.decoder.layers.")
    stack = "encoder" if encoder_layers else "decoder"
    ffn_dim = require_key(state, f"transformer.{stack}.layers.0.linear1.weight", family).shape[0]
    check_query_override(overrides, num_queries, "query_embed")
    model = {
        "num_classes": num_classes,
        "hidden_dim": hidden_dim,
        "num_heads": overrides.get("num_heads", 8),
        "ffn_dim": ffn_dim,
        "num_queries": num_queries,
        "num_feature_levels": 1,
        "position_encoding": "learned" if "backbone.1.row_embed.weight" in state else "sine",
        "classification": "softmax",
        "backbone": backbone_config(state, overrides),
        "encoder": {"num_layers": encoder_layers, "attention": "plain"},
        "decoder": {"num_layers": decoder_layers, "cross_attention": "plain"},
    }
    return config_from_dict({"model": model}, "official DETR checkpoint")


DETR_FAMILY = register_family(
    OfficialFamily(
        name="DETR",
        override_keys=("dilation", "num_heads", "num_queries"),
        matches=_is_detr,
        infer_config=_infer_detr_config,
        rules=DETR_KEY_RULES,
        fields=_detr_fields,
    )
)
