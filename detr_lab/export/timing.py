"""The onnxruntime backend of the benchmark: a model exported at the batch's size, timed like the others.

    call = onnxruntime_call(model, cfg, images, padding_mask, threads=1)   # exports once, here
    outputs = call()   # {"pred_logits", "pred_boxes"}, as a PyTorch inference call returns
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
from detr_lab.export.runtime import OnnxDetector


def onnxruntime_call(
    model: nn.Module,
    cfg: Config,
    images: Tensor,
    padding_mask: Tensor,
    *,
    threads: int | None = None,
    deformable_core: str = "gather",
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
