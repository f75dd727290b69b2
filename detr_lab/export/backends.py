"""The runtimes an exported detector runs on, by name: "onnxruntime" (`.onnx`) and "openvino" (`.xml`).

    detector = open_runtime("openvino", "model.xml", threads=2)   # an ExportedRuntime
"""

from __future__ import annotations

import os

from detr_lab.export.openvino_runtime import OpenVinoDetector
from detr_lab.export.runtime import ExportedRuntime, OnnxDetector

RUNTIMES = ("onnxruntime", "openvino")
SUFFIXES = {"onnxruntime": ".onnx", "openvino": ".xml"}


def open_runtime(backend: str, path: str | os.PathLike, *, threads: int | None = None) -> ExportedRuntime:
    """Load an exported model on its runtime (CPU).

    Raises:
        ValueError: an unknown backend, or a file the runtime cannot load. FileNotFoundError: no such
        file. MetadataError: not a detr_lab export. MissingExtraError: the runtime is not installed.
    """
    if backend == "onnxruntime":
        return OnnxDetector(path, threads=threads)
    if backend == "openvino":
        return OpenVinoDetector(path, threads=threads)
    raise ValueError(f"exported-model backend must be one of {RUNTIMES}, got {backend!r}")
