"""The hybrid encoder of official D-FINE checkpoints (Peterande/D-FINE, `encoder.*` keys) -> detr_lab's
`dfine_hybrid_encoder` neck (`detr_lab.models.necks.dfine_encoder.DFineHybridEncoder`).

For a D-FINE checkpoint family to call (it maps the backbone and decoder keys itself):

    options = dfine_encoder_options(state)               # DFineHybridEncoder(**options) takes them
    neck = dfine_neck_config(state)                      # model.neck: {"type", "options"}
    weights = dfine_encoder_state_dict(state)            # {"neck.<name>": tensor}, checked

or, in a family's key rules, `DFINE_ENCODER_KEY_RULES` (the same renaming, unchecked).

The neck keeps the official module names, so the mapping is a change of prefix; what it adds is the
check that the keys are exactly those of the encoder the weights describe (names and shapes), with a
`CheckpointError` naming the missing, unexpected and mis-shaped keys.

What the weights tell (all from `encoder.*`): the levels and their backbone channels (`input_proj`),
the width d, the AIFI encoders (`encoder.<i>`, taken to encode the deepest levels, as every official
config) with their layers and FFN width, the fusion blocks' branch width (-> `expansion`) and RepVGG
blocks per CSP block (-> `depth_mult`). What they cannot tell follows the official configs
(configs/dfine/include/dfine_hgnetv2.yml): 8 heads (override with `num_heads`), GELU in AIFI, SiLU in
the fusion blocks, no dropout, temperature 10000.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from detr_lab.checkpoints.family import KeyRule, count_indices, require_key
from detr_lab.io import CheckpointError, diff_state_dicts
from detr_lab.models.necks.dfine_encoder import DFineHybridEncoder

FAMILY = "D-FINE"

# The encoder's keys under `neck.`, names unchanged (rules of `detr_lab.checkpoints.family.map_keys`).
DFINE_ENCODER_KEY_RULES: list[KeyRule] = [(r"encoder\.(?P<rest>.+)", ("neck.{rest}",))]

# Keys of the official deploy form: a conv-norm unit fused into `conv_bn_fused`, a RepVGG block into `conv`.
_DEPLOY_KEY = re.compile(r"conv_bn_fused\.|bottlenecks\.\d+\.conv\.")

# Official configs' multipliers, preferred when they give the weights' widths and depths.
_EXPANSIONS = (1.0, 0.5, 0.34)
_DEPTH_MULTS = (1.0, 0.67, 0.5, 0.34)


def _expansion(branch: int, width: int) -> float:
    """An `expansion` whose official branch width `round(expansion * width // 2)` is `branch`: an
    official config's value when one gives it, else 2 branch / width or, should float rounding land
    under it, (2 branch + 1) / width (any value in [2 branch, 2 branch + 2) / width gives it)."""
    for candidate in (*_EXPANSIONS, 2 * branch / width, (2 * branch + 1) / width):
        if round(candidate * width // 2) == branch:
            return candidate
    raise CheckpointError(
        f"official {FAMILY} checkpoint: no expansion gives {branch} branch channels at width {width}"
    )


def _depth_mult(blocks: int) -> float:
    """A `depth_mult` with `round(3 * depth_mult) == blocks` (an official config's value when one gives
    it; D-FINE-N's 0.5 and M's 0.67 both give 2 blocks, and the same model)."""
    for candidate in (*_DEPTH_MULTS, blocks / 3):
        if round(3 * candidate) == blocks:
            return candidate
    raise CheckpointError(f"official {FAMILY} checkpoint: no depth_mult gives {blocks} RepVGG blocks")


def dfine_encoder_options(
    state: Mapping[str, Tensor], *, prefix: str = "encoder.", num_heads: int = 8
) -> dict[str, Any]:
    """The keyword arguments of the `DFineHybridEncoder` that the official encoder weights `{prefix}*`
    of `state` describe: `in_channels`, `hidden_dim`, `num_heads`, `ffn_dim`, `dropout`, `enc_act`,
    `num_encoder_layers`, `encoder_levels`, `expansion`, `depth_mult`, `act` (see the module docstring
    for what comes from the weights and what from the official configs).

    Raises:
        CheckpointError: a key the inference reads is missing (the message names it), or widths no
            official multiplier formula gives.
    """
    levels = count_indices(state, f"{prefix}input_proj.")
    if levels < 2:
        raise CheckpointError(
            f"official {FAMILY} checkpoint: {levels} encoder input projection(s) under "
            f"'{prefix}input_proj.'; the hybrid encoder fuses at least 2 levels"
        )
    projections = [
        require_key(state, f"{prefix}input_proj.{i}.conv.weight", FAMILY, ndim=4) for i in range(levels)
    ]
    in_channels = [p.shape[1] for p in projections]
    width = projections[0].shape[0]
    encoders = count_indices(state, f"{prefix}encoder.")
    layers = count_indices(state, f"{prefix}encoder.0.layers.")
    ffn_dim = 4 * width  # unused without AIFI layers
    if layers:
        ffn_dim = require_key(state, f"{prefix}encoder.0.layers.0.linear1.weight", FAMILY, ndim=2).shape[0]
    branch = require_key(state, f"{prefix}fpn_blocks.0.cv2.1.conv.weight", FAMILY, ndim=4).shape[0]
    blocks = count_indices(state, f"{prefix}fpn_blocks.0.cv2.0.bottlenecks.")
    return {
        "in_channels": [int(c) for c in in_channels],
        "hidden_dim": int(width),
        "num_heads": num_heads,
        "ffn_dim": int(ffn_dim),
        "dropout": 0.0,
        "enc_act": "gelu",
        "num_encoder_layers": layers,
        "encoder_levels": list(range(levels - encoders, levels)) if layers else [],
        "expansion": _expansion(int(branch), int(width)),
        "depth_mult": _depth_mult(blocks),
        "act": "silu",
    }


def dfine_neck_config(
    state: Mapping[str, Tensor], *, prefix: str = "encoder.", num_heads: int = 8
) -> dict[str, Any]:
    """`model.neck` for the official encoder weights `{prefix}*`: `{"type": "dfine_hybrid_encoder",
    "options": ...}`, the options of `dfine_encoder_options` less `in_channels` and `hidden_dim`, which
    the neck builder takes from the backbone's channels and `model.hidden_dim` (the caller makes those
    agree with `dfine_encoder_options(state)["in_channels"]` / `["hidden_dim"]`)."""
    options = dfine_encoder_options(state, prefix=prefix, num_heads=num_heads)
    for common in ("in_channels", "hidden_dim"):
        del options[common]
    return {"type": "dfine_hybrid_encoder", "options": options}


def dfine_encoder_state_dict(
    state: Mapping[str, Tensor], *, source_prefix: str = "encoder.", target_prefix: str = "neck."
) -> dict[str, Tensor]:
    """The official encoder weights of `state` renamed for detr_lab: every key `{source_prefix}<name>`
    becomes `{target_prefix}<name>` (same tensor objects, in the neck's state-dict order); keys outside
    `source_prefix` are not read (the backbone's and decoder's are the caller's).

    Contract: the `{source_prefix}` keys must be exactly the state dict of the `DFineHybridEncoder`
    that `dfine_encoder_options(state, prefix=source_prefix)` describes (the training form the official
    checkpoints hold: names and shapes), except that a missing batch-norm `num_batches_tracked` is
    filled with 0 (it does not change the eval-mode function). With the defaults the result loads into
    a detector whose `neck` is that encoder.

    Raises:
        CheckpointError: the keys differ; the message counts and names the missing, unexpected and
            mis-shaped keys (`<name>` without prefixes), and says so when the weights are the official
            deploy form (`convert_to_deploy`: fused `conv_bn_fused` / RepVGG `conv` keys).
    """
    options = dfine_encoder_options(state, prefix=source_prefix)
    with torch.device("meta"):
        expected = DFineHybridEncoder(**options).state_dict()
    start = len(source_prefix)
    given = {key[start:]: value for key, value in state.items() if key.startswith(source_prefix)}
    for name in expected:
        if name.endswith("num_batches_tracked") and name not in given:
            given[name] = torch.zeros((), dtype=torch.long)
    diff = diff_state_dicts(expected, given)
    if not diff.exact:
        deploy = any(_DEPLOY_KEY.search(name) for name in diff.unexpected)
        hint = " (the official deploy-form weights; use the training-form checkpoint)" if deploy else ""
        raise CheckpointError(
            f"official {FAMILY} encoder weights under '{source_prefix}' do not fit the D-FINE hybrid encoder "
            f"they describe ({options['hidden_dim']} wide, {len(options['in_channels'])} levels): "
            f"{diff.summary()}{hint}"
        )
    return {f"{target_prefix}{name}": given[name] for name in expected}
