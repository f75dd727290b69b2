"""The exported backends of the benchmark: a model exported once at the batch's size, run by a runtime.

    exported = export_for_timing(model, cfg, images, padding_mask, runtime="openvino", int8=True)
    call = exported.call(images, padding_mask, threads=1)   # loads the file into the runtime
    outputs = call()   # {"pred_logits", "pred_boxes"}, as a PyTorch inference call returns
    call = exported.call(images, padding_mask, threads=2)   # the same file, another thread count

INT8 files are calibrated on the timed batch itself (latency only: their accuracy is measured by
`tools/export.py --quantize int8`, on real images).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from detr_lab.config import Config
from detr_lab.export.metadata import ExportMetadata
from detr_lab.export.onnx_export import export_onnx
from detr_lab.export.openvino_runtime import OpenVinoDetector, convert_to_openvino
from detr_lab.export.quantize import quantize_onnxruntime, quantize_openvino
from detr_lab.export.runtime import OnnxDetector

RUNTIMES = ("onnxruntime", "openvino")


@dataclass
class ExportedModel:
    """One exported file (`.onnx` or OpenVINO `.xml`) in a temporary folder, kept while this object
    (or a call made from it) lives."""

    path: Path
    runtime: str
    holder: tempfile.TemporaryDirectory

    def call(self, images: Tensor, padding_mask: Tensor, *, threads: int | None = None) -> Callable[[], dict]:
        """Load the file with `threads` intra-op threads (None: the runtime's default) and return a
        call running it on `images` `[B, 3, H, W]` and `padding_mask` `[B, H, W]` (True = padding).

        Raises:
            OpenVinoRepeatError: the compiled OpenVINO model gives different outputs on repeated calls.
        """
        detector = (OnnxDetector(self.path, threads=threads) if self.runtime == "onnxruntime"
                    else OpenVinoDetector(self.path, threads=threads))
        images, padding_mask = images.cpu(), padding_mask.cpu()

        def call() -> dict:
            call.exported = self  # keeps the temporary folder alive as long as the call
            return detector(images, padding_mask)

        return call


def export_for_timing(
    model: nn.Module,
    cfg: Config,
    images: Tensor,
    padding_mask: Tensor,
    *,
    runtime: str = "onnxruntime",
    int8: bool = False,
    deformable_core: str = "auto",
    directory: str | os.PathLike | None = None,
) -> ExportedModel:
    """Export `model` for the fixed size of `images` `[B, 3, H, W]` to ONNX ("onnxruntime") or to an
    FP32 OpenVINO IR converted from it ("openvino"), optionally INT8 (onnxruntime static QDQ / NNCF,
    every node quantized, calibrated on `images`). The files go to a temporary folder under
    `directory` (default: the system's), removed when the returned object is garbage-collected.

    Raises:
        ValueError: an unknown runtime. MissingExtraError: the runtime or its quantizer is missing.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"exported runtime must be one of {RUNTIMES}, got {runtime!r}")
    holder = tempfile.TemporaryDirectory(prefix="detr_lab_exported_", dir=directory)
    folder = Path(holder.name)
    batch, _, height, width = images.shape
    num_classes = cfg.model.num_classes
    metadata = ExportMetadata(list(range(num_classes)), [f"class{i}" for i in range(num_classes)], cfg)
    path = export_onnx(model, folder / "benchmark.onnx", metadata=metadata, height=height, width=width,
                       batch=batch, deformable_core=deformable_core)
    if runtime == "openvino":
        path = convert_to_openvino(path, folder / "benchmark.xml")
    if int8:
        feeds = [{"images": images.cpu().numpy(), "padding_mask": padding_mask.cpu().numpy().astype(bool)}]
        quantize = quantize_onnxruntime if runtime == "onnxruntime" else quantize_openvino
        path = quantize(path, folder / f"int8{path.suffix}", feeds)
    return ExportedModel(Path(path), runtime, holder)
