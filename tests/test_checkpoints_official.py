"""Official DETR checkpoints: architecture inference, key mapping, variants, the convert tool.

The official key layout is written out here by hand (torchvision's ResNet keys under
`backbone.0.body.`, nn.MultiheadAttention's packed projections, norm1..3), independent of the
converter's rules; weights come from the fixtures' deterministic `synth_state_dict`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torchvision

from detr_lab.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_official,
    official_class_names,
)
from detr_lab.config import ConfigError

from factories import load_synth_weights, load_tool, official_detr_spec, quick_official_state

ROOT = Path(__file__).resolve().parents[1]


synth = load_synth_weights()


def official_state(**kwargs) -> dict[str, torch.Tensor]:
    return synth.synth_state_dict(official_detr_spec(**kwargs), 0)


def quick_state(**kwargs) -> dict[str, torch.Tensor]:
    """Like `official_state` but filled faster (`quick_official_state`) for deep ResNets."""
    return quick_official_state(official_detr_spec(**kwargs))


def _forward(model, size=64):
    with torch.no_grad():
        return model(
            torch.randn(1, 3, size, size), torch.zeros(1, size, size, dtype=torch.bool), return_memory=True
        )


@pytest.fixture(scope="module")
def r18_state():
    return official_state()


# ------------------------------------------------------------------------------------- variants
@pytest.mark.parametrize(
    ("backbone", "dilation", "learned", "stride"),
    [
        ("resnet18", False, False, 32),
        ("resnet34", False, True, 32),
        pytest.param("resnet50", True, False, 16, marks=pytest.mark.slow, id="resnet50-dc5"),
        pytest.param("resnet101", True, False, 16, marks=pytest.mark.slow, id="resnet101-dc5"),
    ],
)
def test_variants_are_inferred_and_run(backbone, dilation, learned, stride):
    sizes = {"hidden": 32, "ffn": 48, "encoder_layers": 2, "decoder_layers": 3, "queries": 9, "classes": 4}
    state = quick_state(backbone=backbone, learned_position=learned, **sizes)
    overrides = {"dilation": True} if dilation else {}
    model, cfg = load_official(state, num_heads=4, **overrides)
    m = cfg.model
    assert (m.backbone.name, m.backbone.dilation, m.hidden_dim, m.ffn_dim, m.num_heads) == (
        backbone,
        dilation,
        32,
        48,
        4,
    )
    assert (m.encoder.num_layers, m.decoder.num_layers, m.num_queries, m.num_classes) == (2, 3, 9, 4)
    assert m.position_encoding == ("learned" if learned else "sine")
    assert not model.training
    outputs = _forward(model, size=2 * stride)  # a 2x2 feature map at the model's stride
    assert tuple(outputs["pred_logits"].shape) == (1, 9, 5) and len(outputs["aux_outputs"]) == 2
    assert outputs["memory"].shape[1] == 4
    assert torch.isfinite(outputs["pred_boxes"]).all()
    torch.testing.assert_close(model.class_embed.weight, state["class_embed.weight"])
    if learned:
        torch.testing.assert_close(
            model.position_encoding.row_embed.weight, state["backbone.1.row_embed.weight"]
        )


def test_keys_land_in_the_right_modules(r18_state):
    model, _ = load_official(r18_state)
    d = 32
    encoder = model.transformer.encoder.layers[0]
    decoder = model.transformer.decoder.layers[1]
    packed = r18_state["transformer.encoder.layers.0.self_attn.in_proj_weight"]
    torch.testing.assert_close(encoder.self_attn.q_proj.weight, packed[:d])
    torch.testing.assert_close(encoder.self_attn.k_proj.weight, packed[d : 2 * d])
    torch.testing.assert_close(encoder.self_attn.v_proj.weight, packed[2 * d :])
    packed_bias = r18_state["transformer.decoder.layers.1.multihead_attn.in_proj_bias"]
    torch.testing.assert_close(decoder.cross_attn.v_proj.bias, packed_bias[2 * d :])
    torch.testing.assert_close(
        decoder.self_attn.out_proj.weight, r18_state["transformer.decoder.layers.1.self_attn.out_proj.weight"]
    )
    expected_norms = [
        (encoder.self_attn_norm, "transformer.encoder.layers.0.norm1"),
        (encoder.ffn_norm, "transformer.encoder.layers.0.norm2"),
        (decoder.self_attn_norm, "transformer.decoder.layers.1.norm1"),
        (decoder.cross_attn_norm, "transformer.decoder.layers.1.norm2"),
        (decoder.ffn_norm, "transformer.decoder.layers.1.norm3"),
        (model.transformer.decoder.norm, "transformer.decoder.norm"),
    ]
    for module, key in expected_norms:
        torch.testing.assert_close(module.weight, r18_state[f"{key}.weight"])
        torch.testing.assert_close(module.bias, r18_state[f"{key}.bias"])
    torch.testing.assert_close(
        decoder.ffn.linear2.weight, r18_state["transformer.decoder.layers.1.linear2.weight"]
    )
    torch.testing.assert_close(model.neck.input_proj[0].weight, r18_state["input_proj.weight"])
    torch.testing.assert_close(
        model.backbone.body.layer3[1].bn2.running_var, r18_state["backbone.0.body.layer3.1.bn2.running_var"]
    )
    torch.testing.assert_close(model.bbox_embed.layers[2].bias, r18_state["bbox_embed.layers.2.bias"])


def test_checkpoint_file_with_training_arguments(tmp_path, r18_state):
    path = tmp_path / "detr.pth"
    state = {**r18_state, "backbone.0.body.bn1.num_batches_tracked": torch.tensor(0)}  # harmless extra
    torch.save({"model": state, "args": argparse.Namespace(backbone="resnet18", lr=1e-4), "epoch": 3}, path)
    model, cfg = load_official(path)
    assert cfg.model.backbone.name == "resnet18"
    torch.testing.assert_close(model.query_source.query_embed.weight, r18_state["query_embed.weight"])


# --------------------------------------------------------------------------------------- errors
def test_unmapped_official_keys_are_an_error(r18_state):
    state = dict(r18_state)
    state["transformer.encoder.norm.weight"] = torch.ones(32)  # pre-norm checkpoints have it
    state["transformer.encoder.layers.0.norm3.weight"] = torch.ones(32)
    with pytest.raises(
        CheckpointError, match=r"2 official DETR key\(s\) have no place .*transformer\.encoder\.norm"
    ):
        load_official(state)


def test_unfilled_parameters_are_an_error(r18_state):
    state = {k: v for k, v in r18_state.items() if k not in ("class_embed.bias", "input_proj.bias")}
    with pytest.raises(CheckpointError, match=r"2 missing \(e\.g\. class_embed\.bias, neck\.input_proj\.0"):
        load_official(state)


def test_overrides_are_checked(r18_state):
    with pytest.raises(
        CheckpointError, match="unknown override.*dilatoin.*valid: dilation, num_heads, num_queries"
    ):
        load_official(r18_state, dilatoin=True)
    with pytest.raises(
        CheckpointError, match="num_queries=100 given, but the checkpoint's query_embed holds 7"
    ):
        load_official(r18_state, num_queries=100)
    with pytest.raises(ConfigError, match="divisible"):
        load_official(r18_state, num_heads=5)
    _, cfg = load_official(r18_state, num_queries=7, num_heads=2)
    assert cfg.model.num_heads == 2


def test_unsupported_layouts(r18_state):
    with torch.device("meta"):
        names = torchvision.models.resnet152().state_dict().keys()
    state = {f"backbone.0.body.{n}": torch.zeros(1) for n in names if not n.startswith("fc.")}
    state.update({k: v for k, v in r18_state.items() if not k.startswith("backbone.")})
    with pytest.raises(CheckpointError, match=r"bottleneck blocks \(3, 8, 36, 3\)"):
        load_official(state)
    deformable = torch.load(ROOT / "tests" / "fixtures" / "deformable_detr_r50.pt", weights_only=True)
    with pytest.raises(CheckpointError, match=r"Deformable DETR checkpoint: 'transformer.level_embed' has"):
        load_official({name: torch.zeros(1) for name, _ in deformable["state_dict_spec"]})
    with pytest.raises(CheckpointError, match="not an official checkpoint"):
        load_official({"encoder.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="expected an official state dict"):
        load_official({"model": {"a": "b"}})


# ------------------------------------------------------------------------- via load_checkpoint
def test_load_checkpoint_reads_official_weights_with_coco_names(tmp_path):
    state = official_state(classes=91)  # as the official COCO models: ids 0..90, plus "no object"
    path = tmp_path / "detr.pth"
    torch.save({"model": state}, path)
    loaded = load_checkpoint(path)
    assert loaded.category_ids == list(range(91))
    names = loaded.class_names
    assert len(names) == 91 and names[0] == "N/A" and names[1] == "person" and names[12] == "N/A"
    assert names[90] == "toothbrush" and names[44] == "bottle"
    assert sum(name != "N/A" for name in names) == 80
    assert official_class_names(3) == ["class_0", "class_1", "class_2"]

    act = load_checkpoint(path, overrides=["model.encoder.attention=act"])
    assert type(act.model.transformer.encoder.layers[0].self_attn).__name__ == "AdaptiveClusteringAttention"
    torch.testing.assert_close(act.model.class_embed.weight, state["class_embed.weight"])


# ---------------------------------------------------------------------------- the convert tool
@pytest.fixture(scope="module")
def convert_tool():
    return load_tool("convert_checkpoint")


@pytest.mark.slow  # about 9 s in --durations (the tool's full convert-and-save run)
def test_convert_tool_writes_a_detr_lab_checkpoint(tmp_path, convert_tool, r18_state, capsys):
    src, dst = tmp_path / "official.pth", tmp_path / "out" / "converted.pt"
    torch.save({"model": r18_state}, src)
    assert convert_tool.main([str(src), str(dst), "--num-heads", "2", "--num-queries", "7"]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = load_checkpoint(dst)
    assert loaded.config.model.num_heads == 2 and loaded.category_ids == list(range(5))
    torch.testing.assert_close(loaded.model.query_source.query_embed.weight, r18_state["query_embed.weight"])
    assert torch.load(dst, weights_only=True)["format"] == "detr_lab"


def test_convert_tool_errors_are_one_line(tmp_path, convert_tool, capsys):
    missing = tmp_path / "missing.pth"
    assert convert_tool.main([str(missing), str(tmp_path / "x.pt"), "--dilation"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint file not found") and err.count("\n") == 1
    with pytest.raises(CheckpointError):
        convert_tool.main([str(missing), str(tmp_path / "x.pt"), "--debug"])
