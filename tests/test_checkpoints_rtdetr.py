"""The released RT-DETRv2 sizes without an official-output fixture: R101 (a 384-wide hybrid encoder with
FFN 2048, projected to the 256-wide decoder) and R50-m (R50 with the half-width CSP fusion, evaluated
with 3 of its 6 decoder layers). Their official key layouts are derived from the official R50 and R18
layouts of the fixtures (key order and shapes as the official modules give them), filled with noise;
`load_official` must infer the architecture and the model must load every key and run."""

from __future__ import annotations

import re

import pytest
import torch

from detr_lab.checkpoints import load_official
from detr_lab.io import CheckpointError

from factories import FIXTURES, quick_official_state

R50_FIXTURE = FIXTURES / "rtdetr_variants" / "rtdetrv2_r50vd.pt"
R50 = dict(torch.load(R50_FIXTURE, weights_only=True)["state_dict_spec"])
R18 = dict(torch.load(FIXTURES / "rtdetrv2_r18vd.pt", weights_only=True)["state_dict_spec"])


def _r101_spec() -> dict[str, list[int]]:
    """R50 -> R101: 23 blocks in the third stage (blocks 6..22 shaped as block 1) and the encoder at width
    384 (its 256 / 512 / 768 dims become 384 / 768 / 1152, the AIFI FFN 2048), the decoder's input
    projections 384 -> 256."""
    spec: dict[str, list[int]] = {}
    widen = {256: 384, 512: 768, 768: 1152, 1024: 2048}
    for key, shape in R50.items():
        if key.startswith("encoder."):
            if key.startswith("encoder.input_proj.") and key.endswith("conv.weight"):
                shape = [384, *shape[1:]]  # backbone channels in, width out
            else:
                shape = [widen.get(size, size) for size in shape]
        if re.fullmatch(r"decoder\.input_proj\.\d+\.conv\.weight", key):
            shape = [shape[0], 384, *shape[2:]]
        spec[key] = shape
        if key == _last_key("backbone.res_layers.2.blocks.5."):
            for block in range(6, 23):
                for source, block_shape in R50.items():
                    if source.startswith("backbone.res_layers.2.blocks.1."):
                        spec[source.replace("blocks.1.", f"blocks.{block}.")] = block_shape
    return spec


def _last_key(prefix: str) -> str:
    return [key for key in R50 if key.startswith(prefix)][-1]


def _r50m_spec() -> dict[str, list[int]]:
    """R50 with R18's hybrid encoder (expansion 0.5, width 256), its input projections taking R50's
    channels (512, 1024, 2048)."""
    spec = {key: shape for key, shape in R50.items() if key.startswith("backbone.")}
    channels = [512, 1024, 2048]
    for key, shape in R18.items():
        if key.startswith("encoder."):
            if m := re.fullmatch(r"encoder\.input_proj\.(\d)\.conv\.weight", key):
                shape = [shape[0], channels[int(m.group(1))], *shape[2:]]
            spec[key] = shape
    spec.update({key: shape for key, shape in R50.items() if key.startswith("decoder.")})
    return spec


def _state(spec: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Noise of the spec's shapes, with the architecture constant `num_points_scale` at its official
    value (1/4 for each of 4 points on 3 levels)."""
    state = quick_official_state(spec)
    for key in state:
        if key.endswith("num_points_scale"):
            state[key] = torch.full_like(state[key], 0.25)
    return state


@pytest.mark.slow  # builds a full-size R101 model
def test_r101_is_inferred_and_runs():
    model, cfg = load_official(_state(_r101_spec()))
    m = cfg.model
    assert (m.backbone.name, m.backbone.norm, m.backbone.freeze_stem) == ("resnet101", "frozen_bn", True)
    neck = m.neck.options
    assert (neck["width"], neck["ffn_dim"], m.hidden_dim, m.ffn_dim) == (384, 2048, 256, 1024)
    assert m.decoder.num_layers == 6 and m.decoder.eval_layers is None
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 160, 160), torch.zeros(1, 160, 160, dtype=torch.bool))
    assert outputs["pred_boxes"].shape == (1, 300, 4) and torch.isfinite(outputs["pred_logits"]).all()


def test_r50m_evaluates_with_three_of_six_layers():
    model, cfg = load_official(_state(_r50m_spec()))
    m = cfg.model
    assert (m.backbone.name, m.neck.options["expansion"], m.neck.options["width"]) == ("resnet50", 0.5, 256)
    assert (m.decoder.num_layers, m.decoder.eval_layers) == (6, 3)
    images, mask = torch.rand(1, 3, 160, 160), torch.zeros(1, 160, 160, dtype=torch.bool)
    with torch.no_grad():
        short = model(images, mask)
        model.eval_layers = None
        full = model(images, mask)
    assert len(short["aux_outputs"]) == 2 and len(full["aux_outputs"]) == 5
    assert torch.equal(short["pred_boxes"], full["aux_outputs"][2]["pred_boxes"])
    # the override wins over the inference
    _, cfg = load_official(_state(_r50m_spec()), eval_layers=6)
    assert cfg.model.decoder.eval_layers == 6


def test_point_scales_that_are_not_the_official_runs_are_refused():
    state = _state(_r50m_spec())
    state["decoder.decoder.layers.0.cross_attn.num_points_scale"][5] = 0.5
    with pytest.raises(CheckpointError, match="not runs of 1/n repeated n times"):
        load_official(state)
