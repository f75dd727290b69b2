"""Benchmarks: one machine description, one report format for every measurement, timed by `detr_lab.timer`.

    report = run_benchmark(["configs/detr_r50.yaml"], BenchmarkSettings(device="cpu", runs=5))
    print(format_report(report))
    write_report(report, "runs/benchmark.json")

Modules:
    machine.py           `describe_machine`: CPU, cores, threads, versions, load, environment, GPU
    measure.py           peak memory and FLOPs of one call, parameter counts
    report.py            `format_table`, `write_report` (atomic JSON)
    detectors.py         whole detectors from configs, fast vs reference paths (tools/benchmark.py)
    deformable_core.py   the deformable attention core implementations (tools/bench_deformable_core.py)
    act.py               ACT encoder self-attention against plain attention (tools/bench_act.py)
    onnx_compare.py      two ONNX detectors side by side on onnxruntime (tools/bench_official_onnx.py)

The last stop before the tools, beside `predict`: may import every other part of detr_lab but
`predict` (`act.py` evaluates checkpoints through `engine`, `detectors.py` times onnxruntime through
`export`); only the tools import it.
"""

from __future__ import annotations

from detr_lab.benchmark.detectors import (
    BREAKDOWN_PARTS,
    DEFAULT_MODES,
    MODES,
    TASKS,
    BenchmarkSettings,
    benchmark_config,
    format_latency_table,
    format_report,
    native_size,
    parse_size,
    run_benchmark,
)
from detr_lab.benchmark.machine import describe_machine
from detr_lab.benchmark.measure import count_flops, count_inference_flops, measure_peak_memory
from detr_lab.benchmark.report import format_table, write_report
from detr_lab.timer import summarize, time_interleaved

__all__ = [
    "BREAKDOWN_PARTS",
    "DEFAULT_MODES",
    "MODES",
    "TASKS",
    "BenchmarkSettings",
    "benchmark_config",
    "count_flops",
    "count_inference_flops",
    "describe_machine",
    "format_latency_table",
    "format_report",
    "format_table",
    "measure_peak_memory",
    "native_size",
    "parse_size",
    "run_benchmark",
    "summarize",
    "time_interleaved",
    "write_report",
]
