"""Official Deformable DETR checkpoints: architecture inference, key mapping, variants, errors.

The official key layout is written out here by hand from the official module structure
(torchvision ResNet keys under `backbone.0.body.`, `MSDeformAttn` parameters, the decoder's packed
self-attention, norm1..3, per-layer heads and their decoder aliases) and checked against the key
specs stored in the fixtures; weights come from the fixtures' deterministic `synth_state_dict`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_lab.checkpoints import (
    CheckpointError,
    CheckpointWarning,
    convert_official,
    load_checkpoint,
    load_official,
)
from detr_lab.models.attention.deformable import MultiScaleDeformableAttention

from factories import (
    OfficialSpec,
    forward_padded,
    load_synth_weights,
    load_tool,
    quick_official_state,
    share_official_heads,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


synth = load_synth_weights()


def official_deformable_spec(
    backbone: str = "resnet50", *, box_refine: bool = False, two_stage: bool = False, **sizes: int
) -> dict[str, list[int]]:
    """Key -> shape of a fundamentalvision/Deformable-DETR checkpoint, in the official order
    (`sizes`: see `OFFICIAL_SIZES`)."""
    spec = OfficialSpec(**sizes)
    d, classes, levels = spec.d, spec.classes, spec.levels
    spec.deformable_transformer()
    num_heads = spec.decoder_layers + (1 if two_stage else 0)
    if box_refine:
        for j in range(num_heads):
            spec.box_mlp(f"transformer.decoder.bbox_embed.{j}")
    if two_stage:
        for j in range(num_heads):
            spec.linear(f"transformer.decoder.class_embed.{j}", classes)
        spec.linear("transformer.enc_output", d)
        spec.norm("transformer.enc_output_norm")
        spec.linear("transformer.pos_trans", 2 * d, 2 * d)
        spec.norm("transformer.pos_trans_norm", 2 * d)
    else:
        spec.linear("transformer.reference_points", 2)
    for j in range(num_heads):
        spec.linear(f"class_embed.{j}", classes)
    for j in range(num_heads):
        spec.box_mlp(f"bbox_embed.{j}")
    if not two_stage:
        spec.tensor("query_embed.weight", spec.queries, 2 * d)
    width = 64 if backbone in ("resnet18", "resnet34") else 256
    # C3-C5 (Deformable DETR), C5 alone (single-scale); two levels take C4-C5 as detr_lab builds them
    channels = [width * 2, width * 4, width * 8][-min(levels, 3) :]
    for level, in_channels in enumerate(channels):
        spec.input_proj(level, in_channels)
    in_channels = channels[-1]
    for level in range(len(channels), levels):
        spec.input_proj(level, in_channels, kernel=3)
        in_channels = d
    spec.resnet_backbone(backbone)
    return spec.shapes


def quick_state(**kwargs) -> dict[str, torch.Tensor]:
    """Official-layout weights filled fast (`quick_official_state`), aliases kept identical as in a
    trained checkpoint (the official model stores one tensor under each alias)."""
    state = quick_official_state(official_deformable_spec(**kwargs))
    shared = not kwargs.get("box_refine", False)
    return share_official_heads(
        state, kwargs.get("decoder_layers", 2), shared=shared, decoder_aliases_last=False
    )


@pytest.mark.parametrize("name", ["deformable_detr_r50", "deformable_detr_r50_refine_twostage"])
def test_spec_writer_matches_the_fixture_specs(name):
    fixture = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    refine = name.endswith("twostage")
    spec = official_deformable_spec(
        hidden=256,
        ffn=1024,
        encoder_layers=6,
        decoder_layers=6,
        queries=300,
        classes=91,
        box_refine=refine,
        two_stage=refine,
    )
    assert list(spec.items()) == [(key, list(shape)) for key, shape in fixture["state_dict_spec"]]


# ------------------------------------------------------------------------------------- variants
@pytest.mark.parametrize(
    ("label", "options", "overrides", "strides"),
    [
        ("single-scale", {"backbone": "resnet18", "levels": 1}, {}, [32]),
        ("single-scale DC5", {"levels": 1}, {"dilation": True}, [16]),
        ("multi-scale R18", {"backbone": "resnet18", "queries": 11}, {}, [8, 16, 32, 64]),
        ("box refine", {"backbone": "resnet18", "box_refine": True}, {}, [8, 16, 32, 64]),
        (
            "three levels, 2 points",
            {"backbone": "resnet34", "levels": 3, "encoder_points": 2, "decoder_points": 3},
            {},
            [8, 16, 32],
        ),
    ],
)
def test_variants_are_inferred_and_run(label, options, overrides, strides):
    state = quick_state(heads=4, **options)
    model, cfg = load_official(state, num_heads=4, **overrides)
    m = cfg.model
    levels = options.get("levels", 4)
    assert (m.num_feature_levels, m.num_heads, m.hidden_dim, m.ffn_dim) == (levels, 4, 32, 64)
    assert m.encoder.num_points == options.get("encoder_points", 4)
    assert m.decoder.num_points == options.get("decoder_points", 4)
    assert (m.backbone.name, m.backbone.dilation) == (
        options.get("backbone", "resnet50"),
        "dilation" in overrides,
    )
    assert (m.box_refine, m.query_source == "proposals", m.classification) == (
        options.get("box_refine", False),
        False,
        "sigmoid",
    )
    assert (m.num_queries, m.num_classes, m.encoder.num_layers, m.decoder.num_layers) == (
        options.get("queries", 7),
        5,
        1,
        2,
    )
    assert len(strides) == levels and model.backbone.strides == strides[: len(model.backbone.strides)]
    outputs = forward_padded(model)
    size = 128
    expected_tokens = sum((-(-size // s)) ** 2 for s in strides)
    assert outputs["memory"].shape[1] == expected_tokens, label
    assert tuple(outputs["pred_logits"].shape) == (1, m.num_queries, 5) and len(outputs["aux_outputs"]) == 1
    assert torch.isfinite(outputs["pred_boxes"]).all() and "enc_outputs" not in outputs
    torch.testing.assert_close(model.query_source.query_embed.weight, state["query_embed.weight"])


def test_heads_default_to_eight_and_points_follow_from_them():
    state = quick_state(backbone="resnet18", levels=2, encoder_points=3)
    _, cfg = load_official(state)
    assert (cfg.model.num_heads, cfg.model.encoder.num_points, cfg.model.decoder.num_points) == (8, 3, 4)
    with pytest.raises(CheckpointError, match=r"sampling_offsets.weight' has 96 rows.*pass num_heads"):
        load_official(state, num_heads=16)  # 2 levels * 3 points * 2 * 8 heads = 96: not 16 heads


def test_two_stage_query_count_defaults_to_300_and_takes_an_override():
    state = quick_state(backbone="resnet18", box_refine=True, two_stage=True, decoder_layers=1)
    cfg, _ = convert_official(state)
    assert (cfg.model.num_queries, cfg.model.query_source, cfg.model.box_refine) == (300, "proposals", True)
    model, cfg = load_official(state, num_queries=20)
    assert cfg.model.num_queries == 20 and model.query_source.num_queries == 20
    outputs = forward_padded(model)
    assert tuple(outputs["pred_boxes"].shape) == (1, 20, 4) and outputs["aux_outputs"] == []
    tokens = outputs["memory"].shape[1]
    assert tuple(outputs["enc_outputs"]["pred_logits"].shape) == (1, tokens, 5)
    # the proposal head is the (num_decoder_layers)-th one, the last of the official list
    torch.testing.assert_close(model.class_embed[1].weight, state["class_embed.1.weight"])
    torch.testing.assert_close(
        model.query_source.query_proj.weight, state["transformer.pos_trans.weight"]
    )


# ----------------------------------------------------------------------------------- key mapping
def test_keys_land_in_the_right_modules():
    state = quick_state(backbone="resnet18", box_refine=True, decoder_layers=2)
    model, _ = load_official(state)
    d = 32
    encoder = model.transformer.encoder.layers[0]
    decoder = model.transformer.decoder.layers[1]
    assert isinstance(decoder.cross_attn, MultiScaleDeformableAttention)
    official = "transformer.decoder.layers.1"
    expected = [
        (
            encoder.self_attn.sampling_offsets.weight,
            "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
        ),
        (encoder.self_attn_norm.weight, "transformer.encoder.layers.0.norm1.weight"),
        (encoder.ffn_norm.bias, "transformer.encoder.layers.0.norm2.bias"),
        (encoder.ffn.linear1.weight, "transformer.encoder.layers.0.linear1.weight"),
        (decoder.cross_attn.attention_weights.bias, f"{official}.cross_attn.attention_weights.bias"),
        (decoder.cross_attn.value_proj.weight, f"{official}.cross_attn.value_proj.weight"),
        # the official decoder layer: self-attention -> norm2, cross-attention -> norm1, FFN -> norm3
        (decoder.self_attn_norm.weight, f"{official}.norm2.weight"),
        (decoder.cross_attn_norm.weight, f"{official}.norm1.weight"),
        (decoder.ffn_norm.bias, f"{official}.norm3.bias"),
        (decoder.self_attn.out_proj.weight, f"{official}.self_attn.out_proj.weight"),
        (decoder.ffn.linear2.weight, f"{official}.linear2.weight"),
        (model.transformer.level_embed, "transformer.level_embed"),
        (model.query_source.reference_points_head.weight, "transformer.reference_points.weight"),
        (model.class_embed[1].bias, "class_embed.1.bias"),
        (model.bbox_embed[0].layers[2].weight, "bbox_embed.0.layers.2.weight"),
        (model.neck.input_proj[3][0].weight, "input_proj.3.0.weight"),
        (model.neck.input_proj[1][1].bias, "input_proj.1.1.bias"),
        (model.backbone.body.layer3[1].bn2.running_var, "backbone.0.body.layer3.1.bn2.running_var"),
    ]
    for tensor, key in expected:
        torch.testing.assert_close(tensor, state[key], msg=key)
    packed = state[f"{official}.self_attn.in_proj_weight"]
    torch.testing.assert_close(decoder.self_attn.q_proj.weight, packed[:d])
    torch.testing.assert_close(decoder.self_attn.v_proj.weight, packed[2 * d :])
    assert model.transformer.decoder.norm is None


def test_shared_heads_without_refinement_become_one_module():
    state = quick_state(backbone="resnet18", decoder_layers=3)
    model, cfg = load_official(state)
    assert not cfg.model.box_refine
    assert isinstance(model.class_embed, torch.nn.Linear)  # one head for every layer
    torch.testing.assert_close(model.class_embed.weight, state["class_embed.2.weight"])
    # the official model loads its layers' copies of a shared head in order: the last one stays
    state["class_embed.0.weight"] = torch.zeros_like(state["class_embed.0.weight"])
    state["class_embed.2.bias"] = torch.full_like(state["class_embed.2.bias"], 3.0)
    # three copies now differ from the last layer's: the weight of layer 0, the biases of layers 0 and 1
    with pytest.warns(
        CheckpointWarning, match=r"3 official key\(s\) alias a shared head.*class_embed.0.weight"
    ):
        model, _ = load_official(state)
    assert model.class_embed.bias.eq(3.0).all()


def test_decoder_aliases_lose_to_the_detector_heads():
    state = quick_state(backbone="resnet18", box_refine=True)
    state["transformer.decoder.bbox_embed.1.layers.0.bias"] = torch.zeros(32)
    with pytest.warns(CheckpointWarning, match="transformer.decoder.bbox_embed.1.layers.0.bias"):
        model, _ = load_official(state)
    torch.testing.assert_close(model.bbox_embed[1].layers[0].bias, state["bbox_embed.1.layers.0.bias"])


# --------------------------------------------------------------------------------------- errors
def test_unmapped_and_unfilled_keys_are_errors():
    state = quick_state(backbone="resnet18")
    extra = {
        **state,
        "transformer.encoder.layers.0.norm3.weight": torch.ones(32),
        "transformer.extra": torch.ones(1),
    }
    with pytest.raises(CheckpointError, match=r"2 official Deformable DETR key\(s\) have no place"):
        load_official(extra)
    missing = {k: v for k, v in state.items() if k != "transformer.reference_points.bias"}
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. query_source\.reference_points_head"):
        load_official(missing)
    alias = {**quick_state(backbone="resnet18", box_refine=True)}
    del alias["bbox_embed.0.layers.0.weight"]
    with pytest.raises(CheckpointError, match="no counterpart 'bbox_embed.0.layers.0.weight'"):
        load_official(alias)


def test_inconsistent_layouts_are_errors():
    state = quick_state(backbone="resnet18")
    with pytest.raises(
        CheckpointError, match="num_queries=300 given, but the checkpoint's query_embed holds 7"
    ):
        load_official(state, num_queries=300)
    with pytest.raises(CheckpointError, match="unknown override.*valid: dilation, num_heads, num_queries"):
        load_official(state, two_stage=True)
    fewer = {k: v for k, v in state.items() if not k.startswith("input_proj.3.")}
    with pytest.raises(CheckpointError, match="3 input projections but level_embed has 4 levels"):
        load_official(fewer)
    heads = {k: v for k, v in state.items() if not k.startswith("class_embed.1.")}
    with pytest.raises(CheckpointError, match=r"1 class heads \(class_embed\.\*\) for 2 decoder layers"):
        load_official(heads)
    two_stage = quick_state(backbone="resnet18", box_refine=True, two_stage=True)
    no_refine = {k: v for k, v in two_stage.items() if not k.startswith("transformer.decoder.bbox_embed.")}
    with pytest.raises(CheckpointError, match="two-stage without box refinement is not supported"):
        load_official(no_refine)


# ------------------------------------------------------------------------- files and the tool
def test_checkpoint_files_and_the_convert_tool(tmp_path, capsys):
    state = quick_state(backbone="resnet18", box_refine=True, two_stage=True, decoder_layers=1, classes=91)
    source = tmp_path / "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.pth"
    torch.save({"model": state, "epoch": 49}, source)
    loaded = load_checkpoint(source)
    assert loaded.config.model.query_source == "proposals" and loaded.class_names[1] == "person"
    assert loaded.category_ids == list(range(91))

    tool = load_tool("convert_checkpoint")
    destination = tmp_path / "converted.pt"
    assert tool.main([str(source), str(destination), "--num-queries", "16"]) == 0
    assert "wrote" in capsys.readouterr().out
    converted = load_checkpoint(destination)
    assert converted.config.model.num_queries == 16 and converted.config.model.box_refine
    torch.testing.assert_close(
        converted.model.query_source.memory_proj.weight, state["transformer.enc_output.weight"]
    )
