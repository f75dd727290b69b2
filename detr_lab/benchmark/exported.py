"""Latency of one trained checkpoint against its exported files (the library behind
tools/bench_exported.py).

    calls = backend_calls(loaded, {"onnxruntime": "m.onnx", "openvino_int8": "m-int8.xml"},
                          height=160, width=160, threads=1)
    result = time_backends(calls, runs=20, warmup=3, block=4)   # {name: {"wall_ms": {...}}, ...}

"pytorch_fast" is the checkpoint's model after `optimize_for_inference` under `torch.inference_mode`,
as eval.py runs it; each file is run by the runtime its suffix names (`.onnx`: onnxruntime, `.xml`:
OpenVINO), with `threads` intra-op threads, on the same random batch `[1, 3, height, width]` (no
padding). The calls take turns in blocks (`detr_lab.timer.time_interleaved`), so that the machine's
load hits them alike. The files are trusted to hold the checkpoint's model: an INT8 file is whatever
`tools/export.py --quantize int8` wrote, with its accuracy in its own report.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from detr_lab.checkpoints import LoadedCheckpoint
from detr_lab.errors import InputError, InputNotFoundError
from detr_lab.export.openvino_runtime import OpenVinoDetector
from detr_lab.export.runtime import OnnxDetector
from detr_lab.models.optimize import optimize_for_inference
from detr_lab.timer import summarize, time_interleaved

RUNTIMES = {".onnx": OnnxDetector, ".xml": OpenVinoDetector}


def backend_calls(
    loaded: LoadedCheckpoint,
    files: Mapping[str, str | os.PathLike],
    *,
    height: int,
    width: int,
    threads: int,
) -> dict[str, Callable[[], object]]:
    """`{"pytorch_fast": ..., name: ...}`: one zero-argument call per backend, each running the same
    random float32 batch `[1, 3, height, width]` with an all-valid padding mask. Sets torch's thread
    count to `threads`; the PyTorch side is an optimized copy (`loaded.model` is left as it is).

    Raises:
        InputNotFoundError: a file that does not exist. InputError: a suffix other than .onnx / .xml,
        or the name "pytorch_fast" given to a file.
    """
    runtimes = {}
    for name, path in files.items():
        path = Path(path)
        if name == "pytorch_fast":
            raise InputError("the name pytorch_fast is the checkpoint's own model; name the file otherwise")
        if not path.is_file():
            raise InputNotFoundError(f"{name}: {path} not found")
        if path.suffix not in RUNTIMES:
            raise InputError(f"{name}: {path} is neither .onnx (onnxruntime) nor .xml (OpenVINO)")
        runtimes[name] = RUNTIMES[path.suffix](path, threads=threads)
    torch.set_num_threads(threads)
    model = optimize_for_inference(copy.deepcopy(loaded.model).eval())
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, height, width, generator=generator)
    padding_mask = torch.zeros(1, height, width, dtype=torch.bool)
    images_np, mask_np = images.numpy(), padding_mask.numpy()

    def pytorch_fast() -> None:
        with torch.inference_mode():
            model(images, padding_mask)

    calls: dict[str, Callable[[], object]] = {"pytorch_fast": pytorch_fast}
    for name, runtime in runtimes.items():
        calls[name] = lambda runtime=runtime: runtime.run(images_np, mask_np)
    return calls


def time_backends(
    calls: Mapping[str, Callable[[], object]], *, runs: int, warmup: int, block: int = 4
) -> dict[str, dict]:
    """Per name `{"wall_ms": summarize(...)}` (median, min, max, values) over `runs` timed calls, the
    calls taking turns in blocks of `block`, and `"vs_pytorch_fast"`: median(pytorch_fast) / median
    (values above 1: faster than PyTorch's fast path)."""
    times = time_interleaved(calls, runs=runs, warmup=warmup, block=block)
    result = {name: {"wall_ms": summarize([t * 1e3 for t in value["wall"]])} for name, value in times.items()}
    base = result["pytorch_fast"]["wall_ms"]["median"]
    for value in result.values():
        value["vs_pytorch_fast"] = round(base / value["wall_ms"]["median"], 3)
    return result
