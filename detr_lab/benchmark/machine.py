"""The one machine description every benchmark report carries.

CPU model, core counts, torch threads, library versions (torch, torchvision, Triton and onnxruntime
when installed),
the load average, the threading and allocator environment and, on CUDA, the GPU. Timings on a
machine shared with other processes are only comparable with the load average beside them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch
import torchvision

# Environment variables that change CPU timings: OpenMP/MKL threading, and the allocator settings
# (page faults on freshly mapped memory).
TIMING_ENVIRONMENT = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "LD_PRELOAD")


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the system has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def package_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_machine(device: str | torch.device = "cpu") -> dict:
    """CPU, cores, threads, GPU, library versions, load and timing-relevant environment of this process."""
    device = torch.device(device)
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable_cores = os.cpu_count()
    info = {
        "cpu_model": cpu_model_name(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": package_version("triton"),
        "onnxruntime": package_version("onnxruntime"),
        "openvino": package_version("openvino"),
        "nncf": package_version("nncf"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": load_average(),
        "environment": {
            key: value
            for key, value in os.environ.items()
            if key in TIMING_ENVIRONMENT or key.startswith("MALLOC_")
        },
        "device": str(device),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def machine_line(machine: dict) -> str:
    """One line for the end of a printed table: CPU, cores, threads, GPU, torch (and onnxruntime where
    installed) and the load average."""
    runtime = f"onnxruntime {machine['onnxruntime']}, " if machine.get("onnxruntime") else ""
    return (
        f"machine: {machine['cpu_model']}, {machine['usable_cores']} cores, torch threads "
        f"{machine['torch_threads']}, {machine.get('gpu_name', 'no GPU')}, torch {machine['torch']}, "
        f"{runtime}load average {machine['load_average']} -> {machine.get('load_average_end')}"
    )
