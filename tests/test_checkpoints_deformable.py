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
import torchvision

from detr_lab.checkpoints import (
    CheckpointError,
    CheckpointWarning,
    convert_official,
    load_checkpoint,
    load_official,
)
from detr_lab.models.attention.deformable import MultiScaleDeformableAttention

from factories import load_synth_weights, load_tool

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


synth = load_synth_weights()


def official_deformable_spec(
    backbone: str = "resnet50",
    *,
    hidden: int = 32,
    ffn: int = 64,
    encoder_layers: int = 1,
    decoder_layers: int = 2,
    queries: int = 7,
    classes: int = 5,
    levels: int = 4,
    heads: int = 8,
    encoder_points: int = 4,
    decoder_points: int = 4,
    box_refine: bool = False,
    two_stage: bool = False,
) -> dict[str, list[int]]:
    """Key -> shape of a fundamentalvision/Deformable-DETR checkpoint, in the official order."""
    d = hidden
    spec: dict[str, list[int]] = {"transformer.level_embed": [levels, d]}

    def linear(prefix, out_features, in_features):
        spec[f"{prefix}.weight"] = [out_features, in_features]
        spec[f"{prefix}.bias"] = [out_features]

    def norm(prefix, width=d):
        spec[f"{prefix}.weight"] = [width]
        spec[f"{prefix}.bias"] = [width]

    def deformable_attention(prefix, points):
        linear(f"{prefix}.sampling_offsets", heads * levels * points * 2, d)
        linear(f"{prefix}.attention_weights", heads * levels * points, d)
        linear(f"{prefix}.value_proj", d, d)
        linear(f"{prefix}.output_proj", d, d)

    def box_mlp(prefix):
        for k in range(3):
            linear(f"{prefix}.layers.{k}", 4 if k == 2 else d, d)

    for i in range(encoder_layers):
        layer = f"transformer.encoder.layers.{i}"
        deformable_attention(f"{layer}.self_attn", encoder_points)
        norm(f"{layer}.norm1")
        linear(f"{layer}.linear1", ffn, d)
        linear(f"{layer}.linear2", d, ffn)
        norm(f"{layer}.norm2")
    for i in range(decoder_layers):
        layer = f"transformer.decoder.layers.{i}"
        deformable_attention(f"{layer}.cross_attn", decoder_points)
        norm(f"{layer}.norm1")
        spec[f"{layer}.self_attn.in_proj_weight"] = [3 * d, d]
        spec[f"{layer}.self_attn.in_proj_bias"] = [3 * d]
        linear(f"{layer}.self_attn.out_proj", d, d)
        norm(f"{layer}.norm2")
        linear(f"{layer}.linear1", ffn, d)
        linear(f"{layer}.linear2", d, ffn)
        norm(f"{layer}.norm3")
    num_heads = decoder_layers + (1 if two_stage else 0)
    if box_refine:
        for j in range(num_heads):
            box_mlp(f"transformer.decoder.bbox_embed.{j}")
    if two_stage:
        for j in range(num_heads):
            linear(f"transformer.decoder.class_embed.{j}", classes, d)
        linear("transformer.enc_output", d, d)
        norm("transformer.enc_output_norm")
        linear("transformer.pos_trans", 2 * d, 2 * d)
        norm("transformer.pos_trans_norm", 2 * d)
    else:
        linear("transformer.reference_points", 2, d)
    for j in range(num_heads):
        linear(f"class_embed.{j}", classes, d)
    for j in range(num_heads):
        box_mlp(f"bbox_embed.{j}")
    if not two_stage:
        spec["query_embed.weight"] = [queries, 2 * d]
    width = 64 if backbone in ("resnet18", "resnet34") else 256
    # C3-C5 (Deformable DETR), C5 alone (single-scale); two levels take C4-C5 as detr_lab builds them
    channels = [width * 2, width * 4, width * 8][-min(levels, 3) :]
    for level, in_channels in enumerate(channels):
        spec[f"input_proj.{level}.0.weight"] = [d, in_channels, 1, 1]
        spec[f"input_proj.{level}.0.bias"] = [d]
        norm(f"input_proj.{level}.1")
    in_channels = channels[-1]
    for level in range(len(channels), levels):
        spec[f"input_proj.{level}.0.weight"] = [d, in_channels, 3, 3]
        spec[f"input_proj.{level}.0.bias"] = [d]
        norm(f"input_proj.{level}.1")
        in_channels = d
    with torch.device("meta"):
        resnet = getattr(torchvision.models, backbone)()
    for name, tensor in resnet.state_dict().items():
        if not name.startswith("fc.") and not name.endswith("num_batches_tracked"):
            spec[f"backbone.0.body.{name}"] = list(tensor.shape)
    return spec


def quick_state(**kwargs) -> dict[str, torch.Tensor]:
    """Official-layout weights filled fast (float32 noise, unit BN scales), aliases kept identical as
    in a trained checkpoint (the official model stores one tensor under each alias)."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in official_deformable_spec(**kwargs).items():
        if name.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
            state[name] = torch.ones(shape)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            scale = 0.2 if len(shape) > 1 else 0.05
            state[name] = torch.randn(shape, generator=generator) / fan_in**0.5 * scale
    return share_aliases(state, kwargs.get("box_refine", False), kwargs.get("decoder_layers", 2))


def share_aliases(state: dict, box_refine: bool, decoder_layers: int) -> dict:
    """Make the official aliases of a head hold one tensor, as `model.state_dict()` gives them."""
    for key in list(state):
        if key.startswith(("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")):
            state[key] = state[key[len("transformer.decoder.") :]]
        elif not box_refine and key.startswith(("class_embed.", "bbox_embed.")):
            head, layer, rest = key.split(".", 2)
            state[key] = state[f"{head}.{decoder_layers - 1}.{rest}"]
    return state


def _forward(model, size=128):
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[:, :, size * 3 // 4 :] = True
    with torch.no_grad():
        return model(torch.randn(1, 3, size, size), mask, return_memory=True)


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
    outputs = _forward(model)
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
    outputs = _forward(model)
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
