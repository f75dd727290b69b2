"""Timing the deformable attention core implementations on Deformable-DETR-R50 shapes.

Inputs mimic the real model: the 4-level map of an 800 x 1066 image (strides 8..64: 100x134, 50x67,
25x34, 13x17; Lv = 17821), 8 heads of 32 channels, 4 points per level.

- "encoder": one query per map position (Lq = Lv), reference point at its pixel centre;
- "decoder": 300 queries with random reference points.

Sampling offsets are the official initial pattern (head direction x point index, in pixels) plus
unit Gaussian noise, so that points scatter around the reference like a trained model's, some of
them off the map; attention weights are a softmax of Gaussian logits.

Timings call the implementations in turn inside each repetition, so that load from other processes
affects all of them alike; statistics are over `runs` repetitions after `warmup` untimed ones. Wall
time is the measure; the process CPU time (all threads) is recorded beside it, which shows how much of
the wall time a loaded machine added. On an oversubscribed machine GNU OpenMP's busy-waiting makes
every multi-threaded op slow; `OMP_WAIT_POLICY=PASSIVE` (set before starting Python) avoids that.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import ms_deform_attn_core

R50_SPATIAL_SHAPES = ((100, 134), (50, 67), (25, 34), (13, 17))
DECODER_QUERIES = 300


def core_inputs(
    kind: str,
    *,
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 32,
    points: int = 4,
    spatial_shapes: Sequence[tuple[int, int]] = R50_SPATIAL_SHAPES,
    num_queries: int = DECODER_QUERIES,
    device: str | torch.device = "cpu",
    value_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Core arguments for an "encoder" (Lq = Lv) or "decoder" (`num_queries`) call.

    Returns:
        dict with `value` `[B, Lv, heads, dh]` (`value_dtype`), `spatial_shapes` int64 `[L, 2]`,
        `level_start_index` int64 `[L]`, float32 `sampling_locations` `[B, Lq, heads, L, P, 2]` and
        `attention_weights` `[B, Lq, heads, L, P]`.
    """
    if kind not in ("encoder", "decoder"):
        raise ValueError(f"kind must be 'encoder' or 'decoder', got {kind!r}")
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(spatial_shapes, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    levels = len(spatial_shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, head_dim, generator=generator)
    if kind == "encoder":
        centres = []
        for height, width in spatial_shapes:
            rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            centres.append(torch.stack(((cols.flatten() + 0.5) / width, (rows.flatten() + 0.5) / height), -1))
        reference = torch.cat(centres)[None].expand(batch, -1, -1)  # (B, Lv, 2)
    else:
        reference = torch.rand(batch, num_queries, 2, generator=generator)
    queries = reference.shape[1]
    angles = torch.arange(heads) * (2 * math.pi / heads)
    directions = torch.stack((angles.cos(), angles.sin()), -1)
    directions = directions / directions.abs().max(-1, keepdim=True).values
    pattern = directions[:, None, None, :] * torch.arange(1, points + 1)[None, None, :, None]  # (nh, 1, P, 2)
    offsets = pattern + torch.randn(batch, queries, heads, levels, points, 2, generator=generator)
    normalizer = shapes.flip(-1).to(torch.float32)  # (L, 2): (W, H)
    locations = reference[:, :, None, None, None, :] + offsets / normalizer[None, None, None, :, None, :]
    logits = torch.randn(batch, queries, heads, levels * points, generator=generator)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return {
        "value": value.to(device=device, dtype=value_dtype),
        "spatial_shapes": shapes.to(device),
        "level_start_index": level_start_index.to(device),
        "sampling_locations": locations.to(device),
        "attention_weights": weights.to(device),
    }


def _forward_call(impl: str, inputs: dict[str, Tensor]) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            ms_deform_attn_core(**inputs, impl=impl)

    return call


def _forward_backward_call(impl: str, inputs: dict[str, Tensor]) -> Callable[[], None]:
    trainable = ("value", "sampling_locations", "attention_weights")
    leaves = {k: (v.detach().clone().requires_grad_() if k in trainable else v) for k, v in inputs.items()}
    value = inputs["value"]
    batch, _, heads, head_dim = value.shape
    grad_output = torch.randn(
        batch, inputs["sampling_locations"].shape[1], heads * head_dim, device=value.device, dtype=value.dtype
    )

    def call() -> None:
        for name in trainable:
            leaves[name].grad = None
        ms_deform_attn_core(**leaves, impl=impl).backward(grad_output)

    return call


def time_calls(
    calls: dict[str, Callable[[], None]],
    *,
    warmup: int,
    runs: int,
    synchronize: Callable[[], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds per call of each function, calling them in turn in every run.

    Returns:
        `{name: {"wall": [...], "cpu": [...]}}`, one entry per run.
    """
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        for call in calls.values():
            call()
    sync()
    times = {name: {"wall": [], "cpu": []} for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            sync()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def summarize(times: dict[str, list[float]]) -> dict[str, float]:
    """Wall time median, min, max and interquartile range, and the CPU time median, in milliseconds."""
    ms = sorted(s * 1e3 for s in times["wall"])
    quartiles = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {
        "median_ms": statistics.median(ms),
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "iqr_ms": quartiles[2] - quartiles[0],
        "cpu_median_ms": statistics.median(s * 1e3 for s in times["cpu"]),
    }


def benchmark_core(
    impls: Sequence[str],
    kind: str,
    *,
    device: str | torch.device = "cpu",
    value_dtype: torch.dtype = torch.float32,
    batch: int = 1,
    warmup: int = 1,
    runs: int = 5,
    backward: bool = True,
    spatial_shapes: Sequence[tuple[int, int]] = R50_SPATIAL_SHAPES,
) -> list[dict]:
    """Time `impls` on the `kind` inputs: forward (no grad) and, with `backward`, forward + backward.

    Returns:
        one row per (pass, impl): `kind`, `pass`, `impl`, `dtype`, `runs`, the `summarize` fields and
        `speedup` = reference median / this median (when "reference" is among `impls`).
    """
    device = torch.device(device)
    inputs = core_inputs(
        kind, batch=batch, device=device, value_dtype=value_dtype, spatial_shapes=spatial_shapes
    )
    synchronize = torch.cuda.synchronize if device.type == "cuda" else None
    passes = {"forward": _forward_call}
    if backward:
        passes["forward+backward"] = _forward_backward_call
    rows = []
    for pass_name, make_call in passes.items():
        calls = {impl: make_call(impl, inputs) for impl in impls}
        times = time_calls(calls, warmup=warmup, runs=runs, synchronize=synchronize)
        stats = {impl: summarize(times[impl]) for impl in impls}
        for impl in impls:
            dtype = str(value_dtype).replace("torch.", "")
            row = {"kind": kind, "pass": pass_name, "impl": impl, "dtype": dtype, "runs": runs, **stats[impl]}
            if "reference" in stats:
                row["speedup"] = stats["reference"]["median_ms"] / stats[impl]["median_ms"]
            rows.append(row)
    return rows


def machine_description(device: str | torch.device = "cpu") -> dict:
    """CPU model, core and thread counts, load, library versions and the GPU name (for CUDA)."""
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15min"] = list(os.getloadavg())
    threading_env = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
    info["env"] = {name: os.environ[name] for name in threading_env if name in os.environ}
    try:
        import triton

        info["triton_version"] = triton.__version__
    except Exception:
        info["triton_version"] = None
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
