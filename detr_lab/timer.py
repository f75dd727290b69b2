"""The one timer: calls taking turns, wall and process CPU seconds, and their summary.

A leaf (torch and the standard library only), so that every package that measures something
(`benchmark`, `export`'s core benchmark, the tools) times it the same way.

Every benchmark times the things it compares in the same loop: within run r the calls go in their
given order for even r and in reverse order for odd r, so that load from other processes (and
warm-up drift) affects all of them alike. Wall time is `time.perf_counter` around the call (after
a CUDA synchronize before and after, when a device is given); CPU time is the process's CPU seconds
(all threads), far less sensitive to other processes taking turns on the cores.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch


def synchronize(device: str | torch.device | None) -> None:
    """Wait for the device's queued work (CUDA); nothing to do on the CPU or with None."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def time_interleaved(
    calls: Mapping[str, Callable[[], object]],
    *,
    runs: int,
    warmup: int,
    device: str | torch.device | None = None,
    block: int = 1,
) -> dict[str, dict[str, list[float]]]:
    """Time each call `runs` times after `warmup` untimed rounds, the calls taking turns (the order of
    the calls alternating from turn to turn).

    `block` 1: turns of one timed call. `block` > 1: each turn is one untimed call, then up to `block`
    timed calls of the same name, for callees that leave work behind them (onnxruntime's worker
    threads keep spinning for a while after a call and, with several threads, slow whichever call runs
    next; turns of one call charge that to both).

    Returns:
        per name `{"wall": [seconds, one per run], "cpu": [process CPU seconds, one per run]}`.
    Raises:
        ValueError: `runs` or `block` < 1, or `warmup` < 0.
    """
    if runs < 1 or warmup < 0 or block < 1:
        raise ValueError(f"runs must be >= 1, block >= 1 and warmup >= 0, got runs={runs}, block={block}, "
                         f"warmup={warmup}")
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
            synchronize(device)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    turn = 0
    while any(len(times[name]["wall"]) < runs for name in names):
        for name in names if turn % 2 == 0 else names[::-1]:
            left = runs - len(times[name]["wall"])
            if left <= 0:
                continue
            if block > 1:
                calls[name]()  # untimed: what the previous call left behind settles
            for _ in range(min(block, left)):
                synchronize(device)
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                calls[name]()
                synchronize(device)
                times[name]["wall"].append(time.perf_counter() - wall_start)
                times[name]["cpu"].append(time.process_time() - cpu_start)
        turn += 1
    return times


def summarize(values: Sequence[float]) -> dict:
    """Median, min, max, quartiles (inclusive method) and the raw values, rounded to 1e-6.

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("nothing to summarize: no measured values")
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median": round(statistics.median(ordered), 6),
        "min": round(ordered[0], 6),
        "max": round(ordered[-1], 6),
        "q1": round(q1, 6),
        "q3": round(q3, 6),
        "values": [round(v, 6) for v in values],
    }


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator rounded to 1e-4 (None when the denominator is not positive)."""
    return round(numerator / denominator, 4) if denominator > 0 else None
