"""tools/export.py (--verify), tools/eval.py and tools/infer.py with --backend onnxruntime."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime", reason="the export extra is not installed")

from detr_lab.data.synthetic import ensure_synthetic_dataset, split_paths  # noqa: E402

from factories import load_tool  # noqa: E402


@pytest.fixture(scope="module")
def exported(checkpoints, data_config, tmp_path_factory):
    """The tiny Deformable DETR exported with --dynamic --verify on random and validation images."""
    path = tmp_path_factory.mktemp("tool_export") / "deformable.onnx"
    argv = ["--checkpoint", str(checkpoints["refine"]), "--output", str(path), "--height", "96",
            "--width", "128", "--dynamic", "--verify", "--config", str(data_config), "--verify-batches", "2"]
    return path, argv


@pytest.mark.slow  # tool end to end
def test_export_tool_verifies_within_tolerance(exported, capsys):
    path, argv = exported
    assert load_tool("export").main(argv) == 0
    out = capsys.readouterr().out
    assert path.is_file() and f"ONNX model written to {path}" in out
    assert out.count("random ") == 2 and out.count("validation batch") == 2
    assert "verify PASSED" in out


@pytest.mark.slow  # tool end to end
def test_export_tool_fails_beyond_tolerance(exported, tmp_path, capsys):
    _, argv = exported
    argv = [*argv[:3], str(tmp_path / "strict.onnx"), *argv[4:], "--tolerance", "1e-12"]
    assert load_tool("export").main(argv) == 1
    captured = capsys.readouterr()
    assert "verify FAILED" in captured.out and "beyond the tolerance" in captured.err


def test_export_tool_one_line_errors(checkpoints, tmp_path, capsys):
    tool = load_tool("export")
    assert tool.main(["--checkpoint", str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "m.onnx")]) == 1
    expected = f"export.py: error: checkpoint not found: {tmp_path / 'nope.ckpt'}"
    assert capsys.readouterr().err.strip() == expected
    argv = ["--checkpoint", str(checkpoints["detr"]), "--output", str(tmp_path / "m.onnx"),
            "--set", "model.encoder.attention=act"]
    assert tool.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ACT" in err[0] and "--set model.encoder.attention=plain" in err[0]
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(SystemExit) as usage:  # a config without --verify would be ignored: refused
        tool.main(["--checkpoint", str(checkpoints["detr"]), "--output", str(tmp_path / "m.onnx"),
                   "--config", "configs/demo.yaml"])
    assert usage.value.code == 2 and "add --verify" in capsys.readouterr().err


@pytest.mark.slow  # two COCO evaluations
def test_eval_onnxruntime_ap_equals_pytorch_ap(exported, checkpoints, data_config, tmp_path, capsys):
    path, argv = exported
    if not path.is_file():
        assert load_tool("export").main(argv) == 0
    from detr_lab.engine.evaluate import evaluate_checkpoint
    from detr_lab.predict.onnx_evaluation import evaluate_onnx

    torch_result = evaluate_checkpoint(data_config, checkpoints["refine"], output=tmp_path / "pt.json",
                                       device="cpu", progress=False)
    ort_result = evaluate_onnx(data_config, path, output=tmp_path / "ort.json", progress=False)
    assert ort_result.num_images == torch_result.num_images == 4
    for name, value in torch_result.stats.items():
        assert abs(ort_result.stats[name] - value) <= 1e-3, name
    pt = sorted(json.loads((tmp_path / "pt.json").read_text()), key=lambda r: (r["image_id"], r["bbox"]))
    ort = sorted(json.loads((tmp_path / "ort.json").read_text()), key=lambda r: (r["image_id"], r["bbox"]))
    assert len(pt) == len(ort) > 0
    for a, b in zip(pt, ort, strict=True):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert abs(a["score"] - b["score"]) <= 1e-4
        assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"], strict=True)) <= 1e-2
    # the tool: same summary path, exit 0; a missing --model is a usage error
    eval_tool = load_tool("eval")
    assert eval_tool.main(["--config", str(data_config), "--backend", "onnxruntime", "--model", str(path),
                           "--output", str(tmp_path / "tool.json"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "\nval: AP " in f"\n{printed}" and f"\nreport: {tmp_path / 'tool-report'} " in printed
    with pytest.raises(SystemExit) as usage:
        eval_tool.main(["--config", str(data_config), "--backend", "onnxruntime"])
    assert usage.value.code == 2


def test_infer_onnxruntime_writes_the_pytorch_outputs(exported, checkpoints, data_config, tmp_path):
    path, argv = exported
    if not path.is_file():
        assert load_tool("export").main(argv) == 0
    from detr_lab.config import load_config

    images_dir, _ = split_paths(ensure_synthetic_dataset(load_config(data_config).data), "val")
    images = sorted(images_dir.iterdir())[:3]
    infer = load_tool("infer")
    common = [*map(str, images), "--score-threshold", "0.0", "--batch-size", "2"]
    pt_dir, ort_dir = tmp_path / "pt", tmp_path / "ort"
    assert infer.main([*common, "--checkpoint", str(checkpoints["refine"]), "--output-dir", str(pt_dir)]) == 0
    assert infer.main([*common, "--backend", "onnxruntime", "--model", str(path),
                       "--output-dir", str(ort_dir)]) == 0
    pt = json.loads((pt_dir / "detections.json").read_text())
    ort = json.loads((ort_dir / "detections.json").read_text())
    assert len(pt["images"]) == len(ort["images"]) == 3
    for a, b in zip(pt["images"], ort["images"], strict=True):
        assert {k: a[k] for k in ("file", "width", "height", "annotated")} == {
            k: b[k] for k in ("file", "width", "height", "annotated")}
        assert (ort_dir / b["annotated"]).is_file()
        left = sorted(a["detections"], key=lambda d: d["box"])
        right = sorted(b["detections"], key=lambda d: d["box"])
        assert len(left) == len(right) > 0
        for x, y in zip(left, right, strict=True):
            assert (x["category_id"], x["class_name"]) == (y["category_id"], y["class_name"])
            assert abs(x["score"] - y["score"]) <= 2e-4
            assert max(abs(p - q) for p, q in zip(x["box"], y["box"], strict=True)) <= 0.02


def test_onnx_file_without_detr_lab_metadata_is_one_line_error(data_config, tmp_path, capsys):
    import torch

    class Twice(torch.nn.Module):
        def forward(self, images, padding_mask):
            return images * 2, padding_mask

    path = tmp_path / "foreign.onnx"
    torch.onnx.export(Twice(), (torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool)), str(path),
                      input_names=["images", "padding_mask"], dynamo=False)
    code = load_tool("eval").main(["--config", str(data_config), "--backend", "onnxruntime", "--model",
                                   str(path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert str(path) in err[0] and "not a model written by detr_lab's export" in err[0]
