"""Attention variants: the spec table that the config, its validation and `build.py` all read.

Each variant is one file in this package (the module, and a `build(**arguments)` function)
plus one line in `ATTENTION_SPECS`: its builder and the properties the rest of the model
depends on. Nothing else tests a variant's name.

Sites, named after their config section:

- "encoder": the encoder self-attention, `model.encoder.attention`;
- "decoder": the decoder cross-attention (queries to memory), `model.decoder.cross_attention`.
  (The decoder self-attention among the queries is always plain attention.)

This module is pure data: importing it imports neither torch nor any variant. A builder is named
as "module:function" and imported when the first module of that variant is built.

All variants share one call contract (see `detr_lab.models.attention.plain`) and one mask polarity
(True = may not attend; see `detr_lab.models.attention.masks`). The variant files import torch
and this package only; `detr_lab.config` reads the table, `detr_lab.models` builds from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from detr_lab.models.builders import import_builder

if TYPE_CHECKING:
    from torch import nn

SITES = ("encoder", "decoder")
SITE_KEYS = {"encoder": "model.encoder.attention", "decoder": "model.decoder.cross_attention"}


@dataclass(frozen=True)
class AttentionSpec:
    """What the rest of the model needs to know about one attention variant.

    Attributes:
        builder: "module:function"; the function takes keyword arguments (see `build_attention`)
            and returns the module.
        sites: where the variant may be used ("encoder", "decoder").
        reference_points: the module samples around reference points, so it needs
            `reference_points` and `spatial_shapes`. As decoder cross-attention this selects the
            Deformable DETR head: boxes predicted relative to the reference points, and the only head
            with box refinement and two-stage.
        multiscale_inputs: the model takes Deformable DETR's input side (GroupNorm(32) input
            projections, a learned level embedding, the half-pixel sine offset), whatever the number
            of feature levels.
        final_decoder_norm: as decoder cross-attention, the decoder applies a final LayerNorm to
            every layer's output (DETR); False: no final norm (Deformable DETR).
        decoder_options: the keys of `model.decoder` that only this variant reads (set for another
            variant, they are a config error).
    """

    builder: str
    sites: tuple[str, ...]
    reference_points: bool = False
    multiscale_inputs: bool = False
    final_decoder_norm: bool = True
    decoder_options: tuple[str, ...] = ()


ATTENTION_SPECS: dict[str, AttentionSpec] = {
    "plain": AttentionSpec("detr_lab.models.attention.plain:build", sites=("encoder", "decoder")),
    "deformable": AttentionSpec(
        "detr_lab.models.attention.deformable:build",
        sites=("encoder", "decoder"),
        reference_points=True,
        multiscale_inputs=True,
        final_decoder_norm=False,
    ),
    # RT-DETRv2's: per-level sampling points (`model.decoder.level_points`) and the discrete
    # sampling method (`model.decoder.sampling`); D-FINE's without projections (`model.decoder.projections`).
    "deformable_v2": AttentionSpec(
        "detr_lab.models.attention.deformable_v2:build",
        sites=("encoder", "decoder"),
        reference_points=True,
        multiscale_inputs=True,
        final_decoder_norm=False,
        decoder_options=("level_points", "sampling", "projections"),
    ),
    "act": AttentionSpec("detr_lab.models.attention.clustering:build", sites=("encoder",)),
}



def needs_multiscale_inputs(encoder_attention: str, cross_attention: str, num_feature_levels: int) -> bool:
    """Whether a model takes Deformable DETR's multi-scale input side (GroupNorm(32) input
    projections, level embeddings, half-pixel sine offset): the spec of either chosen variant asks for
    it, or there is more than one feature level."""
    chosen = (encoder_attention, cross_attention)
    return num_feature_levels > 1 or any(ATTENTION_SPECS[name].multiscale_inputs for name in chosen)


def reference_attention_hint() -> str:
    """Names the decoder cross-attention variants that take reference points, for messages."""
    names = [name for name in attention_names("decoder") if ATTENTION_SPECS[name].reference_points]
    return f"'model.decoder.cross_attention': {' or '.join(names)}"


def refinement_error() -> str:
    """The message for box refinement without reference points."""
    hint = reference_attention_hint()
    return f"'model.box_refine' needs a decoder cross-attention with reference points ({hint})"


def attention_names(site: str) -> tuple[str, ...]:
    """Names of the variants allowed at `site` ("encoder" or "decoder"), in table order."""
    if site not in SITES:
        raise ValueError(f"unknown attention site {site!r}; expected one of {SITES}")
    return tuple(name for name, spec in ATTENTION_SPECS.items() if site in spec.sites)


def attention_spec(name: str, site: str) -> AttentionSpec:
    """The spec of variant `name` used at `site`.

    Raises:
        ValueError: `name` is not a variant for `site` (the message names the config key and the
            valid names).
    """
    if name not in attention_names(site):
        raise ValueError(
            f"'{SITE_KEYS[site]}' is {name!r}; expected one of: {', '.join(attention_names(site))}"
        )
    return ATTENTION_SPECS[name]


def build_attention(name: str, *, site: str, **arguments) -> nn.Module:
    """A new module of variant `name` for `site`, built by its spec's builder from plain arguments:
    `embed_dim`, `num_heads`, `dropout`, `num_levels`, `num_points` and the variant's own options
    (ACT: `q_hashes`, `bucket_width`, `seed`); a builder ignores those it does not use.

    Raises:
        ValueError: an unknown variant for `site`, or a builder that cannot be imported.
    """
    spec = attention_spec(name, site)
    builder = import_builder(spec.builder, f"attention variant {name!r}")
    return builder(**arguments)
