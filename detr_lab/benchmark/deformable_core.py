"""Timing the deformable attention core implementations on Deformable-DETR-R50 shapes.

Inputs mimic the real model: the 4-level map of an 800 x 1066 image (strides 8..64: 100x134, 50x67,
25x34, 13x17; Lv = 17821), 8 heads of 32 channels, 4 points per level.

- "encoder": one query per map position (Lq = Lv), reference point at its pixel centre;
- "decoder": 300 queries with random reference points.

Sampling offsets are the official initial pattern (head direction x point index, in pixels) plus
unit Gaussian noise, so that points scatter around the reference like a trained model's, some of
them off the map; attention weights are a softmax of Gaussian logits.

Timings use the one timer (`detr_lab.timer`): the implementations take turns inside
each repetition, so that load from other processes affects all of them alike; statistics are over
`runs` repetitions after `warmup` untimed ones. Wall
time is the measure; the process CPU time (all threads) is recorded beside it, which shows how much of
the wall time a loaded machine added. On an oversubscribed machine GNU OpenMP's busy-waiting makes
every multi-threaded op slow; `OMP_WAIT_POLICY=PASSIVE` (set before starting Python) avoids that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from detr_lab.benchmark.machine import describe_machine, load_average
from detr_lab.benchmark.report import format_table
from detr_lab.models.attention.kernels import ms_deform_attn_core, triton_available
from detr_lab.timer import summarize, time_interleaved

R50_SPATIAL_SHAPES = ((100, 134), (50, 67), (25, 34), (13, 17))
DECODER_QUERIES = 300
KINDS = ("encoder", "decoder")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def summarize_ms(times: dict[str, list[float]]) -> dict[str, float]:
    """Wall time median, min, max and interquartile range, and the CPU time median, in milliseconds."""
    wall, cpu = summarize([s * 1e3 for s in times["wall"]]), summarize([s * 1e3 for s in times["cpu"]])
    return {
        "median_ms": wall["median"],
        "min_ms": wall["min"],
        "max_ms": wall["max"],
        "iqr_ms": round(wall["q3"] - wall["q1"], 6),
        "cpu_median_ms": cpu["median"],
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
    passes = {"forward": _forward_call}
    if backward:
        passes["forward+backward"] = _forward_backward_call
    rows = []
    for pass_name, make_call in passes.items():
        calls = {impl: make_call(impl, inputs) for impl in impls}
        times = time_interleaved(calls, warmup=warmup, runs=runs, device=device)
        stats = {impl: summarize_ms(times[impl]) for impl in impls}
        for impl in impls:
            dtype = str(value_dtype).replace("torch.", "")
            row = {"kind": kind, "pass": pass_name, "impl": impl, "dtype": dtype, "runs": runs, **stats[impl]}
            if "reference" in stats:
                row["speedup"] = stats["reference"]["median_ms"] / stats[impl]["median_ms"]
            rows.append(row)
    return rows


def default_impls(device: str | torch.device) -> list[str]:
    """reference + the device's fast core: "cpu_fast" on the CPU, "triton" on CUDA."""
    return ["reference", "triton"] if torch.device(device).type == "cuda" else ["reference", "cpu_fast"]


def run_core_benchmark(
    *,
    device: str = "cpu",
    kinds: Sequence[str] = KINDS,
    impls: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("float32",),
    batch: int = 1,
    runs: int = 7,
    warmup: int = 2,
    threads: int | None = None,
    backward: bool = True,
    log: Callable[[str], None] | None = None,
    spatial_shapes: Sequence[tuple[int, int]] = R50_SPATIAL_SHAPES,
) -> dict:
    """`benchmark_core` for every dtype and kind; returns `{"machine", "settings", "rows"}`.

    `impls` None means `default_impls(device)`; "triton" is left out (with a `log` line) where Triton
    cannot be imported. `threads` sets torch's CPU threads for the run (restored afterwards).
    `spatial_shapes`: the value's levels (H, W) (default: Deformable-DETR-R50 at 800 x 1066).
    Raises:
        ValueError: CUDA requested but not available, or an unknown kind or dtype.
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}': no CUDA device is available")
    unknown = [k for k in kinds if k not in KINDS] + [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown kind or dtype {unknown}; kinds: {list(KINDS)}, dtypes: {sorted(DTYPES)}")
    impls = list(impls) if impls is not None else default_impls(device)
    if "triton" in impls and not triton_available():
        if log is not None:
            log("Triton cannot be imported: leaving it out")
        impls = [impl for impl in impls if impl != "triton"]
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        machine = describe_machine(device)
        rows = []
        for dtype_name in dtypes:
            for kind in kinds:
                rows += benchmark_core(
                    impls, kind, device=device, value_dtype=DTYPES[dtype_name], batch=batch,
                    warmup=warmup, runs=runs, backward=backward, spatial_shapes=spatial_shapes,
                )  # fmt: skip
        machine["load_average_end"] = load_average()
    finally:
        torch.set_num_threads(threads_before)
    settings = {"device": device, "kinds": list(kinds), "impls": impls, "dtypes": list(dtypes),
                "batch": batch, "runs": runs, "warmup": warmup, "threads": threads,
                "backward": backward, "spatial_shapes": [list(s) for s in spatial_shapes]}  # fmt: skip
    return {"machine": machine, "settings": settings, "rows": rows}


def format_core_table(rows: Sequence[dict]) -> str:
    """One line per (kind, pass, dtype, impl): wall median, min, max, IQR (ms), speed-up, CPU median."""
    header = ("kind", "pass", "dtype", "impl", "median ms", "min", "max", "IQR", "speed-up", "CPU ms")
    cells = [
        (
            row["kind"], row["pass"], row["dtype"], row["impl"], f"{row['median_ms']:.1f}",
            f"{row['min_ms']:.1f}", f"{row['max_ms']:.1f}", f"{row['iqr_ms']:.1f}",
            f"{row['speedup']:.2f}x" if "speedup" in row else "", f"{row['cpu_median_ms']:.1f}",
        )
        for row in rows
    ]  # fmt: skip
    return format_table(header, cells)
