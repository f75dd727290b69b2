"""The two ONNX forms of the deformable attention core, timed on onnxruntime (behind
`tools/bench_onnx_core.py`): "gather" (four bilinear gathers) and "grid_sample" (ONNX GridSample,
one per level), each exported from its PyTorch core at one fixed input size.

    result = benchmark_export_cores(runs=5, threads=1)   # R50 encoder shape at 800 x 1066
"""

from __future__ import annotations

import statistics
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from detr_lab.export.dependencies import require
from detr_lab.models.attention.kernels import ms_deform_attn_core_gather, ms_deform_attn_core_reference
from detr_lab.timer import time_interleaved

# Deformable DETR-R50 encoder at 800 x 1066: strides 8, 16, 32, 64
R50_ENCODER_SHAPES = ((100, 134), (50, 67), (25, 34), (13, 17))


class _Core(nn.Module):
    """(value, sampling_locations, attention_weights) -> output, level sizes fixed in the module."""

    def __init__(self, core, shapes: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        self.core = core
        spatial_shapes = torch.tensor(shapes, dtype=torch.long)
        areas = spatial_shapes.prod(1)
        self.register_buffer("spatial_shapes", spatial_shapes)
        self.register_buffer("level_start_index", torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1])))

    def forward(self, value: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
        return self.core(value, self.spatial_shapes, self.level_start_index, locations, weights)


def benchmark_export_cores(
    *,
    shapes: tuple[tuple[int, int], ...] = R50_ENCODER_SHAPES,
    num_queries: int | None = None,
    heads: int = 8,
    head_dim: int = 32,
    points: int = 4,
    runs: int = 5,
    threads: int | None = 1,
    opset: int = 17,
) -> dict:
    """Median wall and process-CPU seconds of each exported core on onnxruntime, and its largest
    difference from the PyTorch reference core.

    Args:
        shapes: (H, W) per level. num_queries: default one per value position (encoder self-attention).
        runs: timed calls per core (after one warm-up call); the cores take turns.
        threads: onnxruntime intra-op threads.
    Returns:
        `{"gather": {"median_s", "values_s", "cpu_median_s", "max_abs_difference"}, "grid_sample": {...},
        "shape": {...}}`.
    """
    require("onnx")
    ort = require("onnxruntime")
    length = sum(h * w for h, w in shapes)
    num_queries = num_queries or length
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(1, length, heads, head_dim, generator=generator)
    locations = torch.rand(1, num_queries, heads, len(shapes), points, 2, generator=generator)
    weights = torch.rand(1, num_queries, heads, len(shapes), points, generator=generator).softmax(-1)
    inputs = (value, locations, weights)
    reference = _Core(ms_deform_attn_core_reference, shapes)(*inputs)
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="detr_lab_core_") as directory:
        cores = {"gather": ms_deform_attn_core_gather, "grid_sample": ms_deform_attn_core_reference}
        for name, core in cores.items():
            path = Path(directory) / f"{name}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    _Core(core, shapes), inputs, str(path), input_names=["value", "locations", "weights"],
                    output_names=["output"], opset_version=opset, dynamo=False,
                )
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"value": value.numpy(), "locations": locations.numpy(), "weights": weights.numpy()}
    result: dict = {"shape": {"levels": [list(s) for s in shapes], "queries": num_queries, "heads": heads,
                              "head_dim": head_dim, "points": points, "threads": threads}}
    outputs = {name: session.run(None, feed)[0] for name, session in sessions.items()}  # warm-up
    calls = {name: (lambda session=session: session.run(None, feed)) for name, session in sessions.items()}
    times = time_interleaved(calls, runs=runs, warmup=0)
    for name in sessions:
        result[name] = {
            "median_s": round(statistics.median(times[name]["wall"]), 6),
            "values_s": [round(t, 6) for t in times[name]["wall"]],
            "cpu_median_s": round(statistics.median(times[name]["cpu"]), 6),  # all threads of the process
            "max_abs_difference": float((torch.from_numpy(outputs[name]) - reference).abs().max()),
        }
    return result
