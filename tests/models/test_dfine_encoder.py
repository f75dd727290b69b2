"""D-FINE's hybrid encoder (`dfine_hybrid_encoder` neck) against the official module: the fixture holds
the official D-FINE-N encoder's float64 outputs for synthetic weights
(tests/fixtures/dfine_encoder/make_fixture.py says how; compare_official.py there checks N/S/M/L/X).
Also the checkpoint key mapping and architecture inference, inference rewrites and export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from detr_lab.checkpoints.dfine_encoder import (
    DFINE_ENCODER_KEY_RULES,
    dfine_encoder_options,
    dfine_encoder_state_dict,
    dfine_neck_config,
)
from detr_lab.checkpoints.family import map_keys
from detr_lab.config import load_config
from detr_lab.io import CheckpointError
from detr_lab.models.build import build_model
from detr_lab.models.fusion import FusedRepVggBlock, fuse_repvgg_blocks
from detr_lab.models.necks import NECKS
from detr_lab.models.necks.dfine_encoder import DFineHybridEncoder, RepNCSPELAN4, SCDown, elan_branch_width
from detr_lab.models.necks.hybrid_encoder import RepVggBlock
from detr_lab.models.optimize import fold_conv_norm_units, optimize_for_inference

from factories import FIXTURES, load_synth_weights, tiny_overrides

FIXTURE = torch.load(FIXTURES / "dfine_encoder" / "dfine_n_encoder.pt", weights_only=True)
TOLERANCE = dict(rtol=1e-10, atol=1e-10)  # float64 on both sides: measured ~4e-15

# A small detector with the D-FINE neck: ResNet-18-vd, IoU-aware selection, RT-DETRv2 attention.
DFINE_NECK = tiny_overrides(
    "model.neck.type=dfine_hybrid_encoder", "model.neck.options.ffn_dim=32",
    "model.neck.options.expansion=0.5", "model.neck.options.depth_mult=0.34",
    "model.query_source=iou_aware", "model.box_refine=true", "model.look_forward_twice=true",
    "model.encoder.num_layers=0", "model.decoder.cross_attention=deformable_v2", "model.num_feature_levels=3",
    "model.backbone.type=resnet_vd", "model.backbone.name=resnet18", "loss.terms=[vfl,boxes]",
    classification="sigmoid", num_heads=4, num_classes=5, num_queries=10,
)  # fmt: skip


def official_checkpoint() -> dict[str, torch.Tensor]:
    """The fixture's synthetic official weights as a D-FINE checkpoint holds them (`encoder.*`), with
    a decoder key the encoder mapping must leave alone."""
    spec = dict(FIXTURE["state_dict_spec"])
    state = load_synth_weights().synth_state_dict(spec, FIXTURE["seed"])
    checkpoint = {f"encoder.{k}": v for k, v in state.items()}
    return {**checkpoint, "decoder.dec_score_head.0.weight": torch.zeros(3, 2)}


def fixture_neck() -> DFineHybridEncoder:
    checkpoint = official_checkpoint()
    neck = DFineHybridEncoder(**dfine_encoder_options(checkpoint))
    neck.load_state_dict(dfine_encoder_state_dict(checkpoint, target_prefix=""))
    return neck.double().eval()


def fixture_inputs() -> list[torch.Tensor]:
    return [x.double() for x in FIXTURE["inputs"]]


def test_outputs_match_the_official_dfine_n_encoder():
    s = FIXTURE["settings"]
    neck = fixture_neck()
    assert list(neck.state_dict()) == [key for key, _ in FIXTURE["state_dict_spec"]]  # official names, order
    assert neck.encoder_levels == s["use_encoder_idx"] == [1]
    with torch.no_grad():
        outputs = neck.fuse(fixture_inputs())
    assert [tuple(o.shape) for o in outputs] == [(2, 128, 4, 6), (2, 128, 2, 3)]  # a non-square 64 x 96 image
    # Our embedding follows each input's grid: equal to the official one built for eval_spatial_size when
    # the input has that size (here (H, W) = (64, 96)), and to the official training-mode embedding.
    for expected in (FIXTURE["outputs"], FIXTURE["outputs_eval_size"]):
        for ours, official in zip(outputs, expected, strict=True):
            torch.testing.assert_close(ours, official, **TOLERANCE)


def test_the_neck_contract_with_masks_gives_the_same_outputs():
    neck = fixture_neck()
    levels = [
        type("Level", (), {"features": x, "mask": torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool)})()
        for x in fixture_inputs()
    ]
    with torch.no_grad():
        features, masks = neck(levels, torch.zeros(2, 64, 96, dtype=torch.bool))
    assert [m.shape for m in masks] == [(2, 4, 6), (2, 2, 3)]
    for ours, official in zip(features, FIXTURE["outputs"], strict=True):
        torch.testing.assert_close(ours, official, **TOLERANCE)


def test_inferred_options_are_the_n_config():
    options = dfine_encoder_options(official_checkpoint())
    assert options["in_channels"] == [512, 1024] and options["hidden_dim"] == 128
    assert options["ffn_dim"] == 512 and options["num_encoder_layers"] == 1
    assert options["encoder_levels"] == [1]
    assert options["expansion"] == 0.34  # the official value, preferred: it gives the 21 branch channels
    assert round(3 * options["depth_mult"]) == 2
    assert (options["num_heads"], options["enc_act"], options["act"]) == (8, "gelu", "silu")
    neck = dfine_neck_config(official_checkpoint(), num_heads=4)
    assert neck["type"] == "dfine_hybrid_encoder" and neck["type"] in NECKS
    assert "in_channels" not in neck["options"] and neck["options"]["num_heads"] == 4


@pytest.mark.parametrize("width", [96, 128, 384])
def test_options_inferred_from_the_weights_rebuild_the_same_encoder(width):
    """Round trip over widths and multipliers: the inferred expansion and depth_mult give the same
    branch widths and block counts (shapes read on the meta device, no memory)."""
    for expansion in (0.25, 0.34, 0.5, 0.67, 0.75, 1.0, 1.25):
        for depth_mult, levels in ((0.34, 3), (0.5, 2), (1.34, 3)):
            with torch.device("meta"):
                neck = DFineHybridEncoder(
                    [16 * (i + 1) for i in range(levels)], width, num_heads=4, ffn_dim=3 * width,
                    num_encoder_layers=2, encoder_levels=[levels - 1], expansion=expansion,
                    depth_mult=depth_mult,
                )  # fmt: skip
                state = {f"encoder.{k}": v for k, v in neck.state_dict().items()}
                options = dfine_encoder_options(state)
                rebuilt = DFineHybridEncoder(**options).state_dict()
            shapes = {k: tuple(v.shape) for k, v in neck.state_dict().items()}
            assert {k: tuple(v.shape) for k, v in rebuilt.items()} == shapes, (width, expansion, depth_mult)
            assert options["ffn_dim"] == 3 * width and options["num_encoder_layers"] == 2


def test_branch_widths_and_blocks_of_the_released_models():
    assert [elan_branch_width(w, e) for w, e in ((128, 0.34), (256, 0.5), (256, 1.0), (384, 1.0))] == [
        21, 64, 128, 192
    ]  # fmt: skip
    neck = DFineHybridEncoder([256, 512, 1024], 256, expansion=0.5, depth_mult=0.34)  # D-FINE-S
    block = neck.fpn_blocks[0]
    assert isinstance(block, RepNCSPELAN4) and len(block.cv2[0].bottlenecks) == 1
    assert block.cv2[1].conv.weight.shape == (64, 64, 3, 3)
    assert block.cv4.conv.weight.shape == (256, 512 + 2 * 64, 1, 1)  # [a, b, y1, y2] -> d
    assert isinstance(block.cv2[0].conv3, nn.Identity)  # CSP expansion 1: no output conv
    assert isinstance(neck.downsample_convs[0][0], SCDown)
    assert neck.downsample_convs[0][0].cv2.conv.groups == 256  # depthwise
    assert isinstance(neck.lateral_convs[0].act, nn.Identity)


def test_mapping_renames_and_checks_the_keys():
    checkpoint = official_checkpoint()
    mapped = dfine_encoder_state_dict(checkpoint)
    assert all(key.startswith("neck.") for key in mapped) and len(mapped) == len(FIXTURE["state_dict_spec"])
    assert mapped["neck.input_proj.0.conv.weight"] is checkpoint["encoder.input_proj.0.conv.weight"]
    rules_mapped, unmapped = map_keys(checkpoint, DFINE_ENCODER_KEY_RULES, lambda groups: groups)
    assert unmapped == ["decoder.dec_score_head.0.weight"] and list(rules_mapped) == list(mapped)
    # Batch-norm step counters may be absent: filled with 0.
    counters = [k for k in checkpoint if k.endswith("num_batches_tracked")]
    trimmed = {k: v for k, v in checkpoint.items() if k not in counters}
    assert counters and int(dfine_encoder_state_dict(trimmed)[counters[0].replace("encoder.", "neck.")]) == 0
    # Other prefixes (an EMA wrapper's, a detr_lab model's).
    wrapped = {f"module.{k}": v for k, v in checkpoint.items()}
    assert list(dfine_encoder_state_dict(wrapped, source_prefix="module.encoder.", target_prefix="x.")) == [
        key.replace("neck.", "x.", 1) for key in mapped
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("encoder.pan_blocks.0.cv3.1.conv.weight"), r"1 missing \(e\.g\. pan_blocks\.0\.cv3"),
        (lambda s: s.update({"encoder.extra.weight": torch.zeros(1)}), r"1 unexpected \(e\.g\. extra\."),
        (
            lambda s: s.update({"encoder.lateral_convs.0.norm.bias": torch.zeros(7)}),
            r"lateral_convs\.0\.norm\.bias: \(7,\) vs model \(128,\)",
        ),
        (
            lambda s: s.update({"encoder.fpn_blocks.0.cv1.conv_bn_fused.weight": torch.zeros(1)}),
            "deploy-form weights",
        ),
    ],
    ids=["missing", "unexpected", "shape", "deploy-form"],
)
def test_mapping_names_the_keys_that_do_not_fit(change, message):
    checkpoint = official_checkpoint()
    change(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        dfine_encoder_state_dict(checkpoint)


def test_a_key_the_inference_needs_is_named():
    checkpoint = official_checkpoint()
    del checkpoint["encoder.fpn_blocks.0.cv2.1.conv.weight"]
    with pytest.raises(CheckpointError, match="missing key 'encoder.fpn_blocks.0.cv2.1.conv.weight'"):
        dfine_encoder_options(checkpoint)
    with pytest.raises(CheckpointError, match="0 encoder input projection"):
        dfine_encoder_options({})


def test_repvgg_fusion_and_batch_norm_folding_keep_the_function():
    """The D-FINE blocks' RepVGG blocks fuse and every conv-norm unit (SCDown's depthwise conv included)
    folds: float64 outputs equal the unfused ones and the official ones."""
    neck = fixture_neck()
    inputs = fixture_inputs()
    with torch.no_grad():
        expected = neck.fuse(inputs)
        blocks = sum(isinstance(m, RepVggBlock) for m in neck.modules())
        assert blocks == fuse_repvgg_blocks(neck) == 2 * 2 * 2  # 2 per CSP block, 2 CSP blocks, fpn + pan
        fold_conv_norm_units(neck)
        fused = neck.fuse(inputs)
    assert not any(isinstance(m, (RepVggBlock, nn.BatchNorm2d)) for m in neck.modules())
    assert sum(isinstance(m, FusedRepVggBlock) for m in neck.modules()) == blocks
    for ours, unfused, official in zip(fused, expected, FIXTURE["outputs"], strict=True):
        torch.testing.assert_close(ours, unfused, **TOLERANCE)
        torch.testing.assert_close(ours, official, **TOLERANCE)


def test_sizes_that_are_not_multiples_of_the_stride():
    """Odd deeper maps (the official 2x upsampling cannot take them): upsampled to the shallower size,
    SCDown's ceil(H/2) meets the deeper level; a 100 x 150 image at strides 8 / 16 / 32."""
    torch.manual_seed(0)
    neck = DFineHybridEncoder([16, 32, 64], 32, num_heads=4, ffn_dim=64, expansion=0.5, depth_mult=0.34)
    neck.eval()
    sizes = [(13, 19), (7, 10), (4, 5)]
    maps = [torch.randn(1, c, *size) for c, size in zip([16, 32, 64], sizes, strict=True)]
    with torch.no_grad():
        outputs = neck.fuse(maps)
    assert [tuple(o.shape[-2:]) for o in outputs] == sizes and all(o.isfinite().all() for o in outputs)


def test_a_detector_with_the_neck_trains_and_optimizes_for_inference():
    cfg = load_config(overrides=DFINE_NECK)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    assert isinstance(model.neck, DFineHybridEncoder) and model.neck.num_levels == 3
    images = torch.randn(2, 3, 96, 128)
    padding_mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    out = model.train()(images, padding_mask)
    out["pred_logits"].sum().backward()
    assert model.neck.pan_blocks[0].cv3[0].bottlenecks[0].conv1.conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        expected = model(images, padding_mask)
        optimized = optimize_for_inference(copy.deepcopy(model), compile_backbone=False)
        got = optimized(images, padding_mask)
    assert not any(isinstance(m, (RepVggBlock, nn.BatchNorm2d)) for m in optimized.neck.modules())
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=1e-4)


@pytest.mark.slow  # export + onnxruntime
def test_a_detector_with_the_neck_exports_and_passes_verify(tmp_path):
    """The export path (RepVGG blocks fused, dynamic sizes) takes the neck; other sizes than the traced
    one match PyTorch (upsampling to the shallower map's size, SCDown, the position embedding)."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from detr_lab.export.metadata import ExportMetadata
    from detr_lab.export.onnx_export import export_onnx
    from detr_lab.export.verify import verify_onnx

    cfg = load_config(overrides=DFINE_NECK)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    metadata = ExportMetadata(list(range(5)), [f"c{i}" for i in range(5)], cfg)
    path = export_onnx(model, tmp_path / "dfine_neck.onnx", metadata=metadata, height=96, width=128, batch=1,
                       dynamic=True)  # fmt: skip
    convs = [node.name for node in onnx.load(str(path)).graph.node if node.op_type == "Conv"]
    blocks = sum(isinstance(m, RepVggBlock) for m in model.modules())
    assert sum("/bottlenecks." in name for name in convs) == blocks > 0  # one convolution per RepVGG block
    report = verify_onnx(model, path, num_random=2, size_range=(64, 160), tolerance=1e-4)
    assert report.passed, report.text()
