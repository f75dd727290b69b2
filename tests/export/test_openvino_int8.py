"""OpenVINO export (--format openvino, --fp16) and INT8 (--quantize int8) with their proofs, on tiny
models: --verify, eval.py / infer.py --backend openvino, Predictor.from_openvino, the refusal of an INT8
model that loses more than --max-ap-drop AP, and the one-line errors without the extra."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the export extra is not installed")
pytest.importorskip("openvino", reason="the export extra (openvino) is not installed")

from export_helpers import CATEGORY_IDS, CLASS_NAMES  # noqa: E402

from detr_lab.config import load_config  # noqa: E402
from detr_lab.data.synthetic import ensure_synthetic_dataset, split_paths  # noqa: E402
from detr_lab.errors import MissingExtraError  # noqa: E402
from detr_lab.export.dependencies import require  # noqa: E402
from detr_lab.export.openvino_runtime import OpenVinoDetector, OpenVinoRepeatError  # noqa: E402
from detr_lab.predict import Predictor  # noqa: E402

from factories import load_tool  # noqa: E402

SIZE = ["--height", "96", "--width", "128", "--dynamic"]


@pytest.fixture(scope="module")
def openvino_model(checkpoints, data_config, tmp_path_factory):
    """The tiny two-level Deformable DETR exported to OpenVINO with --verify on random and validation
    images: (path, exit code, the tool's stdout)."""
    path = tmp_path_factory.mktemp("openvino") / "deformable.xml"
    argv = ["--checkpoint", str(checkpoints["refine"]), "--output", str(path), "--format", "openvino", *SIZE,
            "--verify", "--config", str(data_config), "--verify-batches", "2"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = load_tool("export").main(argv)
    return path, code, out.getvalue()


@pytest.fixture(scope="module")
def labelled_by_model(checkpoints, data_config, tmp_path_factory):
    """A data config whose ground truth is the tiny DETR's own 3 best detections per image (the
    synthetic images, relabelled), so that the FP32 model scores a high AP and INT8 losses show."""
    cfg = load_config(data_config)
    source = ensure_synthetic_dataset(cfg.data)
    root = tmp_path_factory.mktemp("relabelled")
    predictor = Predictor.from_checkpoint(checkpoints["detr"])
    for split in ("train", "val"):
        images, annotations = split_paths(source, split)
        target_images, target_annotations = split_paths(root, split)
        shutil.copytree(images, target_images)
        coco = json.loads(annotations.read_text())
        coco["categories"] = [{"id": i, "name": n} for i, n in zip(CATEGORY_IDS, CLASS_NAMES, strict=True)]
        coco["annotations"] = []
        for image in coco["images"]:
            found = predictor.predict(target_images / image["file_name"], score_threshold=0.0)[0]
            best = zip(found["boxes"][:3].tolist(), found["category_ids"][:3].tolist(), strict=True)
            for (x1, y1, x2, y2), category in best:
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": image["id"], "category_id": category,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                })
        target_annotations.parent.mkdir(parents=True, exist_ok=True)
        target_annotations.write_text(json.dumps(coco))
    path = root / "relabelled.yaml"
    path.write_text(f"""
data: {{dataset: coco, root: {root}, batch_size: 2, num_workers: 0, doctor: false,
       augment: {{eval_size: 64, eval_max_size: 96}}}}
trainer: {{output_dir: {root}/run, accelerator: cpu}}
""")
    return path


@pytest.mark.slow  # export, verify, two evaluations
def test_openvino_export_verifies_and_matches_pytorch_ap(openvino_model, checkpoints, data_config, tmp_path,
                                                         capsys):
    path, code, out = openvino_model
    assert code == 0, out
    assert path.is_file() and path.with_suffix(".bin").is_file()
    assert out.count("random ") == 2 and out.count("validation batch") == 2
    assert "verify PASSED: max |openvino - PyTorch|" in out
    assert OpenVinoDetector(path).precision == "f32"

    from detr_lab.engine.evaluate import evaluate_checkpoint
    from detr_lab.predict.onnx_evaluation import evaluate_onnx

    torch_result = evaluate_checkpoint(data_config, checkpoints["refine"], output=tmp_path / "pt.json",
                                       device="cpu", progress=False)
    ov_result = evaluate_onnx(data_config, path, output=tmp_path / "ov.json", progress=False,
                              backend="openvino")
    assert ov_result.num_images == torch_result.num_images == 4
    for name, value in torch_result.stats.items():
        assert abs(ov_result.stats[name] - value) <= 1e-3, name
    argv = ["--config", str(data_config), "--backend", "openvino", "--model", str(path),
            "--output", str(tmp_path / "tool.json"), "--no-progress"]
    assert load_tool("eval").main(argv) == 0
    assert "val: AP " in capsys.readouterr().out


@pytest.mark.slow  # sliced inference on two backends
def test_sliced_inference_on_openvino_matches_pytorch(openvino_model, checkpoints, data_config, tmp_path):
    path = openvino_model[0]
    folder = split_paths(ensure_synthetic_dataset(load_config(data_config).data), "val")[0]
    image = sorted(folder.iterdir())[0]
    options = dict(score_threshold=0.0, slice_size=40, overlap=0.2)
    expected = Predictor.from_checkpoint(checkpoints["refine"], optimize=False).predict(image, **options)[0]
    predictor = Predictor.from_openvino(path)
    assert predictor.backend == "openvino"
    got = predictor.predict(image, **options)[0]
    assert len(expected["boxes"]) > 0 and got["labels"].tolist() == expected["labels"].tolist()
    assert (got["boxes"] - expected["boxes"]).abs().max() < 1e-2
    argv = [str(image), "--backend", "openvino", "--model", str(path), "--output-dir", str(tmp_path / "out"),
            "--slice", "40", "--overlap", "0.2", "--score-threshold", "0.0"]
    assert load_tool("infer").main(argv) == 0
    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert len(detections["images"][0]["detections"]) == len(expected["boxes"])


def test_a_model_whose_second_inference_differs_is_refused(openvino_model, checkpoints, tmp_path, monkeypatch,
                                                        capsys):
    """The repeat check (OpenVINO 2026.4 computed trained RT-DETR / DEIM / DINO demo graphs right only
    on a compiled model's first call): a runtime whose second call differs is refused at load, and
    the export without --verify writes nothing."""
    path, code, _ = openvino_model
    assert code == 0
    assert OpenVinoDetector(path).check_repeatable() <= 1e-4  # a sound model passes
    original = OpenVinoDetector.run
    calls = []

    def drifting(self, images, padding_mask):
        logits, boxes = original(self, images, padding_mask)
        calls.append(1)
        return logits + 0.5 * (len(calls) > 1), boxes

    monkeypatch.setattr(OpenVinoDetector, "run", drifting)
    with pytest.raises(OpenVinoRepeatError, match="first and second inference .largest difference 0.5"):
        OpenVinoDetector(path)
    assert OpenVinoDetector(path, check=False).precision == "f32"
    calls.clear()
    output = tmp_path / "refused.xml"
    argv = ["--checkpoint", str(checkpoints["refine"]), "--output", str(output), "--format", "openvino",
            *SIZE]
    assert load_tool("export").main(argv) == 1
    assert "refused.xml: OpenVINO" in capsys.readouterr().err
    assert not output.exists() and not output.with_suffix(".bin").exists()
    assert not list(tmp_path.glob(".export_*"))


def test_openvino_fp16_is_written_only_when_its_proof_passes(checkpoints, tmp_path, capsys):
    tool = load_tool("export")
    path = tmp_path / "half.xml"
    argv = ["--checkpoint", str(checkpoints["detr"]), "--output", str(path), "--format", "openvino", *SIZE,
            "--fp16", "--verify", "--verify-batches", "1", "--tolerance", "1e-12"]
    assert tool.main(argv) == 1
    captured = capsys.readouterr()
    assert "verify FAILED" in captured.out
    assert captured.err.strip().splitlines() == [
        "export.py: error: openvino differs from PyTorch beyond the tolerance; no FP16 model written"]
    assert not path.exists() and not path.with_suffix(".bin").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left behind
    with pytest.raises(SystemExit) as usage:
        tool.main(["--checkpoint", str(checkpoints["detr"]), "--output", str(path), "--format", "openvino",
                   "--fp16"])
    assert usage.value.code == 2 and "--verify" in capsys.readouterr().err


@pytest.mark.slow  # sensitivity analysis: 4 quantizations and 5 evaluations
def test_int8_refused_when_the_ap_drop_is_too_large_then_forced(checkpoints, labelled_by_model, tmp_path,
                                                                capsys):
    tool = load_tool("export")
    path = tmp_path / "int8.onnx"
    report_path = tmp_path / "report.json"
    argv = ["--checkpoint", str(checkpoints["detr"]), "--output", str(path), *SIZE, "--quantize", "int8",
            "--config", str(labelled_by_model), "--calibration-images", "2", "--report", str(report_path)]
    assert tool.main(argv) == 1
    captured = capsys.readouterr()
    report = json.loads(report_path.read_text())
    assert not path.exists() and report["written"] is False and report["passed"] is False
    names = [m["name"] for m in report["measures"]]
    assert names == ["fp32", "base", "group:box_heads", "group:score_heads", "int8"]
    fp32, int8 = report["measures"][0]["ap"], report["measures"][-1]["ap"]
    assert fp32 > 50.0  # the ground truth is the model's own detections
    assert report["ap_drop"] == pytest.approx(fp32 - int8) and report["ap_drop"] > 1.0
    # what stayed float is what the measurements chose, each with its reason
    assert set(report["kept_float"]) | set(report["quantized_groups"]) == {"box_heads", "score_heads"}
    assert "int8 FAILED" in captured.out and "kept float" in captured.out
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and "no INT8 model written" in error[0] and "--max-ap-drop 1" in error[0]

    assert tool.main([*argv, "--force", "--no-sensitivity"]) == 0
    assert "forced past --max-ap-drop" in capsys.readouterr().out
    onnx = require("onnx")
    graph = onnx.load(str(path)).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)
    detector = Predictor.from_onnx(path)
    assert detector.class_names == CLASS_NAMES  # the metadata came along
    assert json.loads(report_path.read_text())["forced"] is True


@pytest.mark.slow  # NNCF quantization
def test_int8_openvino_export_with_nncf(checkpoints, labelled_by_model, tmp_path, capsys):
    pytest.importorskip("nncf", reason="the export extra (nncf) is not installed")
    path = tmp_path / "int8.xml"
    argv = ["--checkpoint", str(checkpoints["detr"]), "--output", str(path), "--format", "openvino", *SIZE,
            "--quantize", "int8", "--verify", "--config", str(labelled_by_model), "--calibration-images", "2",
            "--no-sensitivity", "--max-ap-drop", "100"]
    assert load_tool("export").main(argv) == 0
    out = capsys.readouterr().out
    assert "verify PASSED: max |openvino - PyTorch|" in out  # the FP32 IR before quantization
    assert "int8 PASSED" in out and f"INT8 OpenVINO model written to {path}" in out
    assert OpenVinoDetector(path).precision == "int8"
    assert "FakeQuantize" in path.read_text()
    report = json.loads(path.with_name(path.name + ".int8-report.json").read_text())
    assert report["backend"] == "openvino" and report["written"] is True


def test_missing_runtime_is_one_line_naming_the_extra(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(MissingExtraError, match=r"'openvino' is not installed; OpenVINO .*\.\[export\]"):
        require("openvino")
    argv = ["--checkpoint", str(checkpoints["detr"]), "--output", str(tmp_path / "m.xml"),
            "--format", "openvino"]
    assert load_tool("export").main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "pip install" in error[0] and "openvino" in error[0]
    monkeypatch.setitem(sys.modules, "sahi.slicing", None)
    with pytest.raises(MissingExtraError, match="'sahi' is not installed"):
        Predictor.from_checkpoint(checkpoints["detr"]).predict(np.zeros((80, 80, 3), np.uint8), slice_size=64)


@pytest.mark.parametrize("variant", ["two_stage", "dino"])
def test_two_stage_members_compute_the_same_on_every_call(variant, checkpoints, tmp_path):
    """The encoder proposals' token offsets used to be a `CumSum` over the level areas: OpenVINO's CPU
    plugin left that subgraph unfolded, ran it once as a runtime constant and then divided its cached
    result in place on every call, so every call after the first drifted (0.56, then 0.88 on the
    logits of a random D-FINE-N). Built without `CumSum`, the graph is folded at conversion and the
    repeat check passes."""
    path = tmp_path / f"{variant}.xml"
    fixed_size = ["--height", "96", "--width", "128"]  # sizes known at export: the subgraph is constant
    argv = ["--checkpoint", str(checkpoints[variant]), "--output", str(path), "--format", "openvino",
            *fixed_size]
    with contextlib.redirect_stdout(io.StringIO()):
        assert load_tool("export").main(argv) == 0
    assert OpenVinoDetector(path, check=False).check_repeatable() <= 1e-4
