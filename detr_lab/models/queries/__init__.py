"""Query sources: how the decoder's object queries are made, and the spec table everything else reads.

Each source is a module that turns the encoder output into a `QuerySet` (`query_set.py`): content
queries `[B, Q, d]`, their reference points or boxes (normalized, or None), a self-attention mask
(or None), a meta dict (e.g. `enc_outputs`) and, for sources with fixed position embeddings,
`query_pos`. Call contract: `source(encoded)`, and `source(encoded, (class_head, box_head))` for
sources whose spec has `proposal_heads`.

`QUERY_SOURCES` is `model.query_source`'s table: the builder and the properties the rest of the
model (decoder, head, criterion, monitors, config validation) depends on. A new source is one module
plus one line here; nothing else tests a source's name.

- "learned" (`learned.LearnedQueries`): DETR's learned position embeddings with zero content.
- "learned_points" (`learned.LearnedPointQueries`): one-stage Deformable DETR; embeddings split
  into position and content, reference points predicted from the position part.
- "proposals" (`two_stage.TwoStageQueries`): two-stage Deformable DETR; the best encoder
  proposals give reference boxes, position and content.
- "learned_anchors" (`anchors.LearnedAnchors`): learned content and 4-D anchor boxes (DAB-DETR).
- "mixed_selection" (`mixed.MixedQuerySelection`): DINO's mixed query selection.
- "iou_aware" (`mixed.MixedQuerySelection` with selected content): RT-DETR's query selection, the
  top-K proposals' features as content queries and their boxes as anchors.

Extra sources that use the targets in training (`denoising.ContrastiveDenoising`) are placed before
the matching queries by the detector.

This module is pure data (no torch import), read by `detr_lab.config`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuerySourceSpec:
    """What the rest of the model needs to know about one query source.

    Attributes:
        builder: "module:function"; the function takes keyword arguments `embed_dim`, `num_queries`,
            `class_head`, `box_head` (fresh heads like the decoder's, for sources that score encoder
            proposals with their own heads) and ignores those it does not use.
        box_dim: 0 (no reference: boxes predicted absolutely), 2 (reference points (x, y)) or 4
            (reference boxes (cx, cy, w, h)); boxes are predicted relative to the reference.
        reference_attention: the decoder cross-attention must sample around reference points
            (its attention spec's `reference_points`), e.g. deformable attention.
        position_from_boxes: each decoder layer makes its `query_pos` from its current boxes (the
            anchor-box decoder of DAB-DETR / DINO / RT-DETR, boxes refined every layer).
        position_head: with `position_from_boxes`, the head that makes it (`embedding.POSITION_HEADS`):
            "anchor_sine" (DAB / DINO: an MLP of the boxes' sine embedding) or "box_mlp" (RT-DETR: an
            MLP of the boxes themselves).
        proposal_heads: the source scores encoder proposals with the decoder's extra head pair
            (two-stage Deformable DETR: one more class / box head after the decoder layers').
        proposals: the encoder-proposal prediction group it returns (`enc_outputs`): None,
            "agnostic" (class-agnostic targets) or "classes" (real classes).
        ranked_slots: query slots are proposals ranked by score, so a few slots taking most matches
            is expected (the query-usage monitor does not warn).
        needs_refinement: the source needs iterative box refinement (`model.box_refine`).
        logit_eps: the clamp of the inverse sigmoid in box refinement (Deformable DETR 1e-5, DINO 1e-3).
        final_decoder_norm: the decoder applies a final LayerNorm to every layer's output whatever its
            cross-attention's spec says (the DAB / DINO decoder).
        sine_offset: the sine position encoding's pixel offset for multi-scale inputs (None: the
            Deformable DETR half pixel, -0.5; DINO's official encoding has none, 0.0).
    """

    builder: str
    box_dim: int
    reference_attention: bool = False
    position_from_boxes: bool = False
    position_head: str = "anchor_sine"
    proposal_heads: bool = False
    proposals: str | None = None
    ranked_slots: bool = False
    needs_refinement: bool = False
    logit_eps: float = 1e-5
    final_decoder_norm: bool = False
    sine_offset: float | None = None


QUERY_SOURCES: dict[str, QuerySourceSpec] = {
    "learned": QuerySourceSpec("detr_lab.models.queries.learned:build_learned", box_dim=0),
    "learned_points": QuerySourceSpec(
        "detr_lab.models.queries.learned:build_learned_points", box_dim=2, reference_attention=True
    ),
    "proposals": QuerySourceSpec(
        "detr_lab.models.two_stage:build",
        box_dim=4,
        reference_attention=True,
        proposal_heads=True,
        proposals="agnostic",
        ranked_slots=True,
        needs_refinement=True,
    ),
    "learned_anchors": QuerySourceSpec(
        "detr_lab.models.queries.anchors:build",
        box_dim=4,
        position_from_boxes=True,
        needs_refinement=True,
        logit_eps=1e-3,
        final_decoder_norm=True,
        sine_offset=0.0,
    ),
    "mixed_selection": QuerySourceSpec(
        "detr_lab.models.queries.mixed:build",
        box_dim=4,
        position_from_boxes=True,
        proposals="classes",
        ranked_slots=True,
        needs_refinement=True,
        logit_eps=1e-3,
        final_decoder_norm=True,
        sine_offset=0.0,
    ),
    "iou_aware": QuerySourceSpec(
        "detr_lab.models.queries.mixed:build_selected",
        box_dim=4,
        reference_attention=True,
        position_from_boxes=True,
        position_head="box_mlp",
        proposals="classes",
        ranked_slots=True,
        needs_refinement=True,
    ),
}


def query_source_spec(name: str) -> QuerySourceSpec:
    """The spec of source `name`.

    Raises:
        ValueError: an unknown name (the message names the config key and the known names).
    """
    if name not in QUERY_SOURCES:
        raise ValueError(f"'model.query_source' is {name!r}; expected one of: {', '.join(QUERY_SOURCES)}")
    return QUERY_SOURCES[name]


def resolved_query_source(name: str | None, reference_attention: bool) -> str:
    """`model.query_source`, or for null the natural source of the decoder: "learned_points" when its
    cross-attention takes reference points (deformable), else "learned" (DETR)."""
    if name is not None:
        return name
    return "learned_points" if reference_attention else "learned"
