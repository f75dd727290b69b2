"""HGNetv2 variants B0..B6 and their state-dict key layouts; official D-FINE backbone keys -> detr_lab's.

The network is timm's `HighPerfGpuNet` (timm/models/hgnet.py) built from timm's per-variant table
`model_cfgs`. Measured against the official D-FINE `HGNetv2` (Peterande/D-FINE,
src/nn/backbone/hgnetv2.py, after PaddleDetection's PP-HGNetv2) with the same synthetic weights, B0..B6
with and without learnable affine blocks, float64, a 97 x 131 input: the four stage outputs are
identical (difference 0.0; tests/fixtures/hgnetv2/make_fixture.py --compare). Both trees also name
their modules alike (`stem.stem1.conv`, `stages.2.blocks.0.layers.1.conv2.lab`, ...), so the official
keys are detr_lab's keys. The one difference is in timm's entry points, not the network:
`timm.create_model("hgnetv2_b0".."hgnetv2_b3")` always builds the affine blocks (it passes
`use_lab=True` itself, so `use_lab=False` is refused), whereas the official module takes `use_lab`
for every variant. `hgnetv2_network` therefore builds `HighPerfGpuNet` from the table directly.

Layouts here leave out `num_batches_tracked`: the official checkpoints have it only with trainable
batch norm (`freeze_norm: False`), and no output depends on it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from functools import cache

from timm.models.hgnet import HighPerfGpuNet, model_cfgs
from torch import Tensor

from detr_lab.io import CheckpointError

HGNETV2_NAMES = tuple(f"hgnetv2_b{index}" for index in range(7))
# The variants whose timm entry point and D-FINE config (N, S: B0; M: B2) use learnable affine blocks.
LAB_BY_DEFAULT = frozenset(HGNETV2_NAMES[:4])
STAGE_STRIDES = (4, 8, 16, 32)  # of stages 0..3 (the official `return_idx`); the stem has stride 4


def check_hgnetv2_name(name: str) -> str:
    """`name` if it is one of `HGNETV2_NAMES`; ValueError listing them (and the closest) otherwise."""
    if name in HGNETV2_NAMES:
        return name
    # the official configs' spelling ('B4') or a near miss
    wanted = f"hgnetv2_{name.lower()}" if re.fullmatch(r"[bB]\d", name) else name
    close = difflib.get_close_matches(wanted, HGNETV2_NAMES, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"unknown HGNetv2 variant {name!r}; expected one of: {', '.join(HGNETV2_NAMES)}{hint}")


def hgnetv2_network(name: str, use_lab: bool, device: str | None = None) -> HighPerfGpuNet:
    """timm's HGNetv2 `name` without a classifier (no head parameters): `.stem` (stride 4) and
    `.stages` (four stages, strides 4, 8, 16, 32), with `use_lab` chosen freely for every variant."""
    cfg = model_cfgs[check_hgnetv2_name(name)]
    return HighPerfGpuNet(cfg, use_lab=use_lab, num_classes=0, head_hidden_size=None, device=device)


@cache
def _layout(name: str, use_lab: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
    state = hgnetv2_network(name, use_lab, device="meta").state_dict()
    return tuple((k, tuple(v.shape)) for k, v in state.items() if not k.endswith(".num_batches_tracked"))


def hgnetv2_layout(name: str, use_lab: bool) -> dict[str, tuple[int, ...]]:
    """key -> shape of the state dict of the stem and all four stages, in module order, without
    `num_batches_tracked`: the official `HGNetv2`'s keys and detr_lab's `HGNetv2Backbone`'s alike."""
    return dict(_layout(check_hgnetv2_name(name), use_lab))


def _differences(state: Mapping[str, Tensor], layout: dict[str, tuple[int, ...]]) -> list[str]:
    missing = [k for k in layout if k not in state]
    unexpected = [k for k in state if k not in layout]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {layout[k]}"
        for k in layout
        if k in state and tuple(state[k].shape) != layout[k]
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {label}, e.g. {keys[:4]}")
    return problems


def _closest_variant(state: Mapping[str, Tensor], use_lab: bool) -> str:
    """The variant whose layout differs from `state`'s keys and shapes in the fewest keys."""

    def distance(name: str) -> int:
        layout = hgnetv2_layout(name, use_lab)
        shared = [k for k in layout if k in state and tuple(state[k].shape) == layout[k]]
        return len(layout) + len(state) - 2 * len(shared)

    return min(HGNETV2_NAMES, key=distance)


def infer_hgnetv2(state: Mapping[str, Tensor]) -> tuple[str, bool]:
    """(variant name, use_lab) of an official HGNetv2 state dict (keys relative to the backbone):
    use_lab from the presence of `lab.scale` keys, the variant from the layout the keys and shapes
    match exactly. Raises CheckpointError, naming the keys that differ from the closest variant, when
    none matches."""
    use_lab = any(k.endswith(".lab.scale") for k in state)
    name = _closest_variant(state, use_lab)
    official_hgnetv2_state_dict(state, name=name, use_lab=use_lab)
    return name, use_lab


def official_hgnetv2_state_dict(
    official_backbone_sd: Mapping[str, Tensor], *, name: str | None = None, use_lab: bool | None = None
) -> dict[str, Tensor]:
    """An official D-FINE / DEIM `HGNetv2` state dict -> the state dict of detr_lab's `HGNetv2Backbone`.

    Contract. Input: the official backbone's keys with no `backbone.` prefix, i.e. a D-FINE
    checkpoint's `backbone.*` entries with that prefix removed, or a `PPHGNetV2_B*_stage1.pth` file
    as it is: `stem.stem{1,2a,2b,3,4}.{conv,bn,lab}.*`, `stages.{s}.downsample.{conv,bn}.*` (s >= 1),
    `stages.{s}.blocks.{b}.layers.{i}.{conv,bn,lab}.*` (stages 0, 1) or
    `stages.{s}.blocks.{b}.layers.{i}.conv{1,2}.{conv,bn,lab}.*` (light blocks, stages 2, 3) and
    `stages.{s}.blocks.{b}.aggregation.{0,1}.{conv,bn,lab}.*`; batch norm as `weight`, `bias`,
    `running_mean`, `running_var`, with or without `num_batches_tracked` (trainable or frozen norm);
    `lab.scale` / `lab.bias` (shape [1]) only with use_lab. Output: the same tensors (not copies)
    under the same names, relative to the backbone module (no `backbone.` prefix), in detr_lab's
    module order, for the stem and all four stages, without `num_batches_tracked` (detr_lab's
    FrozenBatchNorm2d has none; a trainable BatchNorm2d starts its counter at 0). A backbone built
    with fewer stages keeps the keys of the stages it has. Every input key is consumed exactly once.

    Args:
        official_backbone_sd: the official backbone state dict (key -> tensor).
        name: the variant (`hgnetv2_b0`..`hgnetv2_b6`) the keys must describe; None: inferred.
        use_lab: whether they hold learnable affine blocks; None: inferred from `lab.scale` keys.
    Raises:
        CheckpointError: a key the layout of (name, use_lab) lacks (unexpected), one it needs and the
            input lacks (missing), or a shape that differs; the message names them.
        ValueError: an unknown variant name.
    """
    state = {k: v for k, v in official_backbone_sd.items() if not k.endswith(".num_batches_tracked")}
    if use_lab is None:
        use_lab = any(k.endswith(".lab.scale") for k in state)
    name = _closest_variant(state, use_lab) if name is None else check_hgnetv2_name(name)
    layout = hgnetv2_layout(name, use_lab)
    problems = _differences(state, layout)
    if problems:
        if any(k.startswith("backbone.") for k in state):
            problems.append("remove the 'backbone.' prefix of a detector checkpoint's keys first")
        raise CheckpointError(
            f"not an official HGNetv2 {name} state dict (use_lab={use_lab}, keys relative to the "
            f"backbone): {'; '.join(problems)}"
        )
    return {key: state[key] for key in layout}
