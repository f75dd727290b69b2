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
import torchvision

from detr_lab.checkpoints import CheckpointError, load_checkpoint, load_official
from detr_lab.models.detector import Detector
from detr_lab.models.queries.anchors import LearnedAnchors

from factories import load_tool

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def official_dino_spec(
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
    points: int = 4,
    two_stage: bool = True,
    denoising: bool = True,
) -> dict[str, list[int]]:
    """Key -> shape of an IDEA-Research/DINO checkpoint, in the official order."""
    d = hidden
    spec: dict[str, list[int]] = {"transformer.level_embed": [levels, d]}

    def linear(prefix, out_features, in_features):
        spec[f"{prefix}.weight"] = [out_features, in_features]
        spec[f"{prefix}.bias"] = [out_features]

    def norm(prefix, width=d):
        spec[f"{prefix}.weight"] = [width]
        spec[f"{prefix}.bias"] = [width]

    def deformable_attention(prefix):
        linear(f"{prefix}.sampling_offsets", heads * levels * points * 2, d)
        linear(f"{prefix}.attention_weights", heads * levels * points, d)
        linear(f"{prefix}.value_proj", d, d)
        linear(f"{prefix}.output_proj", d, d)

    def box_mlp(prefix):
        for k in range(3):
            linear(f"{prefix}.layers.{k}", 4 if k == 2 else d, d)

    for i in range(encoder_layers):
        layer = f"transformer.encoder.layers.{i}"
        deformable_attention(f"{layer}.self_attn")
        norm(f"{layer}.norm1")
        linear(f"{layer}.linear1", ffn, d)
        linear(f"{layer}.linear2", d, ffn)
        norm(f"{layer}.norm2")
    for i in range(decoder_layers):
        layer = f"transformer.decoder.layers.{i}"
        deformable_attention(f"{layer}.cross_attn")
        norm(f"{layer}.norm1")
        spec[f"{layer}.self_attn.in_proj_weight"] = [3 * d, d]
        spec[f"{layer}.self_attn.in_proj_bias"] = [3 * d]
        linear(f"{layer}.self_attn.out_proj", d, d)
        norm(f"{layer}.norm2")
        linear(f"{layer}.linear1", ffn, d)
        linear(f"{layer}.linear2", d, ffn)
        norm(f"{layer}.norm3")
    norm("transformer.decoder.norm")
    linear("transformer.decoder.ref_point_head.layers.0", d, 2 * d)
    linear("transformer.decoder.ref_point_head.layers.1", d, d)
    for j in range(decoder_layers):
        box_mlp(f"transformer.decoder.bbox_embed.{j}")
    for j in range(decoder_layers):
        linear(f"transformer.decoder.class_embed.{j}", classes, d)
    spec["transformer.tgt_embed.weight"] = [queries, d]
    if two_stage:
        linear("transformer.enc_output", d, d)
        norm("transformer.enc_output_norm")
        box_mlp("transformer.enc_out_bbox_embed")
        linear("transformer.enc_out_class_embed", classes, d)
    else:
        spec["transformer.refpoint_embed.weight"] = [queries, 4]
    if denoising:
        spec["label_enc.weight"] = [classes + 1, d]
    width = 64 if backbone in ("resnet18", "resnet34") else 256
    # 4 levels: C3-C5 + one strided level; 5 levels: C2-C5 + one (the official return_interm_indices)
    channels = [width, width * 2, width * 4, width * 8][-min(levels - 1, 4) :]
    for level, in_channels in enumerate(channels):
        spec[f"input_proj.{level}.0.weight"] = [d, in_channels, 1, 1]
        spec[f"input_proj.{level}.0.bias"] = [d]
        norm(f"input_proj.{level}.1")
    spec[f"input_proj.{len(channels)}.0.weight"] = [d, channels[-1], 3, 3]
    spec[f"input_proj.{len(channels)}.0.bias"] = [d]
    norm(f"input_proj.{len(channels)}.1")
    with torch.device("meta"):
        resnet = getattr(torchvision.models, backbone)()
    for name, tensor in resnet.state_dict().items():
        if not name.startswith("fc.") and not name.endswith("num_batches_tracked"):
            spec[f"backbone.0.body.{name}"] = list(tensor.shape)
    for j in range(decoder_layers):
        box_mlp(f"bbox_embed.{j}")
    for j in range(decoder_layers):
        linear(f"class_embed.{j}", classes, d)
    return spec


def quick_state(**kwargs) -> dict[str, torch.Tensor]:
    """Official-layout weights (small noise, unit BN scales), aliases holding one tensor as in a
    trained checkpoint with shared heads."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in official_dino_spec(**kwargs).items():
        if name.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
            state[name] = torch.ones(shape)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            state[name] = (
                torch.randn(shape, generator=generator) / fan_in**0.5 * (0.2 if len(shape) > 1 else 0.05)
            )
    last = kwargs.get("decoder_layers", 2) - 1
    for key in list(state):
        head, _, rest = key.partition(".")
        if key.startswith(("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")):
            _, _, head, _, rest = key.split(".", 4)
            state[key] = state[f"{head}.{last}.{rest}"]
        elif head in ("class_embed", "bbox_embed"):
            state[key] = state[f"{head}.{last}.{rest.split('.', 1)[1]}"]
    return state


def _forward(model, size=128):
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[:, :, size * 3 // 4 :] = True
    with torch.no_grad():
        return model(torch.randn(1, 3, size, size), mask, return_memory=True)


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
    outputs = _forward(model)
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
    outputs = _forward(converted.model)
    assert outputs["pred_logits"].shape == (1, 7, 91)
