"""The benchmark's onnxruntime mode: exported at the case size, timed beside the PyTorch paths."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime", reason="the export extra is not installed")

from detr_lab.benchmark import BenchmarkSettings, format_report, run_benchmark  # noqa: E402

from factories import tiny_overrides  # noqa: E402

TINY = tiny_overrides(  # the YAML's classes; the benchmark itself switches pretrained weights off
    hidden_dim=64, num_heads=2, num_queries=7, decoder__num_layers=1,
    num_classes=None, backbone__pretrained=None,
)


@pytest.mark.slow  # export + timed runs
def test_onnxruntime_mode_times_the_exported_model():
    settings = BenchmarkSettings(
        sizes=[(64, 96)], batch_sizes=[1], tasks=["inference"], modes=["reference", "onnxruntime"],
        runs=2, warmup=1, threads=1, overrides=TINY,
    )
    report = run_benchmark(["configs/deformable.yaml"], settings)
    case = report["models"][0]["cases"][0]
    figures = case["modes"]["onnxruntime"]
    assert len(figures["wall_s"]["values"]) == 2 and figures["wall_s"]["median"] > 0
    difference = figures["max_abs_difference"]  # against the PyTorch reference path, same weights
    assert difference["pred_logits"] <= 1e-4 and difference["pred_boxes"] <= 1e-4
    assert "ratio_onnxruntime" in case
    assert "onnxruntime" in format_report(report)


def test_onnxruntime_mode_refuses_the_training_step():
    settings = BenchmarkSettings(
        sizes=[(64, 96)], batch_sizes=[1], tasks=["train_step"], modes=["onnxruntime"], runs=1,
        overrides=TINY,
    )
    with pytest.raises(ValueError, match="onnxruntime mode measures CPU inference only"):
        run_benchmark(["configs/deformable.yaml"], settings)


@pytest.mark.slow  # export, conversion, quantization + timed runs
def test_openvino_and_int8_modes_time_their_models():
    pytest.importorskip("openvino", reason="the export extra (openvino) is not installed")
    settings = BenchmarkSettings(
        sizes=[(64, 96)], batch_sizes=[1], tasks=["inference"],
        modes=["reference", "openvino", "onnxruntime_int8"], runs=1, warmup=1, threads=1, overrides=TINY,
    )
    report = run_benchmark(["configs/detr_r50.yaml"], settings)
    case = report["models"][0]["cases"][0]
    openvino = case["modes"]["openvino"]["max_abs_difference"]
    assert openvino["pred_logits"] <= 1e-4 and openvino["pred_boxes"] <= 1e-4  # FP32 IR
    int8 = case["modes"]["onnxruntime_int8"]
    assert int8["wall_s"]["median"] > 0 and int8["max_abs_difference"]["pred_logits"] > 1e-6  # quantized
    text = format_report(report)
    assert "openvino" in text and "onnxruntime_int8" in text


@pytest.mark.slow  # two exports + timed runs
def test_exported_files_are_made_once_for_every_thread_count(monkeypatch):
    pytest.importorskip("openvino", reason="the export extra (openvino) is not installed")
    from detr_lab.benchmark import detectors
    from detr_lab.export.openvino_runtime import OpenVinoRepeatError
    from detr_lab.export.timing import ExportedModel

    exported = []
    export = detectors.export_for_timing

    def counting_export(*args, **kwargs):
        exported.append(kwargs["runtime"])
        return export(*args, **kwargs)

    loaded_threads = []
    load = ExportedModel.call

    def refusing_openvino(self, images, padding_mask, *, threads=None):
        loaded_threads.append((self.runtime, threads))
        if self.runtime == "openvino":  # as a model failing OpenVINO's repeat check would be
            raise OpenVinoRepeatError(f"{self.path}: outputs differ between two calls")
        return load(self, images, padding_mask, threads=threads)

    monkeypatch.setattr(detectors, "export_for_timing", counting_export)
    monkeypatch.setattr(ExportedModel, "call", refusing_openvino)
    settings = BenchmarkSettings(
        sizes=[(64, 96)], batch_sizes=[1], tasks=["inference"], modes=["fast", "onnxruntime", "openvino"],
        runs=1, warmup=0, threads=[1, 2], overrides=TINY,
    )
    report = run_benchmark(["configs/deformable.yaml"], settings)
    assert sorted(exported) == ["onnxruntime", "openvino"]  # one file each, both thread counts
    assert sorted(loaded_threads) == [("onnxruntime", 1), ("onnxruntime", 2), ("openvino", 1),
                                      ("openvino", 2)]
    cases = report["models"][0]["cases"]
    assert [case["threads"] for case in cases] == [1, 2]
    for case in cases:
        assert list(case["modes"]) == ["fast", "onnxruntime", "openvino"]
        assert "differ between two calls" in case["modes"]["openvino"]["error"]
        assert case["modes"]["onnxruntime"]["wall_s"]["median"] > 0
    text = format_report(report)
    assert "refused" in text
    latency = [line.split() for line in text.split("inference latency")[1].splitlines()[3:5]]
    assert [row[3] for row in latency] == ["1", "2"] and all(row[6] == "-" for row in latency)
