"""What one call costs besides time: peak memory and FLOPs, and a model's parameter count.

Memory of one call:
- CUDA: `torch.cuda.max_memory_allocated` during the call (peak) and that peak minus what was
  allocated before the call (increase).
- CPU (Linux): the process's resident-set high-water mark (`VmHWM`), reset before the call through
  `/proc/self/clear_refs`, minus the resident set before the call, after returning freed heap memory
  to the system (`malloc_trim`). It counts the pages the call touched beyond what was resident,
  including allocator slack; where the mark cannot be reset only the process's lifetime peak
  (`ru_maxrss`) is reported. Python's `tracemalloc` does not see tensor memory and is not used.

FLOPs: counted by `torch.utils.flop_counter.FlopCounterMode`: convolutions, matmuls and attention
only (element-wise operations, softmax, normalization and `grid_sample` are not counted). One
multiply-add is 2 FLOPs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from detr_lab.timer import synchronize

MIB = 2**20


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's VmHWM to the current resident set (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return False
    return True


def release_free_heap() -> None:
    """Return freed heap memory to the system (glibc `malloc_trim`; no-op elsewhere)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def measure_peak_memory(call: Callable[[], object], device: torch.device) -> dict:
    """Peak memory of one `call()` (see the module docstring for what each method measures)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "method": "torch.cuda.max_memory_allocated",
            "peak_mib": round(peak / MIB, 1),
            "increase_mib": round((peak - before) / MIB, 1),
        }
    release_free_heap()
    before_kib = _proc_status_kib("VmRSS")
    if before_kib is not None and _reset_peak_rss():
        call()
        peak_kib = _proc_status_kib("VmHWM")
        if peak_kib is not None:
            return {
                "method": "VmHWM (reset before the call) - VmRSS before the call, after malloc_trim",
                "peak_mib": round(peak_kib / 1024, 1),
                "increase_mib": round((peak_kib - before_kib) / 1024, 1),
            }
    call()
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return {
        "method": "ru_maxrss (process lifetime peak)",
        "peak_mib": round(peak / MIB, 1),
        "increase_mib": None,
    }


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of one `call()` seen by `FlopCounterMode` (convolutions, matmuls, attention)."""
    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def count_inference_flops(model: nn.Module, images: Tensor, padding_mask: Tensor) -> int:
    """FLOPs of one forward pass without gradients.

    Run under `torch.no_grad()` with the parameters' `requires_grad` switched off for the call
    (FlopCounterMode's module tracking fails on inference-mode tensors and on leaves that require
    gradients inside `no_grad`); the flags are restored afterwards.
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        with torch.no_grad():
            return count_flops(lambda: model(images, padding_mask))
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def count_parameters(model: nn.Module) -> dict:
    params = list(model.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }

