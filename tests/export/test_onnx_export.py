"""ONNX export of every detector variant: onnxruntime equals PyTorch on other sizes, metadata, refusals."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from export_helpers import CATEGORY_IDS, CLASS_NAMES, VARIANTS

from detr_lab.checkpoints import load_checkpoint
from detr_lab.export.metadata import ExportMetadata
from detr_lab.export.onnx_export import (
    ExportError,
    drop_trailing_empty_inputs,
    export_onnx,
    resolve_deformable_core,
)
from detr_lab.export.runtime import OnnxDetector, OnnxInputError
from detr_lab.export.verify import random_batch, verify_onnx


@pytest.fixture(scope="module")
def dynamic_exports(checkpoints, tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx")
    exports = {}
    for variant, checkpoint in checkpoints.items():
        loaded = load_checkpoint(checkpoint)
        meta = ExportMetadata.from_loaded(loaded)
        path = export_onnx(loaded.model, directory / f"{variant}.onnx", metadata=meta, height=96, width=128,
                           dynamic=True)
        exports[variant] = (loaded, path)
    return exports


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dynamic_export_matches_pytorch_on_other_sizes(dynamic_exports, variant):
    loaded, path = dynamic_exports[variant]
    # batches of 1-2 images of 64..140 px, none of them the traced 2 x 96 x 128
    report = verify_onnx(loaded.model, path, num_random=3, size_range=(64, 140), seed=1)
    assert len(report.cases) == 3
    assert all("x 96 x 128" not in case.description for case in report.cases)
    assert report.passed, report.text()
    assert report.logits_diff <= 1e-4 and report.boxes_diff <= 1e-4


def test_outputs_names_shapes_and_metadata(dynamic_exports):
    onnx = pytest.importorskip("onnx")
    loaded, path = dynamic_exports["deformable"]
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["images", "padding_mask"]
    assert [o.name for o in proto.graph.output] == ["pred_logits", "pred_boxes"]
    image_dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert image_dims == ["batch", 3, "height", "width"]
    assert proto.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.BOOL
    assert {node.domain for node in proto.graph.node} <= {""}  # standard operators only
    properties = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(properties["detr_lab.class_names"]) == CLASS_NAMES
    assert json.loads(properties["detr_lab.category_ids"]) == CATEGORY_IDS
    detector = OnnxDetector(path)
    assert detector.metadata.config.model == loaded.config.model
    images, mask = random_batch(torch.Generator().manual_seed(0), 3, [(70, 90), (64, 64), (90, 70)])
    outputs = detector(images, mask)
    assert outputs["pred_logits"].shape == (3, 7, 6) and outputs["pred_boxes"].shape == (3, 7, 4)


def test_fixed_size_export_pads_smaller_batches(checkpoints, tmp_path):
    loaded = load_checkpoint(checkpoints["detr"])
    path = export_onnx(loaded.model, tmp_path / "fixed.onnx", metadata=ExportMetadata.from_loaded(loaded),
                       height=80, width=96, batch=2)
    detector = OnnxDetector(path)
    assert detector.metadata.traced_size == (2, 80, 96)
    # three images of 64 x 72: two chunks of the traced batch, padded to 80 x 96 like a mixed-size batch
    images, mask = random_batch(torch.Generator().manual_seed(0), 3, [(64, 72)] * 3)
    canvas, canvas_mask = random_batch(torch.Generator().manual_seed(0), 3, [(64, 72)] * 3, (80, 96))
    with torch.no_grad():
        expected = loaded.model(canvas, canvas_mask)
    got = detector(images, mask)
    assert (got["pred_logits"] - expected["pred_logits"]).abs().max() <= 1e-4
    assert (got["pred_boxes"] - expected["pred_boxes"]).abs().max() <= 1e-4
    too_big, too_big_mask = random_batch(torch.Generator(), 1, [(81, 96)])
    with pytest.raises(OnnxInputError, match="exported for 80x96 images.*--dynamic"):
        detector(too_big, too_big_mask)
    assert verify_onnx(loaded.model, path, num_random=1).passed


def test_grid_sample_core_fixed_size_export(checkpoints, tmp_path):
    onnx = pytest.importorskip("onnx")
    loaded = load_checkpoint(checkpoints["deformable"])
    meta = ExportMetadata.from_loaded(loaded)
    path = export_onnx(loaded.model, tmp_path / "gs.onnx", metadata=meta, height=96, width=128,
                       deformable_core="grid_sample")
    assert "GridSample" in {node.op_type for node in onnx.load(str(path)).graph.node}
    report = verify_onnx(loaded.model, path, num_random=2)
    assert report.passed, report.text()
    with pytest.raises(ExportError, match="without --dynamic, or use the gather core"):
        export_onnx(loaded.model, tmp_path / "x.onnx", metadata=meta, dynamic=True,
                    deformable_core="grid_sample")
    with pytest.raises(ExportError, match="opset 15 is too old"):
        export_onnx(loaded.model, tmp_path / "x.onnx", metadata=meta, opset=15, deformable_core="grid_sample")
    assert not (tmp_path / "x.onnx").exists()


def test_auto_core_is_grid_sample_at_a_fixed_size_and_gather_otherwise(checkpoints, tmp_path):
    assert resolve_deformable_core("auto", dynamic=False, opset=17) == "grid_sample"
    assert resolve_deformable_core("auto", dynamic=True, opset=17) == "gather"
    assert resolve_deformable_core("auto", dynamic=False, opset=15) == "gather"  # GridSample: opset 16
    assert resolve_deformable_core("gather", dynamic=False, opset=17) == "gather"
    with pytest.raises(ExportError, match="'bilinear'"):
        resolve_deformable_core("bilinear", dynamic=False, opset=17)
    onnx = pytest.importorskip("onnx")
    loaded = load_checkpoint(checkpoints["two_stage"])
    path = export_onnx(loaded.model, tmp_path / "auto.onnx", metadata=ExportMetadata.from_loaded(loaded),
                       height=96, width=128, batch=2)  # the default core
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "GridSample" in ops
    assert verify_onnx(loaded.model, path, num_random=1).passed


def test_trailing_empty_inputs_are_dropped_and_the_pad_fuses_into_the_conv(tmp_path):
    """`Pad(x, pads, "")` as the TorchScript exporter writes `F.pad`: without the empty name the
    graph computes the same, and onnxruntime folds the pad into the convolution after it."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(torch.randn(4, 3, 2, 2).numpy(), "w")
    pads = numpy_helper.from_array(torch.tensor([0, 0, 0, 0, 0, 0, 1, 1]).numpy(), "pads")
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads", ""], ["padded"], mode="constant"),
         helper.make_node("Conv", ["padded", "w"], ["y"])],
        "pad_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [weight, pads],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    assert drop_trailing_empty_inputs(model.graph) == 1
    assert list(model.graph.node[0].input) == ["x", "pads"]
    assert drop_trailing_empty_inputs(model.graph) == 0
    onnx.checker.check_model(model)
    x = {"x": torch.randn(1, 3, 6, 6).numpy()}
    outputs, op_counts = [], []
    for index, serialized in enumerate((before, model.SerializeToString())):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"optimized_{index}.onnx")
        session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, x)[0])
        optimized = onnx.load(options.optimized_model_filepath)
        op_counts.append(sum(node.op_type == "Pad" for node in optimized.graph.node))
    assert (outputs[0] == outputs[1]).all()
    assert op_counts == [1, 0]


def test_act_is_refused_with_the_plain_attention_hint(checkpoints, tmp_path):
    loaded = load_checkpoint(checkpoints["detr"], overrides=["model.encoder.attention=act"])
    with pytest.raises(ExportError, match=r"ACT .* cannot be exported.*model\.encoder\.attention=plain"):
        export_onnx(loaded.model, tmp_path / "act.onnx", metadata=ExportMetadata.from_loaded(loaded))
    assert not list(tmp_path.iterdir())


def test_vit_backbone_is_refused_before_tracing(tmp_path):
    """ViT resamples position embeddings per image from the padding mask: no ONNX graph for that."""
    from detr_lab.config import load_config
    from detr_lab.models.build import build_model

    cfg = load_config("configs/demo_vit.yaml", [
        "model.backbone.timm_kwargs.embed_dim=32", "model.backbone.timm_kwargs.depth=1",
        "model.backbone.timm_kwargs.num_heads=2", "model.neck.options.channels=16",
        "model.hidden_dim=32", "model.num_heads=2", "model.num_queries=5",
        "model.encoder.num_layers=1", "model.decoder.num_layers=1",
    ])
    model = build_model(cfg.model).eval()
    classes = cfg.model.num_classes
    meta = ExportMetadata(list(range(classes)), [f"class{i}" for i in range(classes)], cfg)
    with pytest.raises(ExportError, match=r"ViT backbones cannot be exported.*ResNet or ConvNeXt"):
        export_onnx(model, tmp_path / "vit.onnx", metadata=meta, height=64, width=64)
    assert not list(tmp_path.iterdir())


def test_missing_extra_names_the_install_command(monkeypatch, checkpoints, tmp_path):
    from detr_lab.export.dependencies import MissingExtraError

    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    loaded = load_checkpoint(checkpoints["detr"])
    with pytest.raises(MissingExtraError, match=r"pip install -e \"\.\[export\]\""):
        export_onnx(loaded.model, tmp_path / "m.onnx", metadata=ExportMetadata.from_loaded(loaded))


@pytest.mark.slow
def test_dc5_single_scale_exports_dynamic(tmp_path):
    """DC5 (dilated ResNet-50 stage 5): the only variant needing a bottleneck backbone."""
    from export_helpers import make_checkpoint

    checkpoint = make_checkpoint(tmp_path, "single_scale", ["model.backbone.name=resnet50",
                                                           "model.backbone.dilation=true"])
    loaded = load_checkpoint(checkpoint)
    path = export_onnx(loaded.model, tmp_path / "dc5.onnx", metadata=ExportMetadata.from_loaded(loaded),
                       height=64, width=96, dynamic=True)
    report = verify_onnx(loaded.model, path, num_random=2, size_range=(48, 112))
    assert report.passed, report.text()


def test_lightning_checkpoint_exports(checkpoints, tmp_path):
    """The Lightning layout (weights under `model.`, metadata under `detr_lab`) goes through the same path."""
    from detr_lab.export.from_checkpoint import export_checkpoint

    stored = torch.load(checkpoints["detr"], weights_only=True)
    lightning = {
        "state_dict": {f"model.{key}": value for key, value in stored["state_dict"].items()},
        "detr_lab": {key: stored[key] for key in ("config", "category_ids", "class_names")},
        "epoch": 0, "global_step": 1,
    }
    torch.save(lightning, tmp_path / "last.ckpt")
    result = export_checkpoint(tmp_path / "last.ckpt", tmp_path / "m.onnx", height=64, width=80, dynamic=True,
                               verify=True, num_random=1)
    assert result.report.passed, result.report.text()
    assert OnnxDetector(result.path).metadata.class_names == CLASS_NAMES


@pytest.mark.slow
def test_official_detr_r50_checkpoint_exports(tmp_path):
    """A converted official DETR-R50 (weights synthesized from the official key layout of the fixture)."""
    from pathlib import Path

    from detr_lab.export.from_checkpoint import export_checkpoint

    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    spec_source = torch.load(fixtures / "detr_r50.pt", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in spec_source["state_dict_spec"]:  # quick fill: the weights' values do not matter here
        if name.endswith(("running_var", "weight")) and len(shape) == 1:
            state[name] = torch.ones(shape) * (0.2 if name.endswith("bn3.weight") else 1.0)
        elif len(shape) == 1:
            state[name] = torch.zeros(shape)
        else:
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[name] = torch.randn(shape, generator=generator) / fan_in**0.5
    torch.save({"model": state}, tmp_path / "detr-r50.pth")
    result = export_checkpoint(tmp_path / "detr-r50.pth", tmp_path / "detr.onnx", height=96, width=128,
                               dynamic=True, verify=True, num_random=2)
    assert result.report.passed, result.report.text()
    assert len(OnnxDetector(result.path).metadata.class_names) == 91


def test_timm_convnext_backbone_exports_dynamic(tmp_path):
    """A timm backbone padded to a size multiple: the padding must stay in the traced graph."""
    from detr_lab.config import load_config
    from detr_lab.models.build import build_model

    cfg = load_config("configs/demo_convnext.yaml", [
        "model.hidden_dim=64", "model.num_queries=7",
        "model.encoder.num_layers=1", "model.decoder.num_layers=1",
    ])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    classes = cfg.model.num_classes
    meta = ExportMetadata(list(range(classes)), [f"class{i}" for i in range(classes)], cfg)
    path = export_onnx(model, tmp_path / "convnext.onnx", metadata=meta, height=128, width=160, dynamic=True)
    report = verify_onnx(model, path, num_random=2, size_range=(96, 200), seed=3)
    assert report.passed, report.text()
