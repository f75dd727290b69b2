"""Prediction groups: the sets of predictions a detector's output holds, and how each is scored.

A detector declares its groups when it is built (`Detector.groups`); the criterion loops over them.

| kind | where in the outputs | matching | suffix |
|---|---|---|---|
| main | `pred_logits` / `pred_boxes` (final decoder layer) | Hungarian | "" |
| aux | `aux_outputs[i]` (earlier decoder layers, shallowest first) | Hungarian | `_i` |
| enc | `enc_outputs` (encoder proposals; class-agnostic for two-stage Deformable DETR) | Hungarian | `_enc` |
| pre | `pre_outputs` (D-FINE: the first decoder layer's plain box head) | Hungarian | `_pre` |
| dn | `dn_outputs` and its `aux_outputs[i]` (denoising queries) | given by `dn_meta` | `_dn`, `_dn_i` |

With D-FINE's distribution refinement the denoising queries also have a pre group (`dn_pre_outputs`,
kind "pre", matching "denoising", suffix `_dn_pre`).

A new kind (e.g. one-to-many queries) is one more row: a place in the outputs, a matching rule and
a suffix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

MATCHINGS = ("hungarian", "denoising")


@dataclass(frozen=True)
class PredictionGroup:
    """One group of predictions.

    Attributes:
        kind: "main", "aux", "pre", "enc" or "dn" (loss terms list the kinds they apply to).
        path: keys / list indices leading from the outputs to the group's dict of `pred_logits`
            `[B, Q, C]` and `pred_boxes` `[B, Q, 4]` (normalized cxcywh); () is the outputs themselves.
        suffix: appended to the names of its loss values.
        matching: "hungarian" (the matcher pairs queries and targets) or "denoising" (query j of group
            g is object j: indices from the `DenoisingLayout` in `outputs["dn_meta"]`).
        class_agnostic: every target counts as class 0 (two-stage Deformable DETR proposals).
        log: also compute the logging-only values of the final layer (`class_error`).
    """

    kind: str
    path: tuple[str | int, ...]
    suffix: str
    matching: str = "hungarian"
    class_agnostic: bool = False
    log: bool = False


def group_predictions(outputs: Mapping, group: PredictionGroup) -> Mapping | None:
    """The group's predictions in `outputs`, or None when the outputs do not hold them."""
    node = outputs
    for key in group.path:
        if isinstance(key, int):
            if not isinstance(node, list | tuple) or key >= len(node):
                return None
            node = node[key]
        else:
            if not isinstance(node, Mapping) or key not in node:
                return None
            node = node[key]
    return node


def main_groups(
    num_aux_layers: int, *, proposals: str | None = None, pre: bool = False
) -> list[PredictionGroup]:
    """The final layer, `num_aux_layers` auxiliary layers, the first layer's plain prediction (`pre`,
    D-FINE) and the encoder proposals: `proposals` is None (none), "agnostic" (class-agnostic, two-stage
    Deformable DETR) or "classes" (DINO)."""
    groups = [PredictionGroup("main", (), "", log=True)]
    groups += [PredictionGroup("aux", ("aux_outputs", i), f"_{i}") for i in range(num_aux_layers)]
    if pre:
        groups.append(PredictionGroup("pre", ("pre_outputs",), "_pre"))
    if proposals is not None:
        if proposals not in ("agnostic", "classes"):
            raise ValueError(f"proposals must be None, 'agnostic' or 'classes', got {proposals!r}")
        groups.append(
            PredictionGroup("enc", ("enc_outputs",), "_enc", class_agnostic=proposals == "agnostic")
        )
    return groups


def denoising_groups(num_aux_layers: int, *, pre: bool = False) -> list[PredictionGroup]:
    """The denoising queries' final layer (`_dn`), auxiliary layers (`_dn_i`) and, with `pre`, the
    first layer's plain prediction (`_dn_pre`)."""
    groups = [PredictionGroup("dn", ("dn_outputs",), "_dn", matching="denoising")]
    groups += [
        PredictionGroup("dn", ("dn_outputs", "aux_outputs", i), f"_dn_{i}", matching="denoising")
        for i in range(num_aux_layers)
    ]
    if pre:
        groups.append(PredictionGroup("pre", ("dn_pre_outputs",), "_dn_pre", matching="denoising"))
    return groups
