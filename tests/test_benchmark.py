"""Smoke test of the benchmark library and tool on a tiny config (structure and sane values; no timings)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from detr_lab.benchmark import (
    BREAKDOWN_PARTS,
    BenchmarkSettings,
    benchmark_config,
    count_flops,
    format_latency_table,
    format_report,
    native_size,
    parse_size,
    run_benchmark,
    summarize,
)
from detr_lab.models.build import build_model

from factories import tiny_model_yaml

# pretrained: the benchmark must switch it off (it never downloads).
TINY_YAML = tiny_model_yaml(num_heads=2, num_queries=8, encoder__num_layers=2, backbone__pretrained=True)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


@pytest.fixture(scope="module")
def report(tiny_config):
    settings = BenchmarkSettings(
        sizes=[(64, 64)], batch_sizes=[1], train_batch_sizes=[2], runs=2, warmup=0, threads=1,
        objects_per_image=3, breakdown=True, modes=["fast", "reference", "fast_bf16"],
    )
    threads = torch.get_num_threads()
    result = run_benchmark([tiny_config], settings)
    assert torch.get_num_threads() == threads  # the thread setting is restored
    return result


def test_benchmark_config_never_downloads(tiny_config):
    cfg = benchmark_config(tiny_config)
    assert cfg.model.backbone.pretrained is False and cfg.model.backbone.weights_path is None
    assert cfg.model.hidden_dim == 32


@pytest.mark.slow  # the shared benchmark run times three paths
def test_report_structure_and_values(report, tiny_config):
    machine = report["machine"]
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] == 1
    assert machine["logical_cores"] >= 1 and machine["cpu_model"]
    assert len(machine["load_average"]) == 3
    (entry,) = report["models"]
    model = build_model(benchmark_config(tiny_config).model)
    assert entry["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert 0 < entry["parameters"]["trainable"] < entry["parameters"]["total"]  # stem + layer1 frozen

    cases = {(c["task"], c["batch_size"]): c for c in entry["cases"]}
    assert set(cases) == {("inference", 1), ("train_step", 2)}
    for case in cases.values():
        assert (case["height"], case["width"]) == (64, 64)
        assert set(case["modes"]) == {"fast", "reference", "fast_bf16"}
        for figures in case["modes"].values():
            for kind in ("wall_s", "cpu_s"):
                stats = figures[kind]
                assert len(stats["values"]) == 2 and all(v > 0 for v in stats["values"])
                values = stats["values"]  # the summary describes the measured values
                assert (stats["min"], stats["max"]) == (min(values), max(values))
                assert stats["median"] == pytest.approx(statistics.median(values), abs=1e-6)
            assert figures["memory"]["peak_mib"] > 0
        medians = {mode: statistics.median(f["wall_s"]["values"]) for mode, f in case["modes"].items()}
        assert case["ratio"]["wall"] == pytest.approx(medians["fast"] / medians["reference"], rel=1e-3)
        assert case["flops"] > 0
        assert case["ratio_fast_bf16"]["wall"] > 0
    # Same weights and inputs: the fast float32 path gives the reference path's outputs.
    difference = cases[("inference", 1)]["modes"]["fast"]["max_abs_difference"]
    assert difference["pred_logits"] < 1e-4 and difference["pred_boxes"] < 1e-4
    bf16 = cases[("inference", 1)]["modes"]["fast_bf16"]["max_abs_difference"]
    assert 0 < bf16["pred_logits"] < 1.0 and bf16["pred_boxes"] < 0.1
    assert "max_abs_difference" not in cases[("inference", 1)]["modes"]["reference"]
    # The backward pass roughly doubles the forward work, and the training batch holds two images.
    assert cases[("train_step", 2)]["flops"] > 2 * cases[("inference", 1)]["flops"]


@pytest.mark.slow  # the shared benchmark run times three paths
def test_breakdown_of_inference_parts(report):
    (entry,) = report["models"]
    for case in entry["cases"]:
        for figures in case["modes"].values():
            if case["task"] == "train_step":
                assert "breakdown_s" not in figures
                continue
            parts = figures["breakdown_s"]
            assert set(parts) == {*BREAKDOWN_PARTS, "total"}
            assert parts["backbone"] > 0 and parts["enc_attn_linear"] > 0 and parts["enc_ffn"] > 0
            assert parts["neck"] > 0
            assert parts["decoder"] > 0 and parts["enc_attn_core"] > 0
            measured = sum(parts[name] for name in BREAKDOWN_PARTS if name != "other")
            assert measured <= parts["total"] * 1.01


@pytest.mark.slow  # the shared benchmark run times three paths
def test_report_is_json_and_table_names_rows(report):
    json.loads(json.dumps(report))
    table = format_report(report)
    assert "tiny" in table and "train_step" in table and "reference" in table and "64x64" in table
    assert "breakdown of one inference call" in table and "enc_attn_core" in table


def test_inference_flops_of_a_convolution_have_the_closed_form():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    x = torch.randn(2, 3, 10, 12)
    # one multiply-add = 2 FLOPs per output element and kernel tap
    assert count_flops(lambda: conv(x)) == 2 * (2 * 8 * 10 * 12) * (3 * 3 * 3)


def test_summary_and_size_parsing():
    stats = summarize([3.0, 1.0, 2.0, 4.0])
    assert (stats["min"], stats["median"], stats["max"]) == (1.0, 2.5, 4.0)
    assert (stats["q1"], stats["q3"]) == (1.75, 3.25)  # inclusive quartiles of 1, 2, 3, 4
    assert stats["values"] == [3.0, 1.0, 2.0, 4.0]
    assert parse_size("800x1066") == (800, 1066)
    for bad in ("800", "800x", "axb", "800x1066x3"):
        with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
            parse_size(bad)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"runs": 0}, "runs must be >= 1"),
        ({"warmup": -1}, "warmup must be >= 0"),
        ({"tasks": ["predict"]}, "tasks must be"),
        ({"modes": []}, "modes must be"),
        ({"sizes": [(16, 64)]}, "at least 32x32"),
        ({"batch_sizes": [0]}, "batch sizes must be >= 1"),
        ({"threads": [1, 0]}, "threads must be >= 1"),
        ({"threads": []}, "at least one thread count"),
    ],
)
def test_bad_settings_are_rejected(change, message, tiny_config):
    with pytest.raises(ValueError, match=message):
        run_benchmark([tiny_config], BenchmarkSettings(**change))


def test_native_size_is_the_evaluation_transforms_size_of_a_coco_photo():
    # 480 x 640 with DETR's shorter side 800 (longer <= 1333): 800 x 1066.67 -> 800 x 1066;
    # RT-DETR and D-FINE resize to their square: 640 x 640.
    assert native_size(benchmark_config("configs/detr_r50.yaml")) == (800, 1066)
    assert native_size(benchmark_config("configs/rtdetrv2_r18vd.yaml")) == (640, 640)
    assert native_size(benchmark_config("configs/dfine_n.yaml")) == (640, 640)


def test_each_thread_count_is_a_case_at_the_native_size(tiny_config):
    settings = BenchmarkSettings(
        sizes=[(32, 32)], native_size=True, batch_sizes=[1], tasks=["inference"], modes=["fast", "reference"],
        runs=1, warmup=0, threads=[1, 2],
    )
    threads = torch.get_num_threads()
    report = run_benchmark([tiny_config], settings)
    assert torch.get_num_threads() == threads
    cases = report["models"][0]["cases"]
    expected = native_size(benchmark_config(tiny_config))
    assert [case["threads"] for case in cases] == [1, 2]
    assert {(case["height"], case["width"]) for case in cases} == {expected} != {(32, 32)}
    latency = format_latency_table(report)
    assert "best / fast" in latency
    rows = [line.split() for line in latency.splitlines()[3:]]
    assert [row[3] for row in rows] == ["1", "2"]  # the threads column
    for row, case in zip(rows, cases, strict=True):
        fast, reference = (case["modes"][m]["wall_s"]["median"] * 1e3 for m in ("fast", "reference"))
        assert row[4:6] == [f"{fast:.1f}", f"{reference:.1f}"]
        assert row[6] == ("fast" if fast <= reference else "reference")
