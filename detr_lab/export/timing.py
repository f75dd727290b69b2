"""The exported backends of the benchmark: a model exported at the batch's size, timed like the others.

    call = onnxruntime_call(model, cfg, images, padding_mask, threads=1)   # exports once, here
    outputs = call()   # {"pred_logits", "pred_boxes"}, as a PyTorch inference call returns
    call = exported_call(model, cfg, images, padding_mask, runtime="openvino", int8=True, threads=1)

INT8 calls are calibrated on the timed batch itself (latency only: their accuracy is measured by
`tools/export.py --quantize int8`, on real images).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from detr_lab.config import Config
from detr_lab.export.metadata import ExportMetadata
from detr_lab.export.onnx_export import export_onnx
from detr_lab.export.openvino_runtime import OpenVinoDetector, convert_to_openvino
from detr_lab.export.quantize import quantize_onnxruntime, quantize_openvino
from detr_lab.export.runtime import OnnxDetector


def onnxruntime_call(
    model: nn.Module,
    cfg: Config,
    images: Tensor,
    padding_mask: Tensor,
    *,
    threads: int | None = None,
    deformable_core: str = "auto",
    directory: str | os.PathLike | None = None,
) -> Callable[[], dict]:
    """Export `model` for the fixed size of `images` `[B, 3, H, W]` and return a call running it.

    The file goes to `directory` (default: a temporary folder, removed when the returned call is
    garbage-collected). `threads`: onnxruntime intra-op threads (None: one per core).
    """
    holder = None
    if directory is None:
        holder = tempfile.TemporaryDirectory(prefix="detr_lab_ort_")
        directory = holder.name
    batch, _, height, width = images.shape
    num_classes = cfg.model.num_classes
    metadata = ExportMetadata(list(range(num_classes)), [f"class{i}" for i in range(num_classes)], cfg)
    path = export_onnx(
        model, Path(directory) / "benchmark.onnx", metadata=metadata, height=height, width=width,
        batch=batch, deformable_core=deformable_core,
    )
    detector = OnnxDetector(path, threads=threads)
    images, padding_mask = images.cpu(), padding_mask.cpu()

    def call() -> dict:
        call.holder = holder  # keeps the temporary folder alive as long as the call
        return detector(images, padding_mask)

    return call


def exported_call(
    model: nn.Module,
    cfg: Config,
    images: Tensor,
    padding_mask: Tensor,
    *,
    runtime: str = "onnxruntime",
    int8: bool = False,
    threads: int | None = None,
    deformable_core: str = "auto",
) -> Callable[[], dict]:
    """`onnxruntime_call` for "onnxruntime" or "openvino" (FP32 IR converted from the ONNX export),
    optionally INT8 (onnxruntime static QDQ / NNCF, every node quantized, calibrated on `images`).

    Raises:
        ValueError: an unknown runtime. MissingExtraError: the runtime or its quantizer is missing.
    """
    if runtime not in ("onnxruntime", "openvino"):
        raise ValueError(f"exported runtime must be onnxruntime or openvino, got {runtime!r}")
    holder = tempfile.TemporaryDirectory(prefix="detr_lab_exported_")
    directory = Path(holder.name)
    batch, _, height, width = images.shape
    num_classes = cfg.model.num_classes
    metadata = ExportMetadata(list(range(num_classes)), [f"class{i}" for i in range(num_classes)], cfg)
    path = export_onnx(model, directory / "benchmark.onnx", metadata=metadata, height=height, width=width,
                       batch=batch, deformable_core=deformable_core)
    if runtime == "openvino":
        path = convert_to_openvino(path, directory / "benchmark.xml")
    if int8:
        feeds = [{"images": images.cpu().numpy(), "padding_mask": padding_mask.cpu().numpy().astype(bool)}]
        quantize = quantize_onnxruntime if runtime == "onnxruntime" else quantize_openvino
        path = quantize(path, directory / f"int8{path.suffix}", feeds)
    detector = (OnnxDetector(path, threads=threads) if runtime == "onnxruntime"
                else OpenVinoDetector(path, threads=threads))
    images, padding_mask = images.cpu(), padding_mask.cpu()

    def call() -> dict:
        call.holder = holder  # keeps the temporary folder alive as long as the call
        return detector(images, padding_mask)

    return call
