"""Official DINO checkpoints: key layout, architecture inference, variants, the convert tool.

The official key layout is written out here by hand from the official module structure
(IDEA-Research/DINO `models/dino/dino.py`, `deformable_transformer.py`: torchvision ResNet keys under
`backbone.0.body.`, `MSDeformAttn`, packed decoder self-attention, norm1..3, the decoder's
`ref_point_head`, the heads listed under the decoder and the detector, `tgt_embed`, the two-stage
`enc_output*` / `enc_out_*` modules, `label_enc`) and checked against the fixture's key spec.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_lab.checkpoints import CheckpointError, load_checkpoint, load_official
from detr_lab.models.detector import Detector
from detr_lab.models.queries.anchors import LearnedAnchors

from factories import OfficialSpec, forward_padded, load_tool, quick_official_state, share_official_heads

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def official_dino_spec(
    backbone: str = "resnet50", *, points: int = 4, two_stage: bool = True, denoising: bool = True, **sizes
) -> dict[str, list[int]]:
    """Key -> shape of an IDEA-Research/DINO checkpoint, in the official order
    (`points` for every deformable attention; `sizes`: see `OFFICIAL_SIZES`)."""
    spec = OfficialSpec(encoder_points=points, decoder_points=points, **sizes)
    spec.deformable_transformer()
    d, classes, queries, decoder_layers = spec.d, spec.classes, spec.queries, spec.decoder_layers
    spec.norm("transformer.decoder.norm")
    spec.mlp("transformer.decoder.ref_point_head", 2 * d, d, d)
    for j in range(decoder_layers):
        spec.box_mlp(f"transformer.decoder.bbox_embed.{j}")
    for j in range(decoder_layers):
        spec.linear(f"transformer.decoder.class_embed.{j}", classes)
    spec.tensor("transformer.tgt_embed.weight", queries, d)
    if two_stage:
        spec.linear("transformer.enc_output", d)
        spec.norm("transformer.enc_output_norm")
        spec.box_mlp("transformer.enc_out_bbox_embed")
        spec.linear("transformer.enc_out_class_embed", classes)
    else:
        spec.tensor("transformer.refpoint_embed.weight", queries, 4)
    if denoising:
        spec.tensor("label_enc.weight", classes + 1, d)
    width = 64 if backbone in ("resnet18", "resnet34") else 256
    # 4 levels: C3-C5 + one strided level; 5 levels: C2-C5 + one (the official return_interm_indices)
    channels = [width, width * 2, width * 4, width * 8][-min(spec.levels - 1, 4) :]
    for level, in_channels in enumerate(channels):
        spec.input_proj(level, in_channels)
    spec.input_proj(len(channels), channels[-1], kernel=3)
    spec.resnet_backbone(backbone)
    for j in range(decoder_layers):
        spec.box_mlp(f"bbox_embed.{j}")
    for j in range(decoder_layers):
        spec.linear(f"class_embed.{j}", classes)
    return spec.shapes


def quick_state(**kwargs) -> dict[str, torch.Tensor]:
    """Official-layout weights filled fast (`quick_official_state`), aliases holding one tensor as in
    a trained checkpoint with shared heads."""
    state = quick_official_state(official_dino_spec(**kwargs))
    layers = kwargs.get("decoder_layers", 2)
    return share_official_heads(state, layers, shared=True, decoder_aliases_last=True)


def test_spec_writer_matches_the_fixture_spec():
    fixture = torch.load(FIXTURES / "dino_4scale_r50.pt", weights_only=True)
    spec = official_dino_spec(
        hidden=256, ffn=2048, encoder_layers=6, decoder_layers=6, queries=900, classes=91
    )
    assert list(spec.items()) == [(key, list(shape)) for key, shape in fixture["state_dict_spec"]]


@pytest.mark.parametrize(
    ("label", "options", "strides"),
    [
        ("4-scale R18", {"backbone": "resnet18"}, [8, 16, 32, 64]),
        ("5-scale R18", {"backbone": "resnet18", "levels": 5}, [4, 8, 16, 32, 64]),
        ("5-scale R50, 11 queries", {"levels": 5, "queries": 11}, [4, 8, 16, 32, 64]),
        (
            "learned anchors, no denoising",
            {"backbone": "resnet18", "two_stage": False, "denoising": False},
            None,
        ),
        ("3 decoder layers, 2 points", {"backbone": "resnet34", "decoder_layers": 3, "points": 2}, None),
    ],
)
def test_variants_are_inferred_and_run(label, options, strides):
    state = quick_state(heads=4, **options)
    model, cfg = load_official(state, num_heads=4)
    m = cfg.model
    levels = options.get("levels", 4)
    assert isinstance(model, Detector), label
    assert (m.num_feature_levels, m.num_heads, m.hidden_dim, m.ffn_dim) == (levels, 4, 32, 64)
    assert (m.encoder.num_points, m.decoder.num_points) == (options.get("points", 4),) * 2
    assert m.backbone.name == options.get("backbone", "resnet50")
    assert (m.num_queries, m.num_classes, m.decoder.num_layers) == (
        options.get("queries", 7),
        5,
        options.get("decoder_layers", 2),
    )
    assert (m.query_source == "mixed_selection") == options.get("two_stage", True)
    assert m.denoising.enabled == options.get("denoising", True)
    anchors = m.query_source in ("mixed_selection", "learned_anchors")
    assert (anchors, m.share_heads, m.look_forward_twice, m.position_temperature) == (
        True,
        True,
        True,
        20,
    )
    if strides is not None:
        assert model.backbone.strides == strides[: len(model.backbone.strides)]
    outputs = forward_padded(model)
    assert tuple(outputs["pred_logits"].shape) == (1, m.num_queries, 5)
    assert len(outputs["aux_outputs"]) == m.decoder.num_layers - 1
    assert torch.isfinite(outputs["pred_boxes"]).all()
    assert ("enc_outputs" in outputs) == (m.query_source == "mixed_selection")
    if m.query_source != "mixed_selection":
        assert isinstance(model.query_source, LearnedAnchors)
        torch.testing.assert_close(
            model.query_source.anchors.weight, state["transformer.refpoint_embed.weight"]
        )


def test_keys_land_in_the_right_modules():
    state = quick_state(backbone="resnet18")
    model, _ = load_official(state)
    pairs = {
        "query_pos_head.layers.0.weight": "transformer.decoder.ref_point_head.layers.0.weight",
        "query_source.content.weight": "transformer.tgt_embed.weight",
        "query_source.memory_proj.weight": "transformer.enc_output.weight",
        "query_source.class_head.bias": "transformer.enc_out_class_embed.bias",
        "query_source.box_head.layers.2.weight": "transformer.enc_out_bbox_embed.layers.2.weight",
        "denoising.label_embed.weight": "label_enc.weight",
        "class_embed.weight": "class_embed.1.weight",
        "bbox_embed.layers.0.bias": "bbox_embed.1.layers.0.bias",
        "transformer.decoder.layers.1.cross_attn_norm.weight": "transformer.decoder.layers.1.norm1.weight",
        "transformer.decoder.layers.1.self_attn_norm.weight": "transformer.decoder.layers.1.norm2.weight",
        "transformer.decoder.norm.bias": "transformer.decoder.norm.bias",
    }
    ours = model.state_dict()
    for detr_lab_key, official_key in pairs.items():
        torch.testing.assert_close(ours[detr_lab_key], state[official_key])
    q, k, v = state["transformer.decoder.layers.0.self_attn.in_proj_weight"].chunk(3)
    torch.testing.assert_close(ours["transformer.decoder.layers.0.self_attn.v_proj.weight"], v)


def test_unshared_heads_keep_each_layer(recwarn):
    state = quick_state(backbone="resnet18")
    state["class_embed.0.weight"] = state["class_embed.0.weight"] + 1.0
    state["transformer.decoder.class_embed.0.weight"] = state["class_embed.0.weight"]
    model, cfg = load_official(state, share_heads=False)
    assert not cfg.model.share_heads and len(model.class_embed) == 2
    torch.testing.assert_close(model.class_embed[0].weight, state["class_embed.0.weight"])


def test_bad_checkpoints_are_errors():
    state = quick_state(backbone="resnet18")
    with pytest.raises(CheckpointError, match="num_queries=3 given"):
        load_official(state, num_queries=3)
    broken = dict(state)
    del broken["input_proj.3.0.weight"]
    with pytest.raises(CheckpointError, match=r"missing \(e.g. neck.input_proj.3.0.weight\)"):
        load_official(broken)
    extra = dict(state, **{"transformer.decoder.mystery.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="mystery"):
        load_official(extra)


def test_checkpoint_files_and_the_convert_tool(tmp_path, capsys):
    state = quick_state(backbone="resnet18", classes=91, decoder_layers=1)
    source = tmp_path / "checkpoint0011_4scale.pth"
    torch.save({"model": state, "epoch": 11}, source)
    loaded = load_checkpoint(source)
    assert loaded.config.model.query_source == "mixed_selection" and loaded.class_names[1] == "person"
    tool = load_tool("convert_checkpoint")
    destination = tmp_path / "converted.pt"
    assert tool.main([str(source), str(destination), "--num-queries", "7"]) == 0
    assert "wrote" in capsys.readouterr().out
    converted = load_checkpoint(destination)
    assert converted.config.model.num_detections == 300 and converted.config.model.denoising.enabled
    torch.testing.assert_close(
        converted.model.query_source.content.weight, state["transformer.tgt_embed.weight"]
    )
    outputs = forward_padded(converted.model)
    assert outputs["pred_logits"].shape == (1, 7, 91)
